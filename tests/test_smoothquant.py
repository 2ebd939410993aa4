"""SmoothQuant on tiny in-process models: smoothing keeps the function, calibration statistics
equal a full-model computation, the formula's edge cases, the checkpoints q writes
(compressed-tensors W8A8 exactly like llm-compressor's preset, LMDeploy's smooth_quant) and
every bad input. The SmolLM2 accuracy and memory tests are in test_smoothquant_smollm2.py.
"""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import q
from q.calibdata import CalibrationWarning, load_calibration
from q.errors import BadTensorError, IncompatibleError, OptionError, QError
from q.smoothing import (
    ARCH_SMOOTHING,
    Smoothing,
    calibrate_smoothing,
    column_abs_max,
    fold_into_layer_,
    linear_error,
    plan_smoothing,
    search_alpha,
    smoothing_factors,
)
from q.source import ModelSource
from q.testing import assert_bitwise_equal, sqnr

from .conftest import write_safetensors

def tiny_config(model_type: str):
    from transformers import AutoConfig

    common = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, num_hidden_layers=2, vocab_size=128)
    extra = {"mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
             "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                               decoder_sparse_step=1, mlp_only_layers=[]),
             "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                               shared_expert_intermediate_size=64, decoder_sparse_step=1,
                               mlp_only_layers=[]),
             "gemma2": dict(sliding_window=8, query_pre_attn_scalar=16),
             "gemma3_text": dict(sliding_window=8, query_pre_attn_scalar=16)}
    return AutoConfig.for_model(model_type, **common, **extra.get(model_type, {}))


def tiny_model(model_type: str):
    """fp64 throughout: eager experts (grouped_mm has no fp64 kernel) and Gemma norms that
    do not round through fp32 (transformers casts there; the fold's math is what is tested)."""
    import types

    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type),
                                             experts_implementation="eager")
    for module in model.modules():
        name = type(module).__name__
        if name.startswith("Gemma") and name.endswith("RMSNorm"):
            module.forward = types.MethodType(lambda self, x: self._norm(x) * (1.0 + self.weight),
                                              module)
    return model.double().eval()


def randomize_norms(model, g):
    """Init leaves norms at 1 (or 0 for Gemma's 1 + w): make them carry information."""
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.data = torch.rand(p.shape, generator=g, dtype=p.dtype) + 0.5


@pytest.mark.parametrize("model_type", sorted(ARCH_SMOOTHING))
def test_smoothing_preserves_the_function(model_type):
    g = torch.Generator().manual_seed(0)
    model = tiny_model(model_type)
    randomize_norms(model, g)
    ids = torch.randint(0, 128, (2, 12), generator=g)
    with torch.inference_mode():
        before = model(ids).logits
    arch = ARCH_SMOOTHING[model_type]
    for layer in model.model.layers:
        for m in arch.mappings:
            # log-uniform over 10^-2..10^2: outlier-sized factors, not gentle ones
            s = 10 ** (4 * torch.rand(model.config.hidden_size, generator=g,
                                      dtype=torch.float64) - 2)
            fold_into_layer_(layer, m, s, arch.norm_offset)
    with torch.inference_mode():
        after = model(ids).logits
    rel = float((after - before).abs().max() / before.abs().max())
    assert rel < 1e-10, f"{model_type}: smoothed model differs by {rel:.2e}"


def test_gemma_needs_the_norm_offset():
    """Gemma's RMSNorm multiplies by (1 + w): folding as if it were w changes the model."""
    g = torch.Generator().manual_seed(1)
    model = tiny_model("gemma")
    randomize_norms(model, g)
    ids = torch.randint(0, 128, (1, 8), generator=g)
    with torch.inference_mode():
        before = model(ids).logits
        s = torch.full((64,), 3.0, dtype=torch.float64)
        fold_into_layer_(model.model.layers[0], ARCH_SMOOTHING["gemma"].mappings[0], s, 0.0)
        assert (model(ids).logits - before).abs().max() > 1e-3


def test_formula_at_alpha_0_and_1():
    act = torch.tensor([4.0, 0.5, 0.0, 2.0])
    w = torch.tensor([0.5, 2.0, 1.0, 0.0])
    torch.testing.assert_close(smoothing_factors(act, w, 1.0), torch.tensor([4.0, 0.5, 1.0, 2.0]))
    # alpha 0 still divides by max|W| (it is not "no smoothing"); a dead column is floored
    torch.testing.assert_close(smoothing_factors(act, w, 0.0),
                               torch.tensor([2.0, 0.5, 1.0, 1e5]))
    torch.testing.assert_close(smoothing_factors(act, w, 0.5),
                               (act / w.clamp(min=1e-5)).sqrt().where(act > 0, torch.ones(4)))
    with pytest.raises(ValueError, match="alpha"):
        smoothing_factors(act, w, 1.5)


def test_search_alpha_returns_the_grid_minimum():
    from q.plugins.schemes.smoothquant import SmoothQuantScheme

    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=g)
    x[:, 3] *= 60  # an outlier channel, as in real LLM activations
    w = [torch.randn(32, 64, generator=g) * 0.05, torch.randn(16, 64, generator=g) * 0.05]
    act_q, w_q = SmoothQuantScheme().fake_quant({"quant_dtype": "int8"})
    score = linear_error(x, w, act_q, w_q)
    alpha, s, errors = search_alpha(score, x.abs().amax(0), column_abs_max(w))
    assert set(errors) == {i / 10 for i in range(11)}
    assert errors[alpha] == min(errors.values())
    assert alpha > 0 and errors[alpha] < errors[0.0]
    torch.testing.assert_close(s, smoothing_factors(x.abs().amax(0), column_abs_max(w), alpha))


def calib_text(tmp_path, words=6000):
    """Text the tiny word-level tokenizer reads as real tokens ("w0".."w509")."""
    path = tmp_path / "calib.txt"
    g = torch.Generator().manual_seed(0)
    path.write_text(" ".join(f"w{int(i)}" for i in torch.randint(0, 510, (words,), generator=g)))
    return path


def save_tiny(model_type: str, path):
    """A tiny random checkpoint of ``model_type`` (bf16) with the word-level tokenizer."""
    from transformers import AutoModelForCausalLM

    from .conftest import save_tiny_tokenizer

    cfg = tiny_config(model_type)
    cfg.vocab_size = 512
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    randomize_norms(model, torch.Generator().manual_seed(0))
    model.to(torch.bfloat16).save_pretrained(path)
    save_tiny_tokenizer(path, 512)
    return path


DENSE = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"]
MOE = ["mixtral", "qwen2_moe", "qwen3_moe"]


@pytest.mark.parametrize("model_type", DENSE + MOE)
def test_statistics_match_a_full_model_computation(model_type, tmp_path):
    """Layer by layer == hooks on the whole fp32 transformers model, for every Linear.

    MoE checkpoints as transformers saves them hold one tensor per expert; calibration
    fuses them the way transformers' loading does (q.moe_experts), so the layer outputs and
    hence the next layers' statistics match."""
    from transformers import AutoModelForCausalLM

    from q.calibration import run_layers

    model_dir = save_tiny(model_type, tmp_path / model_type)
    ids = torch.randint(0, 512, (6, 24), generator=torch.Generator().manual_seed(0))
    ours = {}
    run_layers(ModelSource(model_dir), ids,
               lambda lc: ours.update({f"{lc.prefix}.{k}": v for k, v in lc.act_max.items()}),
               batch_tokens=48)  # 2 windows per batch: the running max spans batches
    full = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    theirs, hooks = {}, []
    for name, mod in full.named_modules():
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            hooks.append(mod.register_forward_pre_hook(
                lambda m, a, name=name: theirs.__setitem__(
                    name, a[0].reshape(-1, a[0].shape[-1]).abs().amax(0))))
    with torch.inference_mode():
        full(ids)
    assert sorted(ours) == sorted(theirs)
    if model_type in DENSE:
        assert len(ours) == 2 * 7
    else:  # q, k, v, o (+ shared expert); the fused experts are not Linears
        assert len(ours) >= 2 * 4
    for name, amax in theirs.items():
        torch.testing.assert_close(ours[name], amax, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("model_type", ["qwen3", "gemma2"])
def test_alpha_auto_on_sliding_window_models(model_type, tmp_path):
    """The block score runs attention on a slice of the batch: masks are cut to match."""
    model_dir = save_tiny(model_type, tmp_path / model_type)
    out = tmp_path / "sq"
    with pytest.warns(CalibrationWarning):
        q.quantize(model_dir, "smoothquant", out, args={"alpha": "auto"},
                   calib=str(calib_text(tmp_path)), calib_samples=8, calib_seqlen=256,
                   progress=False)
    alphas = json.loads((out / "q_manifest.json").read_text())["calibration"]["alphas"]
    assert len(alphas) == 4


def test_calibrated_factors_follow_alpha(tiny_llama, tmp_path):
    model_dir = tiny_llama()
    source = ModelSource(model_dir)
    the_plan = q.plan(model_dir, "w8a8-int8")
    with pytest.warns(CalibrationWarning):
        data = load_calibration(model_dir, str(calib_text(tmp_path)), 4, 32)
    stats = {}
    from q.calibration import run_layers

    run_layers(source, data.input_ids, lambda lc: stats.update(lc.act_max))
    for alpha in (0.0, 1.0):
        smoothing = plan_smoothing(source, the_plan.entries, ARCH_SMOOTHING["llama"])
        calibrate_smoothing(smoothing, source, data.input_ids, alpha)
        s = smoothing.scales["model.layers.0.input_layernorm"]
        if alpha == 1.0:
            torch.testing.assert_close(s, stats["self_attn.q_proj"].clamp(min=1e-5))
        else:
            w = [source.read(f"model.layers.0.self_attn.{p}_proj.weight").float() for p in "qkv"]
            torch.testing.assert_close(s, 1 / column_abs_max(w))


def sq_quantize(model_dir, out, tmp_path, **kwargs):
    with pytest.warns(CalibrationWarning):  # a tiny calibration set is a warning, not an error
        return q.quantize(model_dir, "smoothquant", out, calib=str(calib_text(tmp_path)),
                          calib_samples=8, calib_seqlen=64, progress=False, **kwargs)


def test_int8_checkpoint_is_llm_compressor_w8a8(tiny_llama, tmp_path):
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme
    from transformers import CompressedTensorsConfig

    from .test_formats_interop import q_dequantized, transformers_weights

    model_dir = tiny_llama()
    out = tmp_path / "sq"
    result = sq_quantize(model_dir, out, tmp_path)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(cfg)
    preset = preset_name_to_scheme("W8A8", ["Linear"])
    group = parsed.config_groups["group_0"]
    assert group.weights == preset.weights
    assert group.input_activations == preset.input_activations
    assert cfg["format"] == group.format == "int-quantized" and cfg["ignore"] == ["lm_head"]
    tensors = load_file(out / "model.safetensors")
    assert tensors["model.layers.0.mlp.up_proj.weight"].dtype == torch.int8
    assert tensors["model.layers.0.mlp.up_proj.weight_scale"].shape == (384, 1)
    theirs = transformers_weights(out, quantization_config=CompressedTensorsConfig(dequantize=True))
    for name, w in q_dequantized(out).items():
        assert_bitwise_equal(theirs[name], w, name)
    # the smoothed norms are written (changed from the original) and load as written
    orig = load_file(model_dir / "model.safetensors")
    norm = "model.layers.0.input_layernorm.weight"
    assert not torch.equal(tensors[norm], orig[norm])
    assert_bitwise_equal(theirs[norm], tensors[norm], norm)
    alphas = result.manifest["calibration"]
    assert alphas["alpha"] == 0.5 and alphas["mappings"] == 2 and alphas["tokens"] == 512


def test_smoothed_checkpoint_computes_the_original_function(tiny_llama, tmp_path):
    """The quantized model tracks the float one (engine, int8 activations included)."""
    from transformers import AutoModelForCausalLM

    model_dir = tiny_llama(layers=2)
    out = tmp_path / "sq"
    sq_quantize(model_dir, out, tmp_path, args={"alpha": "auto"})
    session = q.load_engine(out, dtype="float32")
    assert len(session.report.quantized) == 14
    ids = torch.randint(0, 500, (1, 24), generator=torch.Generator().manual_seed(0))
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        want, got = ref(ids).logits, session.prompt_logits(ids[0].tolist())[None]
    assert sqnr(want, got) > 20
    alphas = json.loads((out / "q_manifest.json").read_text())["calibration"]["alphas"]
    assert len(alphas) == 4 and all(a in [i / 10 for i in range(11)] for a in alphas.values())


@pytest.mark.parametrize("dtype", ["int8", "fp8"])
def test_lmdeploy_layout_round_trips(tiny_llama, tmp_path, dtype):
    from types import SimpleNamespace

    from .test_formats_interop import q_dequantized

    model_dir = tiny_llama()
    lm = tmp_path / "lm"
    sq_quantize(model_dir, lm, tmp_path, format="lmdeploy", args={"quant_dtype": dtype})
    cfg = json.loads((lm / "config.json").read_text())["quantization_config"]
    name = {"int8": "int8", "fp8": "float8_e4m3fn"}[dtype]
    assert cfg == {"quant_method": "smooth_quant", "quant_dtype": name,
                   "modules_to_not_convert": ["lm_head"]}
    tensors = load_file(lm / "model.safetensors")
    w = tensors["model.layers.0.self_attn.o_proj.weight"]
    s = tensors["model.layers.0.self_attn.o_proj.scale"]
    assert w.dtype == getattr(torch, name) and w.shape == (256, 256)
    assert s.dtype == torch.float32 and s.shape == (256, 1)
    assert "model.layers.0.self_attn.o_proj.weight_scale" not in tensors
    lmdeploy_config = pytest.importorskip("lmdeploy.pytorch.config")
    parsed = lmdeploy_config.QuantizationConfig.from_config(
        SimpleNamespace(quantization_config=cfg))
    assert parsed.quant_method == "smooth_quant" and parsed.quant_dtype == getattr(torch, name)
    assert parsed.get_quant_method("model.layers.0.self_attn.q_proj") == "smooth_quant"
    assert parsed.get_quant_method("lm_head") is None
    # q reads it back, and exports it to compressed-tensors without re-quantizing
    ct = q.export(lm, "vllm", tmp_path / "ct").output
    ours, back = q_dequantized(lm), q_dequantized(ct)
    assert len(ours) == 7
    for k, v in ours.items():
        assert_bitwise_equal(back[k], v, k)
    assert q.load_engine(lm).report.format == "lmdeploy"


def test_lmdeploy_skip_list_uses_its_fused_names(tmp_path):
    """Kept q/k/v: LMDeploy's own config must leave its fused qkv_proj and the norm that
    feeds it unquantized (Qwen3 is built with module prefixes), and quantize the rest."""
    from types import SimpleNamespace

    lmdeploy_config = pytest.importorskip("lmdeploy.pytorch.config")
    model_dir = save_tiny("qwen3", tmp_path / "qwen3")
    out = tmp_path / "lm"
    sq_quantize(model_dir, out, tmp_path, format="lmdeploy",
                ignore=["model.layers.0.self_attn.q_proj"])
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    parsed = lmdeploy_config.QuantizationConfig.from_config(
        SimpleNamespace(quantization_config=cfg))
    for prefix, kind in [("model.layers.0.self_attn.qkv_proj", "linear"),
                         ("model.layers.0.input_layernorm", "norm")]:
        assert parsed.get_quant_method(prefix, module_kind=kind) is None, prefix
    for prefix, kind in [("model.layers.1.self_attn.qkv_proj", "linear"),
                         ("model.layers.0.mlp.gate_up_proj", "linear"),
                         ("model.layers.0.self_attn.o_proj", "linear"),
                         ("model.layers.0.post_attention_layernorm", "norm"),
                         ("model.layers.1.input_layernorm", "norm")]:
        assert parsed.get_quant_method(prefix, module_kind=kind) == "smooth_quant", prefix
    tensors = load_file(out / "model.safetensors")
    assert tensors["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16


def test_lmdeploy_warns_where_it_ignores_the_skip_list(tiny_llama, tmp_path):
    with pytest.warns(UserWarning, match="will not load there"):
        sq_quantize(tiny_llama(), tmp_path / "lm", tmp_path, format="lmdeploy",
                    ignore=["model.layers.0.mlp.down_proj"])


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_eval_layer_errors_undo_the_smoothing(model_type, tmp_path, monkeypatch):
    """q eval's isolated layer error feeds a smoothed consumer x / s, as the model does:
    without that, every q/k/v/gate/up looks broken (factor-sized errors)."""
    ev = sys.modules["q.evaluate"]  # the package attribute is the function

    model_dir = save_tiny(model_type, tmp_path / model_type)
    out = tmp_path / "sq"
    sq_quantize(model_dir, out, tmp_path)
    tiny = dict(text=str(calib_text(tmp_path)), windows=2, window_len=32, generations=0,
                progress=False)
    report = ev.evaluate(out, reference=model_dir, **tiny)
    smoothed = [e for e in report.layers if e.name.rsplit(".", 1)[-1] in
                ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")]
    assert smoothed and max(e.isolated for e in smoothed) < 0.05, smoothed
    assert not report.broken
    monkeypatch.setattr(ev, "_smoothing_factors", lambda session, norms: {})
    naive = ev.evaluate(out, reference=model_dir, **tiny)
    assert max(e.isolated for e in naive.layers) > 10 * max(e.isolated for e in smoothed)


def test_plain_w8a8_is_data_free(tiny_llama, tmp_path):
    from transformers import CompressedTensorsConfig

    from .test_formats_interop import q_dequantized, transformers_weights

    out = tmp_path / "w8a8"
    result = q.quantize(tiny_llama(), "w8a8-int8", out, progress=False)
    assert result.plan.counts() == {"quantize": 7, "skip": 1, "copy": 4}
    assert "calibration" not in result.manifest
    theirs = transformers_weights(out, quantization_config=CompressedTensorsConfig(dequantize=True))
    for name, w in q_dequantized(out).items():
        assert_bitwise_equal(theirs[name], w, name)
    with pytest.raises(OptionError, match="data-free"):
        q.plan(tiny_llama(), "w8a8-int8", calib="botchan")


def test_cli_smoothquant(tiny_llama, tmp_path):
    from click.testing import CliRunner

    from q.cli import _build

    txt = calib_text(tmp_path)
    args = ["quantize", str(tiny_llama()), "--scheme", "smoothquant", "--quant-dtype", "int8",
            "--calib", str(txt), "--calib-samples", "4", "--calib-seqlen", "32", "--alpha", "auto"]
    dry = CliRunner().invoke(_build(), [*args, "--dry-run"], catch_exceptions=False)
    assert dry.exit_code == 0 and "rewrite" in dry.output and "warning: calibrating" in dry.output
    res = CliRunner().invoke(_build(), [*args, "--format", "lmdeploy", "-o", str(tmp_path / "o")],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "calibrated on 4 x 32 tokens" in res.output
    assert json.loads((tmp_path / "o" / "q_recipe.json").read_text())["data"]["args"] == \
        {"quant_dtype": "int8", "alpha": "auto"}
    with pytest.raises(OptionError, match="--alpha"):
        CliRunner().invoke(_build(), [*args[:-1], "lots", "--dry-run"], catch_exceptions=False)


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("content,match", [
    (b"", "is empty"),
    (b"   \n\n  ", "is empty"),
    (b"w1 w2 w3", "has only 3 tokens"),
    ("w1 caf\u00e9 w2".encode("latin-1"), r"not UTF-8 \(byte 0xe9 at offset 6\)"),
], ids=["empty", "blank", "too-short", "latin1"])
def test_bad_calibration_text(tiny_llama, tmp_path, content, match):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(QError, match=match):
        q.plan(tiny_llama(), "smoothquant", calib=str(path), calib_seqlen=16)


@pytest.mark.parametrize("lines,match", [
    (['{"text": "w1 w2"}', '{"prompt": "w1"}'], ":2: a calibration record needs a 'text' string "
    "or a 'messages' list; found: prompt"),
    (['{"text": "w1"}', "not json"], ":2: not a JSON object"),
], ids=["no-text-field", "not-json"])
def test_bad_jsonl(tiny_llama, tmp_path, lines, match):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines))
    with pytest.raises(QError, match=match):
        q.plan(tiny_llama(), "smoothquant", calib=str(path))


def test_jsonl_messages_use_the_chat_template(tiny_llama, tmp_path):
    from transformers import AutoTokenizer

    model_dir = tiny_llama()
    folder = tmp_path / "data"
    folder.mkdir()
    record = {"messages": [{"role": "w5", "content": " ".join(["w7"] * 40)}]}
    (folder / "a.jsonl").write_text(json.dumps(record) + "\n\n")
    with pytest.warns(CalibrationWarning):
        data = load_calibration(model_dir, str(folder), 1, 16)
    tok = AutoTokenizer.from_pretrained(model_dir)
    want = tok(tok.apply_chat_template(record["messages"], tokenize=False),
               add_special_tokens=False).input_ids[:16]
    assert data.input_ids.tolist() == [want]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(QError, match="no .txt or .jsonl"):
        load_calibration(model_dir, str(empty), 1, 16)


def test_unknown_calibration_source(tiny_llama):
    with pytest.raises(OptionError, match="not a built-in corpus"):
        q.plan(tiny_llama(), "smoothquant", calib="no-such-corpus")


def test_architecture_without_mapping(tmp_path):
    model = write_safetensors(tmp_path / "gpt2", {"h.0.mlp.c_fc.weight": torch.ones(8, 8)},
                              {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(IncompatibleError, match="no smoothing mapping for 'GPT2LMHeadModel'.*"
                       "w8a8-int8"):
        q.plan(model, "smoothquant")


@pytest.mark.parametrize("model_type", MOE)
def test_moe_smoothquant_end_to_end(model_type, tmp_path):
    """Per-expert checkpoints calibrate; attention is smoothed, experts quantized, routers
    and norms of the MLP left as they were."""
    from q.source import ModelSource as Source

    model_dir = save_tiny(model_type, tmp_path / model_type)
    with pytest.warns(CalibrationWarning):
        result = q.quantize(model_dir, "smoothquant", tmp_path / "sq",
                            calib=str(calib_text(tmp_path)), calib_samples=4,
                            calib_seqlen=64, progress=False)
    out, src = Source(result.output), Source(model_dir)
    experts = [n for n in src.tensors if ".experts.0." in n and n.endswith(".weight")]
    assert experts and all(out.info(n).dtype == torch.int8 for n in experts), experts
    routers = [n for n in src.tensors if re.search(r"\.(mlp|block_sparse_moe)\.gate\.weight$", n)]
    assert routers and all(torch.equal(out.read(n), src.read(n)) for n in routers)
    post = [n for n in src.tensors if n.endswith("post_attention_layernorm.weight")]
    assert all(torch.equal(out.read(n), src.read(n)) for n in post)
    pre = [n for n in src.tensors if n.endswith("input_layernorm.weight")]
    assert not any(torch.equal(out.read(n), src.read(n)) for n in pre)  # smoothed


def test_nan_in_activations_names_the_layer(tiny_llama, tmp_path):
    import shutil

    model_dir = tmp_path / "overflow"
    shutil.copytree(tiny_llama(layers=2), model_dir)
    tensors = load_file(model_dir / "model.safetensors")
    # finite bf16 weights whose products overflow fp32: inf enters down_proj of layer 1
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.full((384, 256), 3e38).bfloat16()
    save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(BadTensorError, match="entering 'model.layers.1.mlp.down_proj'.*NaN or "
                       "Inf"):
        sq_quantize(model_dir, tmp_path / "o", tmp_path)
    assert not (tmp_path / "o").exists()


def test_bad_alpha_and_dtype(tiny_llama):
    with pytest.raises(OptionError, match="alpha"):
        q.plan(tiny_llama(), "smoothquant", args={"alpha": 1.5})
    with pytest.raises(OptionError, match="quant_dtype"):
        q.plan(tiny_llama(), "smoothquant", args={"quant_dtype": "int4"})


def test_online_smoothquant_is_refused(tiny_llama):
    """The engine's online quantization has no calibration data: no silent plain W8A8."""
    with pytest.raises(IncompatibleError, match="needs calibration data.*w8a8-int8"):
        q.load_engine(tiny_llama(), scheme="smoothquant")


def test_smoothing_transform_refuses_to_write_uncalibrated(tiny_llama):
    source = ModelSource(tiny_llama())
    smoothing: Smoothing = plan_smoothing(source, q.plan(tiny_llama(), "w8a8-int8").entries,
                                          ARCH_SMOOTHING["llama"])
    name = "model.layers.0.input_layernorm.weight"
    assert smoothing.apply(name, source.meta(name)).shape == (256,)
    with pytest.raises(RuntimeError, match="calibrate first"):
        smoothing.apply(name, source.read(name))
