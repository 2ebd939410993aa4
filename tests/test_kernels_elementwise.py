"""q.kernels.elementwise: the C++ RMSNorm (with and without the residual add) against
transformers' arithmetic (the reference), on contiguous rows and on column slices of a wider
product; what the kernel refuses; and which modules the engine gives it."""

from __future__ import annotations

import logging

import pytest
import torch
from q.kernels import cpp_build
from q.kernels.elementwise import cpp_impl, reference

SHAPES = [(1, 576), (7, 2048), (300, 64), (5, 577)]  # decode row, prompt rows, odd width


@pytest.fixture(scope="module", autouse=True)
def built():
    why = cpp_impl.unavailable_reason()
    if why is not None:  # CI machines have a C++ compiler: this must not skip there
        pytest.fail(f"the C++ kernels did not build: {why}")


def _close(got, want, dtype):
    """bf16: the bits of torch's ops but for rare ties of the fp32 sum order (at most one
    bf16 ulp, on under 0.1% of elements); fp32: within a few ulp."""
    assert got.dtype == want.dtype and got.shape == want.shape
    if dtype == torch.bfloat16:
        differ = got != want
        assert differ.float().mean() < 1e-3
        torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=0)
    else:
        torch.testing.assert_close(got, want, rtol=4e-6, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rms_norm_matches_reference(shape, dtype):
    g = torch.Generator().manual_seed(0)
    rows, width = shape
    x = (torch.randn(rows, width, generator=g) * 3).to(dtype)
    w = (torch.randn(width, generator=g) * 0.2 + 1).to(dtype)
    _close(cpp_impl.rms_norm(x, w, 1e-5), reference.rms_norm(x, w, 1e-5), dtype)
    # [1, rows, width], as the model passes it
    _close(cpp_impl.rms_norm(x[None], w, 1e-6), reference.rms_norm(x[None], w, 1e-6), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rms_norm_with_residual_returns_the_sum_exactly(dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 256, generator=g).to(dtype)
    residual = torch.randn(9, 256, generator=g).to(dtype)
    w = torch.rand(256, generator=g).to(dtype)
    out, summed = cpp_impl.rms_norm(x, w, 1e-5, residual=residual)
    want, want_sum = reference.rms_norm(x, w, 1e-5, residual=residual)
    assert torch.equal(summed, want_sum)  # one rounding of x + residual, as torch's add
    _close(out, want, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rms_norm_reads_a_column_slice(dtype):
    """Rows a stride apart (a slice of a fused product) are read where they lie."""
    g = torch.Generator().manual_seed(2)
    wide = torch.randn(6, 384, generator=g).to(dtype)
    x = wide[:, 128:256]
    w = torch.rand(128, generator=g).to(dtype)
    _close(cpp_impl.rms_norm(x, w, 1e-5), reference.rms_norm(x, w, 1e-5), dtype)


def test_kernel_refuses_what_it_cannot_read():
    x = torch.randn(4, 64)
    w = torch.ones(64)
    assert cpp_impl.rms_norm(x.half(), w.half(), 1e-5) is None  # dtype
    assert cpp_impl.rms_norm(x, w.bfloat16(), 1e-5) is None  # mixed dtypes
    assert cpp_impl.rms_norm(x.t(), torch.ones(4), 1e-5) is None  # strided rows
    assert cpp_impl.rms_norm(x, torch.ones(32), 1e-5) is None  # weight of another width
    assert cpp_impl.rms_norm(x, w, 1e-5, residual=torch.randn(4, 64).bfloat16()) is None


def _clear_caches():
    cpp_impl._library.cache_clear()
    cpp_build.load.cache_clear()


def test_engine_gives_the_kernel_to_llama_style_norms_only(tiny_llama, tmp_path, caplog):
    """bf16 on a CPU: every RMSNorm of a Llama takes the kernel; Gemma's (its own
    ``1 + weight`` arithmetic) keeps its forward; fp32 keeps torch's ops."""
    import transformers

    import q

    from .conftest import save_tiny_tokenizer

    with caplog.at_level(logging.INFO, logger="q.engine"):
        session = q.load_engine(tiny_llama(layers=2), dtype="bfloat16")
    assert session.report.elementwise == 2 * 2 + 1  # 2 norms per layer, the final norm
    assert "RMSNorm: the C++ kernel in 5 modules" in caplog.text
    assert q.load_engine(tiny_llama(layers=2), dtype="float32").report.elementwise == 0

    cfg = transformers.GemmaConfig(hidden_size=64, intermediate_size=128,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                   num_hidden_layers=1, vocab_size=512)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    save_tiny_tokenizer(tmp_path)
    assert q.load_engine(tmp_path, dtype="bfloat16").report.elementwise == 0


def test_no_cpp_kernels_keeps_torch_ops_and_says_why(tiny_llama, monkeypatch, caplog):
    import q

    monkeypatch.setenv("Q_NO_CPP_KERNELS", "1")
    _clear_caches()
    try:
        with caplog.at_level(logging.INFO, logger="q.engine"):
            session = q.load_engine(tiny_llama(layers=2), dtype="bfloat16")
        assert session.report.elementwise == 0
        assert "Q_NO_CPP_KERNELS is set" in caplog.text
    finally:
        monkeypatch.delenv("Q_NO_CPP_KERNELS")
        _clear_caches()


def test_engine_generates_the_same_with_and_without_the_kernel(tiny_llama, monkeypatch):
    """bf16 engine with the kernel against the same load with transformers' forwards: the
    logits of a prompt agree to bf16 rounding, and a short greedy run gives the same tokens."""
    import q
    from q.plugins.engines.native import loader

    ids = [3, 17, 99, 250, 4, 8, 400, 21]
    fused = q.load_engine(tiny_llama(layers=2), dtype="bfloat16")
    monkeypatch.setattr(loader.elementwise, "install", lambda *a: 0)
    plain = q.load_engine(tiny_llama(layers=2), dtype="bfloat16")
    with torch.inference_mode():
        got, want = (s.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()
                     for s in (fused, plain))
    torch.testing.assert_close(got, want, rtol=0, atol=0.05)
    run = lambda s: s.generate([ids], max_tokens=4, ignore_eos=True)[0].token_ids  # noqa: E731
    assert run(fused) == run(plain)
