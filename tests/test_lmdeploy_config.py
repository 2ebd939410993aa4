"""LMDeploy's own config reader accepts what q writes, and skips exactly what q skipped.

LMDeploy matches skip entries by reversed substring (``prefix in entry``), so short entries
such as ``mlp.gate`` would not match ``model.layers.0.mlp.gate``; q writes full names
(formats.md 1.3). tests/run.sh installs lmdeploy without its GPU dependencies: only its
config module is exercised.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

import q

lmdeploy_config = pytest.importorskip(
    "lmdeploy.pytorch.config", reason="tests/run.sh installs lmdeploy (config module only)")


def lmdeploy_view(out_dir):
    cfg = json.loads((out_dir / "config.json").read_text())
    return lmdeploy_config.QuantizationConfig.from_config(
        SimpleNamespace(quantization_config=cfg["quantization_config"]))


def test_hf_fp8_skip_list_is_honoured(tiny_llama, tmp_path):
    out = tmp_path / "fp8"
    result = q.quantize(tiny_llama(intermediate=320), "fp8-block", out)
    qcfg = lmdeploy_view(out)
    assert qcfg.quant_method == "fp8" and qcfg.quant_dtype == torch.float8_e4m3fn
    assert list(qcfg.weight_block_size) == [128, 128]
    for entry in result.plan.entries:
        if entry.module is None:
            continue
        method = qcfg.get_quant_method(entry.module)
        expected = "fp8" if entry.action == "quantize" else None
        assert method == expected, (entry.module, entry.action, entry.reason)
    assert qcfg.get_quant_method("lm_head") is None


def test_compressed_tensors_wint4_g32_is_accepted(tiny_llama, tmp_path):
    out = tmp_path / "ct"
    q.quantize(tiny_llama(), "wint4", out, format="vllm", args={"group_size": 32})
    qcfg = lmdeploy_view(out)
    assert qcfg.quant_method == "compressed-tensors" and qcfg.bits == 4 and qcfg.group_size == 32
    assert qcfg.get_quant_method("lm_head") is None
    assert qcfg.get_quant_method("model.layers.0.mlp.down_proj") == "compressed-tensors"


@pytest.mark.parametrize("scheme,args,refusal", [
    ("fp8-dynamic", {}, "pack-quantized"),
    ("wint4", {"group_size": 128}, "expected 32"),
])
def test_lmdeploy_refuses_other_compressed_tensors_layouts(tiny_llama, tmp_path, scheme, args,
                                                           refusal):
    """Recorded peer behaviour (lmdeploy 0.18 PyTorch engine): only int4 group-32
    pack-quantized compressed-tensors loads; docs/formats.md says which format to pick."""
    out = tmp_path / "ct"
    q.quantize(tiny_llama(), scheme, out, format="vllm", args=args)
    with pytest.raises(ValueError, match=refusal):
        lmdeploy_view(out)
