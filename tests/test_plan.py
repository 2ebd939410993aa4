"""Planning rules: what is quantized, what is kept, and why."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from q.planning import build_entries, match_pattern
from q.recipe import QuantRecipe


def fake_source(shapes: dict[str, tuple], **config):
    tensors = {n: SimpleNamespace(shape=s, dtype=torch.bfloat16, nbytes=2 * torch.Size(s).numel())
               for n, s in shapes.items()}
    return SimpleNamespace(tensors=tensors, config=config)


def decisions(shapes, recipe=None, alignment=(1, 1), **config):
    entries = build_entries(fake_source(shapes, **config), recipe or QuantRecipe("x"), alignment)
    return {e.name: (e.action, e.reason) for e in entries}


L = "model.layers.0."


def test_default_rules():
    d = decisions({
        "model.embed_tokens.weight": (512, 256), L + "self_attn.q_proj.weight": (256, 256),
        L + "self_attn.q_proj.bias": (256,), L + "input_layernorm.weight": (256,),
        "lm_head.weight": (512, 256), L + "mlp.gate.weight": (8, 256),
        L + "mlp.gate_proj.weight": (384, 256), L + "mlp.shared_expert_gate.weight": (1, 256),
        "model.visual.blocks.0.attn.qkv.weight": (768, 256),
        "model.multi_modal_projector.linear_1.weight": (256, 256),
        L + "linear_attn.in_proj_ba.weight": (64, 256), "model.mtp.0.proj.weight": (256, 256),
        L + "mlp.experts.0.up_proj.weight": (384, 256),
    })
    assert d["model.embed_tokens.weight"] == ("copy", "embedding")
    assert d[L + "self_attn.q_proj.weight"][0] == "quantize"
    assert d[L + "self_attn.q_proj.bias"] == ("copy", "bias")
    assert d[L + "input_layernorm.weight"][0] == "copy"
    assert d["lm_head.weight"][0] == "skip" and "output head" in d["lm_head.weight"][1]
    assert d[L + "mlp.gate.weight"] == ("skip", "MoE router")
    assert d[L + "mlp.gate_proj.weight"][0] == "quantize"  # not mistaken for the router
    assert d[L + "mlp.shared_expert_gate.weight"][1] == "MoE shared-expert gate"
    assert d["model.visual.blocks.0.attn.qkv.weight"][1] == "vision/audio tower"
    assert d["model.multi_modal_projector.linear_1.weight"][1] == "multimodal projector"
    assert d[L + "linear_attn.in_proj_ba.weight"][1] == "linear-attention gate (GDN)"
    assert d["model.mtp.0.proj.weight"][1] == "multi-token-prediction head"
    assert d[L + "mlp.experts.0.up_proj.weight"][0] == "quantize"


@pytest.mark.parametrize("pattern,hit", [
    ("model.layers.0.mlp.down_proj", True), ("model.layers.0.mlp", False),
    ("*.down_proj", True), ("*.up_proj", False), ("re:.*layers\\.0\\.", True),
    ("re:layers", False),  # re: is anchored at the start, as compressed-tensors does
])
def test_match_pattern(pattern, hit):
    assert match_pattern(pattern, "model.layers.0.mlp.down_proj") is hit


def test_ignore_and_targets():
    shapes = {L + "mlp.down_proj.weight": (256, 384), L + "mlp.up_proj.weight": (384, 256),
              "lm_head.weight": (512, 256)}
    d = decisions(shapes, QuantRecipe("x", ignore=("*.down_proj",)))
    assert d[L + "mlp.down_proj.weight"] == ("skip", "--ignore *.down_proj")
    d = decisions(shapes, QuantRecipe("x", targets=("re:.*down_proj", "lm_head")))
    assert d[L + "mlp.down_proj.weight"][0] == "quantize"
    assert d[L + "mlp.up_proj.weight"] == ("skip", "not matched by --targets")
    assert d["lm_head.weight"][0] == "quantize"  # named explicitly: overrides the default rule


def test_tied_lm_head_is_never_quantized():
    d = decisions({"lm_head.weight": (512, 256)}, QuantRecipe("x", targets=("lm_head",)),
                  tie_word_embeddings=True)
    assert d["lm_head.weight"] == ("skip", "tied to the input embeddings")


def test_ragged_shapes_skip_by_default_and_quantize_on_request():
    shapes = {L + "mlp.down_proj.weight": (576, 1536), L + "mlp.up_proj.weight": (1536, 512)}
    d = decisions(shapes, alignment=(128, 128))
    assert d[L + "mlp.down_proj.weight"][0] == "skip" and "576x1536" in d[L + "mlp.down_proj.weight"][1]
    assert d[L + "mlp.up_proj.weight"][0] == "quantize"
    d = decisions(shapes, QuantRecipe("x", ragged="quantize"), alignment=(128, 128))
    assert d[L + "mlp.down_proj.weight"][0] == "quantize"


def test_fused_groups_share_one_decision():
    shapes = {L + "self_attn.q_proj.weight": (256, 256), L + "self_attn.k_proj.weight": (192, 256),
              L + "self_attn.v_proj.weight": (192, 256), L + "self_attn.o_proj.weight": (256, 256),
              L + "mlp.gate_proj.weight": (384, 256), L + "mlp.up_proj.weight": (384, 256)}
    d = decisions(shapes, alignment=(128, 128))
    assert d[L + "self_attn.k_proj.weight"][0] == "skip"
    assert d[L + "self_attn.q_proj.weight"][0] == "skip"
    assert "fused with" in d[L + "self_attn.q_proj.weight"][1]
    assert d[L + "self_attn.o_proj.weight"][0] == "quantize"
    assert d[L + "mlp.gate_proj.weight"][0] == "quantize"
    d = decisions(shapes, QuantRecipe("x", ignore=(L + "mlp.up_proj",)), alignment=(128, 128))
    assert d[L + "mlp.gate_proj.weight"][0] == "skip"


def test_recipe_round_trip_for_every_scheme(pm):
    from q.recipe import QuantRecipe
    from q.registry import Registries

    for name, entry in Registries.from_pm(pm).schemes:
        recipe = QuantRecipe(name, entry.obj.validate_args({}), ignore=("lm_head",))
        assert QuantRecipe.from_json(recipe.to_json()) == recipe, name


def test_recipe_refuses_newer_versions():
    from q.errors import CheckpointError

    data = QuantRecipe("fp8-block").to_dict()
    data["version"] = 99
    with pytest.raises(CheckpointError, match="newer"):
        QuantRecipe.from_dict(data)
    with pytest.raises(CheckpointError, match="not a QuantRecipe"):
        QuantRecipe.from_dict({"type": "Something"})


@pytest.mark.parametrize("shape", [(256, 384), (576, 1536), (13, 129)], ids=str)
def test_every_scheme_meets_its_sqnr_on_gaussian_weights(pm, shape):
    """Each registered scheme's default quantizer keeps the SQNR it promises (min_sqnr_db)."""
    from q.registry import Registries
    from q.testing import sqnr

    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)).bfloat16()
    for name, entry in Registries.from_pm(pm).schemes:
        scheme = entry.obj
        qt = scheme.quantize_weight("w", w, scheme.validate_args({}), torch.float32)
        assert sqnr(w.float(), qt.dequantize(torch.float32)) > scheme.min_sqnr_db, (name, shape)
