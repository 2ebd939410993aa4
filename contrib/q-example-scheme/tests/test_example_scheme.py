"""Tests for q-example-scheme: discovery through real entry points, numerics, end to end.

Run after `pip install -e contrib/q-example-scheme` (discovery needs the installed metadata):
    python -m pytest contrib/q-example-scheme/tests -q
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import q
import q_example_scheme
from q.plugin_manager import make_plugin_manager, plugin_distribution
from q.registry import Registries

SCHEME = "wint8-rowmax-example"
PLUGIN = "q-example-scheme"  # the entry point name (pyproject.toml), i.e. the plugin's name
DIST = "q-example-scheme"  # the distribution name


@pytest.fixture(autouse=True)
def _all_plugins(monkeypatch):
    monkeypatch.delenv("Q_LOAD_PLUGINS", raising=False)  # a caller's filter must not hide us


def q_cli() -> str:
    """The `q` console script of the interpreter running the tests (q has no __main__)."""
    found = shutil.which("q", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail(f"no `q` console script next to {sys.executable}; pip install q-quant")
    return found


# --- (a) discovery ------------------------------------------------------------------------


def test_discovered_through_entry_points():
    pm = make_plugin_manager()  # load="all": every installed q.plugins entry point
    regs = Registries.from_pm(pm)
    assert SCHEME in regs.schemes.names()
    assert regs.schemes.owner(SCHEME) == PLUGIN
    assert plugin_distribution(pm, PLUGIN) == DIST
    assert isinstance(regs.schemes.get(SCHEME), q_example_scheme.RowmaxInt8Scheme)
    # the alias, and q's name normalization (case, "_" and spaces)
    assert regs.schemes.resolve("example-int8") == SCHEME
    assert regs.schemes.resolve("WINT8_Rowmax example") == SCHEME


def test_q_load_plugins_can_exclude_it(monkeypatch):
    monkeypatch.setenv("Q_LOAD_PLUGINS", "q-quant")  # q itself is always loaded
    assert SCHEME not in Registries.from_pm(make_plugin_manager()).schemes
    monkeypatch.setenv("Q_LOAD_PLUGINS", f"q-quant,{DIST}")
    assert SCHEME in Registries.from_pm(make_plugin_manager()).schemes


def test_registered_in_process_without_installing():
    """How to unit-test a plugin module without entry points: pass it as ``extra``."""
    pm = make_plugin_manager(load="builtin", extra=[("my-plugin", q_example_scheme)])
    regs = Registries.from_pm(pm)
    assert regs.schemes.owner(SCHEME) == "my-plugin"
    assert plugin_distribution(pm, "my-plugin") == "(registered in-process)"


def test_q_plugins_cli_lists_it():
    out = subprocess.run([q_cli(), "plugins", "--json"], capture_output=True, text=True,
                         check=True)
    rows = [r for r in json.loads(out.stdout) if r["kind"] == "scheme" and r["name"] == SCHEME]
    assert len(rows) == 1, out.stdout
    assert rows[0]["distribution"] == DIST
    assert rows[0]["plugin"] == PLUGIN
    assert rows[0]["aliases"] == ["example-int8"]


# --- (b) numerics -------------------------------------------------------------------------


def reference(w: torch.Tensor, scale_dtype: torch.dtype):
    """The scheme's spec in numpy float64, written independently of the plugin."""
    w64 = w.double().numpy()
    amax = np.abs(w64).max(axis=1, keepdims=True)
    scale = np.where(amax == 0, 1.0, amax / 127.0)
    scale = torch.from_numpy(scale).to(scale_dtype)  # numpy has no bf16: round in torch
    codes = np.clip(np.rint(w64 / scale.double().numpy()), -127, 127)  # rint: half to even
    return torch.from_numpy(codes).to(torch.int8), scale


def sqnr_db(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    w, err = w.double(), w.double() - w_hat.double()
    return float(10 * torch.log10(w.pow(2).sum() / err.pow(2).sum()))


@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float32])
def test_numerics_bit_exact_and_sqnr(w_dtype, scale_dtype):
    scheme = q_example_scheme.RowmaxInt8Scheme()
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(384, 1024, generator=g) * 0.02).to(w_dtype)
    w[5] = 0  # an all-zero row gets scale 1
    w[7, 3] = 0.5  # an outlier row
    args = scheme.validate_args({})
    qt = scheme.quantize_weight("layer.weight", w, args, scale_dtype)

    assert qt.qdata.dtype == torch.int8 and qt.bits == 8 and qt.qdtype == "int8"
    assert qt.granularity == "channel" and tuple(qt.block_size) == (1, 1024)
    assert qt.scale.shape == (384, 1) and qt.scale.dtype == scale_dtype
    assert qt.orig_dtype == w_dtype
    assert int(qt.qdata.abs().max()) <= 127
    assert int(qt.qdata.min()) >= -127
    codes, scale = reference(w, scale_dtype)
    assert torch.equal(qt.qdata, codes)
    assert torch.equal(qt.scale, scale)
    assert qt.scale[5].item() == 1.0 and not qt.qdata[5].any()
    assert sqnr_db(w, qt.dequantize(torch.float32)) > scheme.min_sqnr_db >= 38.0


def test_rounding_is_half_to_even():
    scheme = q_example_scheme.RowmaxInt8Scheme()
    w = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 126.5]])  # scale is exactly 1
    qt = scheme.quantize_weight("w", w, {}, torch.float32)
    assert qt.qdata.tolist() == [[127, 0, 2, 2, 0, -2, 126]]


def test_meta_tensors_plan_shapes():
    scheme = q_example_scheme.RowmaxInt8Scheme()
    w = torch.empty(384, 256, dtype=torch.bfloat16, device="meta")
    qt = scheme.quantize_weight("w", w, {}, torch.bfloat16)
    assert qt.qdata.is_meta and qt.qdata.shape == (384, 256) and qt.qdata.dtype == torch.int8
    assert qt.scale.shape == (384, 1) and qt.scale.dtype == torch.bfloat16


def test_nan_rows_give_nan_scales():
    """q refuses a weight whose scales are not finite; a NaN must not hide behind scale 1."""
    scheme = q_example_scheme.RowmaxInt8Scheme()
    w = torch.randn(4, 8)
    w[1, 3] = float("nan")
    qt = scheme.quantize_weight("w", w, {}, torch.bfloat16)
    assert torch.isnan(qt.scale[1]).all() and torch.isfinite(qt.scale[[0, 2, 3]]).all()


def test_unknown_options_are_refused():
    with pytest.raises(q.errors.OptionError, match="does not take group_size"):
        q_example_scheme.RowmaxInt8Scheme().validate_args({"group_size": 128})


# --- (c) end to end -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=256, intermediate_size=384, num_attention_heads=4, num_key_value_heads=2,
        head_dim=64, num_hidden_layers=1, vocab_size=512)
    path = tmp_path_factory.mktemp("tiny-llama")
    transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    return path


LINEARS = {f"model.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")} | {
    f"model.layers.0.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")}


def test_quantize_to_compressed_tensors(tiny_llama, tmp_path):
    out = tmp_path / "out"
    # the format maps the scheme's storage spec (int8 per channel, weight-only), not its name
    q.quantize(tiny_llama, SCHEME, out, format="compressed-tensors", progress=False)

    report = q.inspect(out)
    assert report["format"] == "compressed-tensors"
    assert report["recipe"]["data"]["scheme"] == SCHEME
    layers = {layer["module"]: layer for layer in report["layers"]}
    assert set(layers) == LINEARS  # lm_head and embeddings stay bf16
    for layer in layers.values():
        assert layer["qdtype"] == "int8" and layer["granularity"] == "channel"
        assert layer["scale_shape"] == [layer["shape"][0], 1]

    # the CLI reaches the same scheme by its alias
    cli_out = tmp_path / "cli-out"
    subprocess.run([q_cli(), "quantize", str(tiny_llama), "--scheme", "example-int8",
                    "--format", "compressed-tensors", "-o", str(cli_out), "--no-progress"],
                   check=True, capture_output=True, text=True)
    assert {layer["module"] for layer in q.inspect(cli_out)["layers"]} == LINEARS
