"""What q writes loads in the real peers with the weights q says it wrote; what the peers
write, q reads back exactly. Config JSON validates with compressed-tensors' own models."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import q
from q.source import ModelSource
from q.testing import assert_bitwise_equal

CT_CASES = [
    ("fp8-dynamic", {}), ("fp8-tensor", {}), ("fp8-block", {}), ("wint8", {}),
    ("wint4", {"group_size": 128}), ("wint4", {}), ("wint8", {"group_size": 64}),
    ("wint4", {"group_size": 32, "symmetric": False}),
    ("wint4", {"group_size": 64, "range": "restricted"}),
]


def q_decoded(out_dir) -> dict:
    """q's own view of the weights it wrote: reader -> QuantizedTensor per weight name."""
    source = ModelSource(out_dir)
    _, reader = q.detect_format(source)
    return {f"{m}.weight": reader.decode(m, {n: source.read(n) for n in names})
            for m, names in reader.quantized_modules().items()}


def q_dequantized(out_dir) -> dict[str, torch.Tensor]:
    return {name: qt.dequantize() for name, qt in q_decoded(out_dir).items()}


def transformers_weights(path, **kwargs) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, **kwargs)
    return {k: v.detach() for k, v in model.state_dict().items()}


def test_wint4_code_range(tiny_llama, tmp_path):
    """Default full range reaches code -8; range=restricted (Paddle) stays within +-7."""
    from q.errors import QError

    model = tiny_llama()
    lows = {}
    for rng in ("full", "restricted"):
        out = q.quantize(model, "wint4", tmp_path / rng, args={"group_size": 64, "range": rng},
                         progress=False).output
        codes = [qt.qdata for qt in q_decoded(out).values()]
        lows[rng] = min(int(c.min()) for c in codes)
        assert max(int(c.max()) for c in codes) == 7
    assert lows == {"full": -8, "restricted": -7}
    with pytest.raises(QError, match="range"):
        q.quantize(model, "wint4", tmp_path / "bad",
                   args={"symmetric": False, "range": "restricted"}, progress=False)


def test_hf_fp8_loads_in_transformers_exactly(tiny_llama, tmp_path):
    out = tmp_path / "fp8"
    result = q.quantize(tiny_llama(), "fp8-block", out)
    assert result.plan.counts()["quantize"] == 7
    theirs = transformers_weights(out)  # CPU: transformers dequantizes FP8 on load
    ours = q_dequantized(out)
    assert len(ours) == 7
    for name, w in ours.items():
        assert_bitwise_equal(theirs[name], w, name)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "fp8" and cfg["weight_block_size"] == [128, 128]
    assert cfg["activation_scheme"] == "dynamic" and cfg["modules_to_not_convert"] == ["lm_head"]


def test_doubling_scales_doubles_loaded_weights(tiny_llama, tmp_path):
    """Catches a wrong scale name: transformers would silently ignore an unknown one."""
    out = tmp_path / "fp8"
    q.quantize(tiny_llama(), "fp8-block", out)
    before = transformers_weights(out)
    tensors = load_file(out / "model.safetensors")
    scales = [k for k in tensors if k.endswith("weight_scale_inv")]
    assert scales
    for k in scales:
        tensors[k] = tensors[k] * 2
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    after = transformers_weights(out)
    for k in scales:
        w = k.replace("weight_scale_inv", "weight")
        assert_bitwise_equal(after[w], before[w] * 2, w)


@pytest.mark.parametrize("scheme,args", CT_CASES, ids=lambda v: str(v))
def test_compressed_tensors_loads_in_transformers_exactly(tiny_llama, tmp_path, scheme, args):
    from transformers import CompressedTensorsConfig

    out = tmp_path / "ct"
    q.quantize(tiny_llama(), scheme, out, format="vllm", args=args)
    theirs = transformers_weights(out, quantization_config=CompressedTensorsConfig(dequantize=True))
    ours = q_dequantized(out)
    assert len(ours) == 7
    for name, w in ours.items():
        assert_bitwise_equal(theirs[name], w, f"{scheme} {name}")


@pytest.mark.parametrize("scheme,args", CT_CASES, ids=lambda v: str(v))
def test_compressed_tensors_config_validates_with_ct(tiny_llama, tmp_path, scheme, args):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig

    out = tmp_path / "ct"
    q.quantize(tiny_llama(), scheme, out, format="vllm", args=args)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(cfg)
    group = cfg["config_groups"]["group_0"]
    QuantizationArgs.model_validate(group["weights"])  # extra="forbid": no stray keys
    if group["input_activations"]:
        QuantizationArgs.model_validate(group["input_activations"])
    assert parsed.quantization_status == "compressed"
    assert cfg["format"] == group["format"]
    assert cfg["ignore"] == ["lm_head"]


def ct_reference_checkpoint(model_dir, out_dir, preset):
    """A checkpoint written by compressed-tensors itself (the path llm-compressor saves by)."""
    from compressed_tensors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig, QuantizationStatus, apply_quantization_config, preset_name_to_scheme,
    )
    from compressed_tensors.quantization.utils import calculate_qparams
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    config = QuantizationConfig(config_groups={"group_0": preset_name_to_scheme(preset, ["Linear"])},
                                ignore=["lm_head"])
    apply_quantization_config(model, config)
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None or not hasattr(module, "weight_scale"):
            continue
        args = scheme.weights
        w = module.weight.detach().float()
        strategy = getattr(args.strategy, "value", args.strategy)
        if strategy == "group":
            wg = w.reshape(w.shape[0], -1, args.group_size)
            lo, hi = wg.amin(-1), wg.amax(-1)
        elif strategy == "channel":
            lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
        else:
            raise NotImplementedError(args.strategy)
        scale, zp = calculate_qparams(lo, hi, args)
        module.weight_scale.data = scale.to(module.weight_scale.dtype).reshape(module.weight_scale.shape)
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.data = zp.to(module.weight_zero_point.dtype).reshape(
                module.weight_zero_point.shape)
        module.quantization_status = QuantizationStatus.FROZEN
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(out_dir)
    compressor.update_config(out_dir)
    return out_dir


@pytest.mark.parametrize("preset", ["W4A16", "W8A16", "W4A16_ASYM", "FP8_DYNAMIC"])
def test_q_reads_what_compressed_tensors_writes(tiny_llama, tmp_path, preset):
    from transformers import CompressedTensorsConfig

    ckpt = ct_reference_checkpoint(tiny_llama(), tmp_path / "ct", preset)
    theirs = transformers_weights(ckpt, quantization_config=CompressedTensorsConfig(dequantize=True))
    ours = q_dequantized(ckpt)
    assert len(ours) == 7
    for name, w in ours.items():
        assert_bitwise_equal(w, theirs[name], f"{preset} {name}")
    # and q dequantize writes the same weights to disk
    plain = load_file(q.dequantize(ckpt, tmp_path / "bf16").output / "model.safetensors")
    for name, w in ours.items():
        assert_bitwise_equal(plain[name], w, name)


def test_export_hf_fp8_to_ct_and_back_is_lossless(tiny_llama, tmp_path):
    from transformers import CompressedTensorsConfig

    src = tmp_path / "fp8"
    q.quantize(tiny_llama(), "fp8-block", src)
    ct = q.export(src, "vllm", tmp_path / "ct").output
    back = q.export(ct, "hf-fp8", tmp_path / "back").output
    a, b = load_file(src / "model.safetensors"), load_file(back / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert_bitwise_equal(b[k], a[k], k)
    cfg = json.loads((ct / "config.json").read_text())["quantization_config"]
    assert cfg["config_groups"]["group_0"]["weights"]["scale_dtype"] == "torch.float32"
    theirs = transformers_weights(ct, quantization_config=CompressedTensorsConfig(dequantize=True))
    for name, w in q_dequantized(src).items():
        assert_bitwise_equal(theirs[name], w, name)


def test_vllm_block_rules_and_skip_list(tiny_llama, tmp_path):
    """vLLM's validate_fp8_block_shape, re-implemented: every quantized K % 128 == 0 and the
    out-dims of q, k and gate % 128 == 0; skipped fused groups are all-or-none."""
    out = tmp_path / "fp8"
    q.quantize(tiny_llama(intermediate=320), "fp8-block", out)
    tensors = load_file(out / "model.safetensors")
    skip = json.loads((out / "config.json").read_text())["quantization_config"][
        "modules_to_not_convert"]
    assert "lm_head" in skip
    assert {"model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj",
            "model.layers.0.mlp.down_proj"} <= set(skip)
    for name, t in tensors.items():
        if name.endswith(".weight") and t.dtype == torch.float8_e4m3fn:
            assert t.shape[1] % 128 == 0 and t.shape[0] % 128 == 0, name
            assert name[: -len(".weight")] not in skip
    for name in skip:  # full module names that exist in the checkpoint
        assert f"{name}.weight" in tensors or name == "lm_head"


def test_tied_embeddings_stay_tied(tiny_llama, tmp_path):
    out = tmp_path / "fp8"
    q.quantize(tiny_llama(tie=True), "fp8-block", out)
    names = load_file(out / "model.safetensors").keys()
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
