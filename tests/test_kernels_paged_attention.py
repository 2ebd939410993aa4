"""q.kernels.paged_attention: the C++ decode and prefill kernels against the plain-torch
reference, and the reference against dense attention over the same keys, on ragged lengths,
scattered block tables, grouped-query heads, MLA's narrower values, sliding windows and
soft-capping; and the engine's choice of path (the kernels, or SDPA with the reason
logged)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from q.kernels import cpp_build
from q.kernels.configs import cpu_flags
from q.kernels.paged_attention import cpp_impl, reference

BS = 16  # small blocks: a sequence spans several, and lengths fall on and off their edges


def _case(batch, heads, kv_heads, dim, value_dim, lengths, dtype, seed=0, bs=BS):
    g = torch.Generator().manual_seed(seed)
    nblk = max(-(-n // bs) for n in lengths)
    blocks = batch * nblk + 3
    k_cache = torch.randn(blocks, kv_heads, dim, bs, generator=g).to(dtype)
    v_cache = torch.randn(blocks, kv_heads, bs, value_dim, generator=g).to(dtype)
    # each sequence gets scattered blocks; unused table entries point at block 0
    perm = torch.randperm(blocks - 1, generator=g)[:batch * nblk].view(batch, nblk) + 1
    tables = perm.clone()
    for b, n in enumerate(lengths):
        tables[b, -(-n // bs):] = 0
    q = torch.randn(batch, heads, dim, generator=g).to(dtype)
    return q, k_cache, v_cache, tables, torch.tensor(lengths)


SHAPES = [  # (heads, kv heads, key dim, value dim)
    (9, 3, 64, 64),  # SmolLM2: groups of 3
    (4, 4, 32, 32),  # multi-head
    (8, 1, 64, 64),  # multi-query
    (4, 4, 48, 32),  # MLA-like: values narrower than keys
]
LENGTHS = [1, BS - 1, BS, BS + 1, 3 * BS + 5, 70]


@pytest.fixture(scope="module")
def kernel():
    why = cpp_impl.unavailable_reason()
    if why is not None:  # CI machines have a C++ compiler: this must not skip there
        pytest.fail(f"the C++ kernel did not build: {why}")
    return cpp_impl.paged_decode


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_kernel_matches_reference(kernel, shape, dtype):
    heads, kv_heads, dim, value_dim = shape
    q, k, v, tables, lengths = _case(len(LENGTHS), heads, kv_heads, dim, value_dim, LENGTHS,
                                     dtype)
    scale = dim ** -0.5
    out = kernel(q, k, v, tables, lengths, scale)
    ref = reference.paged_decode(q, k, v, tables, lengths, scale)
    assert out.dtype == torch.float32 and out.shape == (len(LENGTHS), heads, value_dim)
    # both compute in fp32 from the same (bf16-exact) inputs: only summation order and the
    # kernel's polynomial exp (about 2 ulp) differ
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("shape", [(9, 3, 64, 64), (32, 4, 64, 64), (4, 2, 128, 128),
                                   (6, 1, 64, 64), (10, 2, 64, 64), (4, 4, 48, 32)])
@pytest.mark.parametrize("window,softcap", [(None, None), (100, None), (99, None), (None, 5.0)])
def test_cpp_kernel_on_engine_blocks(kernel, shape, window, softcap):
    """The engine's 64-position blocks in bf16: keys and values of 64 (or a multiple of 64)
    take the kernel's register-held loops (32 positions, 64 value columns per pass; on
    AVX-512 BF16 prefill's pair loops), other widths the portable ones; groups of 1-5 query
    heads per KV head (5: padded to 8)."""
    heads, kv_heads, dim, value_dim = shape
    lengths = [1, 63, 64, 65, 200, 320]
    q, k, v, tables, lengths = _case(len(lengths), heads, kv_heads, dim, value_dim, lengths,
                                     torch.bfloat16, 4, bs=64)
    out = kernel(q, k, v, tables, lengths, 0.125, window, softcap)
    ref = reference.paged_decode(q, k, v, tables, lengths, 0.125, window, softcap)
    if value_dim % 64 == 0 and "avx512_bf16" in cpu_flags():
        # prefill's vdpbf16ps loops: the softmax weights rounded to bf16 (relative error
        # at most 2^-9 each) move a weighted mean of values by at most 2^-9 max |v|
        bound = 2 ** -9 * v.float().abs().max().item() + 2e-5
        torch.testing.assert_close(out, ref, rtol=0, atol=bound)
    else:
        torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)


def test_cpp_kernel_strided_queries_and_cache_dtype_out(kernel):
    """Queries read in place from a wider row (the fused q/k/v output) and the output written
    in the caches' dtype: the very bits of the contiguous call's fp32 output rounded by
    ``.to()``. A stride or rounding slip changes them."""
    heads, kv_heads, dim = 8, 2, 64
    lengths = [1, 63, 65, 200]
    q, k, v, tables, lengths = _case(len(lengths), heads, kv_heads, dim, dim, lengths,
                                     torch.bfloat16, 4, bs=64)
    wide = torch.randn(len(lengths), (heads + 2 * kv_heads) * dim).to(torch.bfloat16)
    wide[:, :heads * dim] = q.reshape(len(lengths), -1)
    strided = wide[:, :heads * dim].view(len(lengths), heads, dim)
    assert not strided.is_contiguous()
    want = kernel(q, k, v, tables, lengths, 0.125)
    assert torch.equal(kernel(strided, k, v, tables, lengths, 0.125), want)
    got = kernel(strided, k, v, tables, lengths, 0.125, out_dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want.to(torch.bfloat16))
    with pytest.raises(ValueError, match="float32 or the caches' dtype"):
        kernel(q, k, v, tables, lengths, 0.125, out_dtype=torch.float16)


@pytest.mark.parametrize("window,softcap", [(7, None), (BS, None), (None, 5.0), (20, 2.0)])
def test_cpp_kernel_window_and_softcap(kernel, window, softcap):
    q, k, v, tables, lengths = _case(len(LENGTHS), 8, 2, 32, 32, LENGTHS, torch.bfloat16, 1)
    out = kernel(q, k, v, tables, lengths, 0.3, window, softcap)
    ref = reference.paged_decode(q, k, v, tables, lengths, 0.3, window, softcap)
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)


def test_cpp_kernel_large_scores_do_not_overflow(kernel):
    """Scores in the hundreds: the softmax subtracts its maximum (exp of the raw score
    would be inf); weights far below the peak underflow to ~0, not NaN."""
    q, k, v, tables, lengths = _case(3, 4, 2, 32, 32, [5, 40, 64], torch.float32, 2)
    out = kernel(q * 30, k, v, tables, lengths, 1.0)
    ref = reference.paged_decode(q * 30, k, v, tables, lengths, 1.0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def _prefill_case(heads, kv_heads, dim, value_dim, seqs, dtype, seed=0, bs=BS):
    """Query rows of several sequences, each ``(first position, count)``: prompts from 0,
    chunks that continue earlier ones, single tokens; q's rows strided, as the engine's
    views of the fused q/k/v output are."""
    lengths = [p + n for p, n in seqs]
    _, k, v, tables, _ = _case(len(seqs), heads, kv_heads, dim, value_dim, lengths, dtype,
                               seed, bs)
    g = torch.Generator().manual_seed(seed + 1)
    rows = sum(n for _, n in seqs)
    q = torch.randn(rows, heads * dim + 8, generator=g).to(dtype)[:, :heads * dim]
    starts = [sum(n for _, n in seqs[:b]) for b in range(len(seqs))]
    spans = torch.tensor([[s, n, p] for s, (p, n) in zip(starts, seqs)])
    return q.view(rows, heads, dim), k, v, tables, spans


PREFILL_SEQS = [(0, 70), (5, 1), (BS, 2 * BS + 3), (0, 3), (3 * BS + 2, 17)]


@pytest.mark.parametrize("shape", SHAPES + [(32, 4, 64, 64), (10, 2, 64, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bs", [BS, 64])
def test_cpp_prefill_matches_reference(kernel, shape, dtype, bs):
    """Causal prefill over cache blocks: prompts, continued chunks and single queries in one
    call, 16- and 64-position blocks (64: the register-held bf16 loops), rows strided."""
    heads, kv_heads, dim, value_dim = shape
    q, k, v, tables, spans = _prefill_case(heads, kv_heads, dim, value_dim, PREFILL_SEQS,
                                           dtype, bs=bs)
    assert not q.is_contiguous()
    out = cpp_impl.paged_prefill(q, k, v, tables, spans, dim ** -0.5)
    ref = reference.paged_prefill(q, k, v, tables, spans, dim ** -0.5)
    assert out.dtype == dtype and out.shape == (q.shape[0], heads, value_dim)
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)
    else:  # fp32 sums, the output rounded to bf16 (within one bf16 step of the oracle); on
        # AVX-512 BF16 CPUs with 64-position blocks also the softmax weights, as torch's
        # flash attention rounds them: measured up to 5.2e-3 off (outputs of magnitude ~1)
        torch.testing.assert_close(out.float(), ref, rtol=2 ** -8, atol=1e-2)


@pytest.mark.parametrize("window,softcap", [(7, None), (BS, None), (None, 5.0), (20, 2.0)])
def test_cpp_prefill_window_and_softcap(kernel, window, softcap):
    q, k, v, tables, spans = _prefill_case(8, 2, 64, 64, PREFILL_SEQS, torch.float32, 5)
    out = cpp_impl.paged_prefill(q, k, v, tables, spans, 0.3, window, softcap)
    ref = reference.paged_prefill(q, k, v, tables, spans, 0.3, window, softcap)
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)


def test_cpp_prefill_rows_do_not_depend_on_their_step(kernel):
    """A query's output is the same whether its prompt comes whole, in chunks, or beside
    other sequences: each row's sums run in one order (batched == alone, bit for bit)."""
    q, k, v, tables, spans = _prefill_case(9, 3, 64, 64, [(0, 150)], torch.bfloat16, 6,
                                           bs=64)
    whole = cpp_impl.paged_prefill(q, k, v, tables, spans, 0.125)
    for cut in (1, 37, 64, 149):
        chunks = torch.tensor([[0, cut, 0], [cut, 150 - cut, cut]])
        parts = cpp_impl.paged_prefill(q, k, v, tables.expand(2, -1), chunks, 0.125)
        assert torch.equal(parts, whole), cut


def test_cpp_prefill_rejects_spans_past_its_rows_or_blocks(kernel):
    q, k, v, tables, spans = _prefill_case(4, 2, 32, 32, [(0, 5)], torch.float32)
    with pytest.raises(ValueError, match="past the 5 query rows"):
        cpp_impl.paged_prefill(q, k, v, tables, torch.tensor([[1, 5, 0]]), 1.0)
    with pytest.raises(ValueError, match="past the 1 blocks of their tables"):
        cpp_impl.paged_prefill(q, k, v, tables, torch.tensor([[0, 5, BS - 2]]), 1.0)
    # a sequence with no query rows is skipped
    spans = torch.tensor([[0, 5, 0], [5, 0, 0]])
    out = cpp_impl.paged_prefill(q, k, v, tables.expand(2, -1), spans, 1.0)
    torch.testing.assert_close(out, reference.paged_prefill(q, k, v, tables, spans[:1], 1.0))


def test_reference_prefill_is_dense_causal_attention():
    """The prefill oracle on a prompt from position 0: torch's causal SDPA over the same
    keys, laid out contiguously."""
    q, k, v, tables, spans = _prefill_case(9, 3, 64, 64, [(0, 50)], torch.float32, 7)
    ref = reference.paged_prefill(q, k, v, tables, spans, 0.125)
    pos = torch.arange(50)
    slots = tables[0][pos // BS] * BS + pos % BS
    keys = k.permute(0, 3, 1, 2).flatten(0, 1)[slots].transpose(0, 1)  # [kvH, n, D]
    values = v.transpose(1, 2).flatten(0, 1)[slots].transpose(0, 1)  # [kvH, n, DV]
    dense = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys[None],
                                           values[None], scale=0.125, is_causal=True,
                                           enable_gqa=True)
    torch.testing.assert_close(ref, dense[0].transpose(0, 1), rtol=1e-5, atol=1e-5)


def test_reference_matches_dense_attention():
    """The oracle itself: the same keys laid out contiguously through torch's SDPA."""
    q, k, v, tables, lengths = _case(len(LENGTHS), 9, 3, 64, 64, LENGTHS, torch.float32, 3)
    ref = reference.paged_decode(q, k, v, tables, lengths, 0.125)
    for b, n in enumerate(LENGTHS):
        pos = torch.arange(n)
        slots = tables[b][pos // BS] * BS + pos % BS
        keys = k.permute(0, 3, 1, 2).flatten(0, 1)[slots].transpose(0, 1)  # [kvH, n, D]
        values = v.transpose(1, 2).flatten(0, 1)[slots].transpose(0, 1)  # [kvH, n, DV]
        dense = F.scaled_dot_product_attention(
            q[b].view(3, 3, 1, 64), keys[:, None], values[:, None], scale=0.125)
        torch.testing.assert_close(ref[b], dense.reshape(9, 64), rtol=1e-5, atol=1e-5)


def test_kernel_rejects_what_it_cannot_read(kernel):
    q, k, v, tables, lengths = _case(2, 4, 2, 32, 32, [5, 9], torch.float32)
    with pytest.raises(ValueError, match="contiguous"):
        kernel(q, k.transpose(2, 3), v, tables, lengths, 1.0)
    assert "float16" in cpp_impl.unavailable_reason(torch.float16)


def test_engine_logs_its_attention_path(monkeypatch, caplog):
    from q.plugins.engines.native.attention import attention_kernels

    cpu = torch.device("cpu")
    with caplog.at_level(logging.INFO, logger="q.engine"):
        assert attention_kernels(cpu, torch.bfloat16, "auto") is cpp_impl
        assert attention_kernels(cpu, torch.bfloat16, "reference") is None
    assert "in place, for decode steps and for prompts" in caplog.text
    assert "impl=reference" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="q.engine"):
        assert attention_kernels(cpu, torch.float32, "auto") is cpp_impl
    assert "decode steps (prompts: transformers' attention function" in caplog.text
    monkeypatch.setenv("Q_NO_CPP_KERNELS", "1")
    _clear_caches()
    try:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="q.engine"):
            assert attention_kernels(cpu, torch.bfloat16, "auto") is None
        assert "Q_NO_CPP_KERNELS is set" in caplog.text
    finally:
        monkeypatch.delenv("Q_NO_CPP_KERNELS")
        _clear_caches()


def _clear_caches():
    cpp_impl._library.cache_clear()
    cpp_build.bind.cache_clear()
    cpp_build.load.cache_clear()


def test_a_failed_build_falls_back_with_the_compiler_error(monkeypatch, tmp_path):
    """A compiler that fails: the reason names it and carries its message; nothing torn
    is left in the cache."""
    fake = tmp_path / "broken-c++"
    fake.write_text("#!/bin/sh\necho 'fatal: cannot compile' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    monkeypatch.setenv("Q_CACHE_DIR", str(tmp_path / "cache"))
    _clear_caches()
    try:
        why = cpp_impl.unavailable_reason()
        assert why and "broken-c++ failed" in why and "cannot compile" in why
        assert not list((tmp_path / "cache" / "kernels").glob("*.so"))
    finally:
        _clear_caches()


def test_an_edited_header_rebuilds_the_kernels_that_include_it(monkeypatch, tmp_path):
    """The build cache keys a kernel on its source and the q headers it includes: a kernel
    built against an old header must not be reused."""
    if cpp_build._compiler() is None:
        pytest.skip("no C++ compiler")
    monkeypatch.setenv("Q_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "inc").mkdir()
    header = tmp_path / "inc" / "answer.h"
    source = tmp_path / "kernel.cpp"
    source.write_text('#include "inc/answer.h"\nextern "C" int q_answer() { return ANSWER; }\n')
    answers = []
    for value in (41, 42):
        header.write_text(f"#define ANSWER {value}\n")
        cpp_build.load.cache_clear()
        lib, why = cpp_build.load(source)
        assert why is None
        answers.append(lib.q_answer())
    cpp_build.load.cache_clear()
    assert answers == [41, 42]
    assert len(list((tmp_path / "cache" / "kernels").glob("kernel-*.so"))) == 2


@pytest.mark.parametrize("dtype,steps", [("float32", 12), ("bfloat16", 2)])
def test_engine_decodes_the_same_with_the_kernels_and_with_sdpa(tiny_llama, dtype, steps):
    """A batch of ragged requests decoding past block edges (64-token blocks): the kernels'
    steps and SDPA (prompts over their own keys, gathered blocks for decode) give the same
    tokens and logprobs within fp32 / bf16 rounding. In bf16 the two round attention's
    output differently, and a random tiny model has near-ties that then flip later tokens:
    one decode step is compared there."""
    import q
    from q.generation import SamplingParams

    session = q.load_engine(tiny_llama(layers=2), dtype=dtype)
    assert session.runner.kernels is cpp_impl
    prompts = [[5, 6, 7], list(range(10, 70)), list(range(100, 164)), list(range(100, 230)),
               [42]]
    params = SamplingParams(max_tokens=steps, ignore_eos=True, logprobs=0)

    def run():
        outs = session.generate(prompts, params)
        return [o.token_ids for o in outs], torch.tensor(
            [[lp.logprob for lp in o.logprobs] for o in outs])

    tokens, logprobs = run()
    session.runner.kernels = None
    try:
        want_tokens, want_logprobs = run()
    finally:
        session.runner.kernels = cpp_impl
    assert tokens == want_tokens
    bound = 1e-4 if dtype == "float32" else 0.05
    torch.testing.assert_close(logprobs, want_logprobs, rtol=0, atol=bound)


@pytest.mark.parametrize("dtype,prefill_calls", [("bfloat16", True), ("float32", False)])
def test_engine_runs_prompts_through_the_prefill_kernel_in_bf16_only(tiny_llama, dtype,
                                                                     prefill_calls):
    """bf16 prompts (and continued chunks) take paged_prefill; fp32 prompts keep
    transformers' attention function, so their logits stay transformers' bits."""
    import q

    session = q.load_engine(tiny_llama(layers=2), dtype=dtype, max_step_tokens=40)
    calls = []

    class Counting:  # the kernels the runner hands to attention, counted
        paged_decode = staticmethod(cpp_impl.paged_decode)

        @staticmethod
        def paged_prefill(*args, **kwargs):
            calls.append(1)
            return cpp_impl.paged_prefill(*args, **kwargs)

    session.runner.kernels = Counting
    session.generate([list(range(5, 75)), [3, 4, 5]], max_tokens=2, ignore_eos=True)
    assert bool(calls) is prefill_calls
