"""MoE models in the native engine: tiny random Mixtral, Qwen2-MoE, Qwen3-MoE and
DeepSeek-V3 (MLA, shared experts, group-limited sigmoid routing, a first dense layer),
quantized offline and online, against transformers on the dequantized checkpoint; bad
checkpoints; ``q eval`` on a quantized MoE."""

from __future__ import annotations

import pytest
import q
import torch
from q.errors import CheckpointError, IncompatibleError
from q.testing import assert_bitwise_equal
from safetensors.torch import load_file, save_file

from .conftest import save_tiny_tokenizer
from .engine_reference import engine_logits, greedy_transformers, transformers_reference

# hidden 128 and expert width 256: every expert weight takes every scheme, and fp8-block's
# 128x128 tiles are real blocks (a 128x128 weight would be one tile: a per-tensor scale)
COMMON = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4,
              num_key_value_heads=2, head_dim=32, num_hidden_layers=2, vocab_size=512)
ARCHS = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=256),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=256,
                      shared_expert_intermediate_size=128, decoder_sparse_step=1,
                      mlp_only_layers=[]),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=256,
                      decoder_sparse_step=1, mlp_only_layers=[]),
    # MLA needs as many KV heads as heads (transformers expands K/V per head)
    "deepseek_v3": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=256,
                        n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1,
                        kv_lora_rank=64, q_lora_rank=96, qk_rope_head_dim=16,
                        qk_nope_head_dim=32, v_head_dim=32, num_key_value_heads=4,
                        head_dim=None),
}
SCHEMES = {  # id: (scheme, args)
    "wint4-g32": ("wint4", {"group_size": 32}),
    "wint4-asym": ("wint4", {"group_size": 32, "symmetric": False}),
    "wint8": ("wint8", None),
    "w8a8-int8": ("w8a8-int8", None),
    "fp8-block": ("fp8-block", None),
    "fp8-dynamic": ("fp8-dynamic", None),
    "fp8-tensor": ("fp8-tensor", None),
    "wint4-channel": ("wint4", None),
    "smoothquant": ("smoothquant", None),
}
# every scheme on Qwen3-MoE; the main ones on DeepSeek-V3; a weight-only and a W8A8 one on
# the others
CASES = [("qwen3_moe", s) for s in SCHEMES] + \
    [("deepseek_v3", s) for s in ("wint4-g32", "wint4-asym", "wint8", "w8a8-int8", "fp8-block",
                                  "fp8-dynamic")] + \
    [(a, s) for a in ("mixtral", "qwen2_moe") for s in ("wint4-g32", "w8a8-int8")]


def quantize(model, scheme_id, out):
    """q.quantize; SmoothQuant calibrates on tiny-tokenizer words (too few: it warns)."""
    import warnings

    scheme, args = SCHEMES[scheme_id]
    if scheme != "smoothquant":
        return q.quantize(model, scheme, out, args=args, progress=False).output
    from .test_smoothquant import calib_text

    text = calib_text(out.parent)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return q.quantize(model, scheme, out, calib=str(text), calib_samples=4,
                          calib_seqlen=64, progress=False).output


def save_tiny_moe(path, model_type: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {**COMMON, **ARCHS[model_type]}
    cfg = {k: v for k, v in cfg.items() if v is not None}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg))
    for name, p in model.named_parameters():  # routers at init are near-uniform: spread them
        if name.endswith("gate.weight"):
            p.data.normal_(0, 0.5)
    model.to(torch.bfloat16).save_pretrained(path)
    save_tiny_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    made = {}

    def get(model_type):
        if model_type not in made:
            made[model_type] = save_tiny_moe(tmp_path_factory.mktemp(model_type), model_type)
        return made[model_type]

    return get


def reference_for(session, deq):
    acts = session.report.recipe.input_activations if session.report.recipe else None
    experts = [n for n, m in session.report.experts.items() if m.gate_up.act_dtype is not None]
    return transformers_reference(deq, session.report.quantized, acts, experts)


@pytest.mark.parametrize("arch,scheme_id", CASES)
def test_moe_matches_transformers_on_dequantized(tiny_moe, tmp_path, arch, scheme_id):
    scheme = SCHEMES[scheme_id][0]
    out = quantize(tiny_moe(arch), scheme_id, tmp_path / "out")
    deq = q.dequantize(out, tmp_path / "deq", dtype="float32", progress=False).output
    session = q.load_engine(out, dtype="float32")
    experts = session.report.experts
    assert experts and all(m.gate_up.kind != "dense" and m.down.kind != "dense"
                           for m in experts.values())  # every expert weight stays quantized
    if scheme == "fp8-block":
        assert all(m.gate_up.kind == m.down.kind == "block" for m in experts.values())
    ref = reference_for(session, deq)
    ids = [3, 17, 99, 250, 4, 8, 400, 21, 77, 5]
    with torch.inference_mode():
        want = ref(input_ids=torch.tensor([ids])).logits[0]
    got = engine_logits(session, ids)
    if session.report.recipe and session.report.recipe.input_activations:
        # Activations quantized at run time: torch's kernels (_int_mm's exact int32 sums)
        # and the reference's fp32 sums of dequantized values differ in the last bit, which
        # can flip one activation's code (measured on Qwen3-MoE SmoothQuant on an Intel
        # Xeon: logits equal to 3e-7 up to position 4, then off by up to 3.5e-3 out of 0.74).
        # The engine's own logic is checked exactly on its reference ops; its kernels to
        # within a flip (a wrong route or scale moves logits by tenths).
        session = q.load_engine(out, dtype="float32", impl="reference")
        torch.testing.assert_close(got, want, rtol=0, atol=1e-2)
        got = engine_logits(session, ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    tokens = session.generate([ids], max_tokens=10, ignore_eos=True)[0].token_ids
    assert tokens == greedy_transformers(ref, ids, 10)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_unquantized_moe_matches_transformers_and_batches(tiny_moe, arch):
    """bf16 checkpoint, fp32 compute: the same logits as transformers; several requests
    decoding together (paged attention, MLA's wider keys than values) give what each gives
    alone."""
    session = q.load_engine(tiny_moe(arch), dtype="float32")
    ref = transformers_reference(tiny_moe(arch))
    ids = [5, 6, 7, 300, 2, 9]
    with torch.inference_mode():
        want = ref(input_ids=torch.tensor([ids])).logits[0]
    torch.testing.assert_close(engine_logits(session, ids), want, rtol=1e-5, atol=1e-5)
    prompts = [ids, [11, 12], [40, 41, 42, 43, 44, 45, 46, 47, 48]]
    alone = [session.generate([p], max_tokens=8, ignore_eos=True)[0].token_ids
             for p in prompts]
    together = [o.token_ids for o in session.generate(prompts, max_tokens=8, ignore_eos=True)]
    assert together == alone
    assert alone[0] == greedy_transformers(ref, ids, 8)


@pytest.mark.parametrize("scheme_id", ["wint4-g32", "w8a8-int8", "fp8-block"])
def test_online_moe_quantization_equals_offline(tiny_moe, tmp_path, scheme_id):
    scheme, args = SCHEMES[scheme_id]
    model = tiny_moe("qwen3_moe")
    out = q.quantize(model, scheme, tmp_path / "out", args=args, progress=False).output
    offline = q.load_engine(out, impl="reference").report.experts
    online = q.load_engine(model, scheme=scheme, args=args, impl="reference").report.experts
    assert offline.keys() == online.keys() and len(offline) == 2
    for name in offline:
        for proj in ("gate_up", "down"):
            a, b = getattr(offline[name], proj), getattr(online[name], proj)
            assert a.kind == b.kind != "dense"
            for attr in ("qdata", "scale", "zero_point"):
                x, y = getattr(a, attr), getattr(b, attr)
                assert (x is None) == (y is None)
                if x is not None:
                    assert_bitwise_equal(x, y, f"{name}.{proj}.{attr}")


@pytest.mark.parametrize("scheme_id", ["wint4-g32", "wint8", "w8a8-int8", "fp8-block"])
def test_bf16_cpu_kernels_on_moe(tiny_moe, tmp_path, scheme_id, caplog):
    """bf16 compute takes torch's CPU kernels for the experts (logged), and agrees with the
    fp32 reference path on the greedy continuation's tokens."""
    import logging

    scheme, args = SCHEMES[scheme_id]
    out = q.quantize(tiny_moe("qwen3_moe"), scheme, tmp_path / "out", args=args,
                     progress=False).output
    with caplog.at_level(logging.INFO, logger="q.engine"):
        fast = q.load_engine(out, dtype="bfloat16")
    assert "MoE experts" in caplog.text and "torch built-in kernels" in caplog.text
    slow = q.load_engine(out, dtype="float32", impl="reference")
    ids = [3, 17, 99, 250, 4, 8, 400, 21]
    a, b = engine_logits(fast, ids), engine_logits(slow, ids)
    assert (a - b).norm() / b.norm() < 0.05
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.75


def test_int8_activations_refuse_weight_only_experts(tiny_moe, tmp_path):
    """woq_activations int8 has no fused_moe path: a weight-only MoE model is refused by
    module name before anything runs."""
    scheme, args = SCHEMES["wint8"]
    out = q.quantize(tiny_moe("qwen3_moe"), scheme, tmp_path / "out", args=args,
                     progress=False).output
    with pytest.raises(IncompatibleError, match=r"model\.layers\.0\.mlp.*cannot run MoE "
                                                r"experts"):
        q.load_engine(out, woq_activations="int8")


def test_unknown_moe_architecture_is_named(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("olmoe", hidden_size=64, intermediate_size=64,
                               num_attention_heads=4, num_hidden_layers=1, vocab_size=128,
                               num_experts=4, num_experts_per_tok=2)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    with pytest.raises(IncompatibleError, match="'olmoe'.*deepseek_v3.*--format vllm"):
        q.load_engine(tmp_path)


def _edit(src, dst, edit):
    import shutil

    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_an_expert_missing_its_scale_is_named(tiny_moe, tmp_path):
    out = q.quantize(tiny_moe("qwen3_moe"), "w8a8-int8", tmp_path / "out",
                     progress=False).output
    name = "model.layers.1.mlp.experts.2.up_proj.weight_scale"
    bad = _edit(out, tmp_path / "bad", lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=r"experts of model\.layers\.1 mix quantized and "
                       r"unquantized.*experts\.2\.up_proj\.weight' is not quantized"):
        q.load_engine(bad)


def test_an_expert_missing_a_projection_is_named(tiny_moe, tmp_path):
    name = "model.layers.0.block_sparse_moe.experts.3.w2.weight"
    bad = _edit(tiny_moe("mixtral"), tmp_path / "bad", lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=rf"'{name}' is missing; the config says 4 "
                       "experts per layer"):
        q.load_engine(bad)


def test_mla_cache_holds_wide_keys_and_narrow_values(tiny_moe):
    session = q.load_engine(tiny_moe("deepseek_v3"), dtype="float32", kv_cache_tokens=128)
    keys, values = session.cache.layer(0)
    assert keys.shape[-3:-1] == (4, 48)
    assert values.shape[1] == 4 and values.shape[-1] == 32  # [blocks, kvH, bs, dv]


def test_eval_on_a_quantized_moe(tiny_moe, tmp_path):
    import random

    from q.evaluate import evaluate

    rng = random.Random(0)
    text = tmp_path / "words.txt"
    text.write_text(" ".join(f"w{rng.randrange(510)}" for _ in range(2000)) + "\n")
    model = tiny_moe("qwen3_moe")
    out = q.quantize(model, "wint8", tmp_path / "out", progress=False).output
    r = evaluate(out, model, text=text, windows=3, window_len=48, generations=2,
                 gen_tokens=12, progress=False)
    assert r.format != "unquantized" and r.kl_mean < 1e-2 and r.top1_agreement > 0.9
    experts = [e for e in r.layers if e.name.endswith("mlp.experts.*")]  # an --ignore glob
    assert len(experts) == 2 and all(0 < e.isolated < 0.05 for e in experts)  # wint8: ~0.5%
    skipped = q.plan(model, "wint8", ignore=[experts[0].name]).skipped_modules
    ignored = [m for m in skipped if m.startswith(experts[0].name[:-1])]
    assert len(ignored) == 4 * 3  # every expert's three projections of that layer
    assert r.verdict in ("PASS", "WARN"), r.reason


def test_q_serve_and_q_generate_run_a_quantized_moe(tiny_moe, tmp_path):
    """As a user would: `q generate` on an online-quantized DeepSeek-V3, and the OpenAI
    server over a wint4 Mixtral, answering what the engine answers."""
    import httpx
    from click.testing import CliRunner
    from q.cli import _build

    from .server_fixtures import running_server

    result = CliRunner().invoke(_build(), ["generate", str(tiny_moe("deepseek_v3")), "--scheme",
                                      "fp8-block", "-p", "w1 w2 w3", "--max-tokens", "5",
                                      "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    out = q.quantize(tiny_moe("mixtral"), "wint4", tmp_path / "w4", args={"group_size": 32},
                     progress=False).output
    session = q.load_engine(out, dtype="float32")
    direct = session.generate(["w7 w8 w9"], max_tokens=6, ignore_eos=True)[0]
    with running_server(session, model_name="moe") as (url, _):
        r = httpx.post(f"{url}/v1/completions", json={
            "model": "moe", "prompt": "w7 w8 w9", "max_tokens": 6, "temperature": 0,
            "ignore_eos": True}, timeout=60).json()
    assert r["choices"][0]["text"] == direct.text and r["usage"]["completion_tokens"] == 6
