"""The commands a user types, end to end on a tiny model."""

from __future__ import annotations

import json
import shutil

import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import q
from q.cli import _build

CLI = _build()


def invoke(*args):
    result = CliRunner().invoke(CLI, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


def with_side_files(model, tmp_path):
    """A copy of the tiny model with tokenizer, chat template and generation config."""
    dst = tmp_path / "model"
    shutil.copytree(model, dst)
    (dst / "tokenizer.json").write_text('{"version": "1.0"}')
    (dst / "chat_template.jinja").write_text("{{ messages }}")
    (dst / "generation_config.json").write_text('{"do_sample": false}')
    return dst


def test_quantize_inspect_export_dequantize(tiny_llama, tmp_path):
    model = with_side_files(tiny_llama(), tmp_path)
    code, out = invoke("quantize", model, "--scheme", "fp8-block", "-o", tmp_path / "fp8")
    assert code == 0, out
    assert "plan: fp8-block -> hf-fp8" in out and "wrote" in out
    for f in ("tokenizer.json", "chat_template.jinja", "generation_config.json",
              "q_recipe.json", "q_manifest.json", "config.json", "model.safetensors"):
        assert (tmp_path / "fp8" / f).exists(), f
    manifest = json.loads((tmp_path / "fp8" / "q_manifest.json").read_text())
    assert manifest["counts"] == {"quantize": 7, "skip": 1, "copy": 4}
    lm_head = next(t for t in manifest["tensors"] if t["name"] == "lm_head.weight")
    assert lm_head["action"] == "skip" and "output head" in lm_head["reason"]

    code, out = invoke("inspect", tmp_path / "fp8", "--json")
    report = json.loads(out)
    assert report["format"] == "hf-fp8" and len(report["layers"]) == 7
    assert report["layers"][0]["scale_dtype"] == "float32"

    code, out = invoke("export", tmp_path / "fp8", "--format", "vllm", "-o", tmp_path / "ct")
    assert code == 0, out
    assert q.inspect(tmp_path / "ct")["format"] == "compressed-tensors"

    code, out = invoke("dequantize", tmp_path / "ct", "-o", tmp_path / "bf16")
    assert code == 0, out
    plain = load_file(tmp_path / "bf16" / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in plain.values())
    cfg = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert (tmp_path / "bf16" / "tokenizer.json").exists()


def test_dry_run_writes_nothing_and_lists_every_tensor(tiny_llama, tmp_path):
    code, out = invoke("quantize", tiny_llama(), "--scheme", "wint4", "--group-size", "64",
                       "--dry-run", "--json")
    assert code == 0, out
    plan = json.loads(out)
    assert len(plan["tensors"]) == 12
    down = next(t for t in plan["tensors"] if t["name"].endswith("down_proj.weight"))
    assert down["action"] == "quantize"
    assert down["outputs"]["model.layers.0.mlp.down_proj.weight_packed"] == ["int32", [256, 48]]
    assert down["out_bytes"] < down["in_bytes"] / 3
    assert not list(tmp_path.iterdir())


def test_plugins_lists_builtins_with_owner():
    code, out = invoke("plugins", "--json")
    rows = {(r["kind"], r["name"]): r for r in json.loads(out)}
    assert rows[("scheme", "fp8-block")]["distribution"] == "q-quant"
    assert rows[("format", "compressed-tensors")]["aliases"] == ["vllm", "ct", "llm-compressor"]
    assert "Qwen3-MoE" in rows[("engine", "native")]["moe"]
    assert "expert parallelism" in rows[("engine", "vllm")]["moe"]
    assert rows[("scheme", "fp8-block")]["moe"] == ""
    code, out = invoke("plugins")
    assert code == 0 and "MoE models, per engine" in out and "DeepSeek-V3" in out


def test_extra_args_reach_the_scheme(tiny_llama, tmp_path):
    code, out = invoke("quantize", tiny_llama(), "--scheme", "wint8", "--arg", "group_size=128",
                       "-o", tmp_path / "o")
    assert code == 0, out
    assert q.inspect(tmp_path / "o")["layers"][0]["granularity"] == "group"


def test_reads_deepseek_style_checkpoint(tmp_path):
    """DeepSeek-V3's own layout: no skip list, fp32 weight_scale_inv; and e8m0 scales."""
    torch.manual_seed(0)
    w = torch.randn(256, 384)
    qw = (w * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    for scale_dtype in (torch.float32, torch.float8_e8m0fnu):
        d = tmp_path / str(scale_dtype)
        d.mkdir()
        scale = torch.full((2, 3), 0.01).to(scale_dtype)
        save_file({"model.layers.0.mlp.up_proj.weight": qw,
                   "model.layers.0.mlp.up_proj.weight_scale_inv": scale,
                   "model.norm.weight": torch.ones(256, dtype=torch.bfloat16)},
                  str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps({"model_type": "deepseek_v3", "quantization_config": {
            "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
            "weight_block_size": [128, 128]}}))
        out = q.dequantize(d, tmp_path / f"out-{scale_dtype}").output
        got = load_file(out / "model.safetensors")["model.layers.0.mlp.up_proj.weight"]
        expected = (qw.float() * scale.float()[0, 0]).bfloat16()
        assert torch.equal(got, expected), scale_dtype
