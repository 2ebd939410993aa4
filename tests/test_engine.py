"""The native engine on tiny in-process models: layers, loading, architectures, batching."""

from __future__ import annotations

import json
import logging

import pytest
import torch

import q
from q.errors import CheckpointError, IncompatibleError, OptionError
from q.generation import SamplingParams
from q.testing import assert_bitwise_equal, sqnr

from .engine_reference import engine_logits, greedy_transformers, transformers_reference

SCHEMES = [  # (scheme, args, ragged)
    ("fp8-block", None, "quantize"),
    ("fp8-dynamic", None, "skip"),
    ("fp8-tensor", None, "skip"),
    ("wint8", None, "skip"),
    ("wint4", {"group_size": 64}, "skip"),
    ("wint4", {"group_size": 32, "symmetric": False}, "skip"),
]
SCHEME_IDS = ["fp8-block", "fp8-dynamic", "fp8-tensor", "wint8", "wint4-g64", "wint4-asym"]


def _layer(scheme, args, w, acts_override=None):
    from q.api import make_recipe
    from q.plugins.engines.native.layers import QuantLinear

    recipe, scheme_obj, _ = make_recipe(scheme, args, ragged="quantize")
    qt = scheme_obj.quantize_weight("w", w, recipe.args, torch.float32)
    acts = recipe.input_activations if acts_override is None else acts_override
    return QuantLinear(qt, acts, None, torch.device("cpu"), name="w"), qt, recipe


@pytest.mark.parametrize("shape", [(256, 384), (200, 300)], ids=["aligned", "ragged"])
@pytest.mark.parametrize("scheme,args,ragged", SCHEMES, ids=SCHEME_IDS)
def test_quant_linear_matches_dequantized_matmul(scheme, args, ragged, shape):
    from .engine_reference import fake_quant_activation

    torch.manual_seed(0)
    w = torch.randn(shape) * 0.05
    x = torch.randn(7, shape[1])
    layer, qt, recipe = _layer(scheme, args, w)
    y = layer(x)
    w_deq = qt.dequantize(torch.float32)
    x_ref = x if recipe.input_activations is None else \
        fake_quant_activation(x, recipe.input_activations)
    exact = x_ref @ w_deq.T
    torch.testing.assert_close(y, exact, rtol=1e-5, atol=1e-5)
    # and against the unquantized layer, within what the scheme promises
    assert sqnr(x @ w.T, y) > (25.0 if recipe.input_activations else 14.0)


@pytest.mark.parametrize("scheme", ["w8a8-int8", "fp8-block", "fp8-dynamic"])
def test_layers_sharing_an_input_quantize_it_once_and_exactly(scheme):
    """q/k/v share their input: one activation quantization serves all three, and the
    outputs are bit for bit those of quantizing per layer; an in-place write to the input
    (or a new tensor) is quantized afresh."""
    from q.api import make_recipe
    from q.plugins.engines.native import layers

    torch.manual_seed(0)
    recipe, scheme_obj, _ = make_recipe(scheme, None, ragged="quantize")
    def make(name):
        qt = scheme_obj.quantize_weight("w", torch.randn(256, 384) * 0.05, recipe.args,
                                        torch.float32)
        return layers.QuantLinear(qt, recipe.input_activations, None, torch.device("cpu"),
                                  name=name, dtype=torch.bfloat16)

    made = [make(f"block.{name}") for name in ("q", "k", "v")]
    other = make("other.q")
    assert all(m.backend == "torch" for m in made)
    x = torch.randn(5, 384).bfloat16()
    calls = []
    real = layers.quantize_activation_cpu
    layers.quantize_activation_cpu = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        shared = [m(x) for m in made]
        assert len(calls) == 1
        alone = [m.fast(x, None) for m in made]  # each quantizes x itself
        assert all(torch.equal(a, b) for a, b in zip(shared, alone))
        x.mul_(2)  # in place: the cached codes are stale
        assert torch.equal(made[0](x), made[0].fast(x, None)) and len(calls) == 2
        assert torch.equal(made[1](x.clone()), made[1].fast(x, None)) and len(calls) == 3
        other(x)  # the same tensor in another module: quantized afresh
        assert len(calls) == 4
        with torch.inference_mode():  # the engine's mode: inference tensors, no versions
            y = torch.randn(3, 384).bfloat16()
            assert all(torch.equal(m(y), m.fast(y, None)) for m in made)
            assert len(calls) == 5
    finally:
        layers.quantize_activation_cpu = real


def test_quant_linear_keeps_weights_quantized():
    w = torch.randn(256, 384)
    layer, qt, _ = _layer("wint4", {"group_size": 64}, w)
    assert layer.qdata.dtype == torch.uint8 and layer.qdata.shape == (256, 192)
    assert not any(t.is_floating_point() and t.numel() >= w.numel() for t in layer.buffers())
    layer, _, _ = _layer("fp8-block", None, w)
    assert layer.kind == "block" and layer.qdata.dtype == torch.float8_e4m3fn


@pytest.mark.parametrize("dtype,path", [
    ("float32", "torch reference in fp32 (the compute dtype is float32"),
    ("bfloat16", "torch built-in kernels (fp8 weights dequantized to bf16 at load")])
def test_kernel_path_logged_once_per_kind(tiny_llama, caplog, dtype, path):
    from q.plugins.engines.native import layers

    layers._logged_kinds.clear()
    with caplog.at_level(logging.INFO, logger="q.engine"):
        q.load_engine(tiny_llama(), scheme="fp8-dynamic", dtype=dtype)
    paths = [r.message for r in caplog.records if "scaled_gemm" in r.message]
    assert len(paths) == 1, paths
    assert path in paths[0]


def test_a_forced_implementation_that_cannot_run_a_layer_is_an_error(tiny_llama, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(IncompatibleError, match=r"model\.layers\.0\..*: --impl triton cannot "
                                                r"run this layer: tensors are on the CPU"):
        q.load_engine(tiny_llama(), scheme="wint8", impl="triton")
    # int4 in groups of 48: torch's int4 kernel takes 32, 64, 128 or 256
    with pytest.raises(IncompatibleError, match=r"--impl torch cannot run this layer: int4 "
                                                r"groups of 48"):
        q.load_engine(tiny_llama(), scheme="wint4", args={"group_size": 48}, impl="torch",
                      dtype="bfloat16")
    session = q.load_engine(tiny_llama(), scheme="wint4", args={"group_size": 48},
                            dtype="bfloat16")  # auto: the reference runs what torch cannot
    layer = next(iter(session.report.quantized.values()))
    assert layer.backend == "reference" and "groups of 48" in layer.path


@pytest.mark.parametrize("scheme,args,ragged", SCHEMES, ids=SCHEME_IDS)
def test_online_quantization_equals_offline(tiny_llama, tmp_path, scheme, args, ragged):
    model = tiny_llama(intermediate=320)  # 320: ragged for 128-blocks, fine for groups of 32/64
    out = q.quantize(model, scheme, tmp_path / "out", args=args, ragged=ragged,
                     progress=False).output
    # the reference layout keeps the codes and scales as they are: compare those
    offline = q.load_engine(out, impl="reference")
    online = q.load_engine(model, scheme=scheme, args=args, ragged=ragged, impl="reference")
    a, b = offline.report.quantized, online.report.quantized
    assert a.keys() == b.keys() and len(a) == 7
    for name in a:
        for attr in ("qdata", "scale", "zero_point"):
            x, y = getattr(a[name], attr), getattr(b[name], attr)
            assert (x is None) == (y is None), (name, attr)
            if x is not None:
                assert x.dtype == y.dtype, (name, attr)
                assert_bitwise_equal(x, y, f"{name}.{attr}")


@pytest.mark.parametrize("scheme,args,ragged", SCHEMES, ids=SCHEME_IDS)
def test_engine_matches_transformers_on_dequantized(tiny_llama, tmp_path, scheme, args, ragged):
    model = tiny_llama(layers=2)
    out = q.quantize(model, scheme, tmp_path / "out", args=args, ragged=ragged,
                     progress=False).output
    deq = q.dequantize(out, tmp_path / "deq", dtype="float32", progress=False).output
    session = q.load_engine(out, dtype="float32")
    acts = session.report.recipe.input_activations
    ref = transformers_reference(deq, session.report.quantized, acts)
    ids = [3, 17, 99, 250, 4, 8, 400, 21]
    got = engine_logits(session, ids)
    with torch.inference_mode():
        want = ref(input_ids=torch.tensor([ids])).logits[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    engine_tokens = session.generate([ids], max_tokens=12, ignore_eos=True)[0].token_ids
    assert engine_tokens == greedy_transformers(ref, ids, 12)


ARCHS = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {}),
    "gemma": ("GemmaConfig", {}),
    "gemma2": ("Gemma2Config", {"sliding_window": 4096}),
}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_architectures_match_transformers(arch, tmp_path):
    from .conftest import save_tiny_arch

    cls_name, extra = ARCHS[arch]
    save_tiny_arch(tmp_path, cls_name, **extra)
    session = q.load_engine(tmp_path, scheme="wint8", dtype="float32")
    deq = q.dequantize(q.quantize(tmp_path, "wint8", tmp_path / "o", progress=False).output,
                       tmp_path / "d", dtype="float32", progress=False).output
    ref = transformers_reference(deq)
    ids = [5, 6, 7, 300, 2]
    with torch.inference_mode():
        want = ref(input_ids=torch.tensor([ids])).logits[0]
    torch.testing.assert_close(engine_logits(session, ids), want, rtol=1e-4, atol=1e-4)
    assert session.generate([ids], max_tokens=6, ignore_eos=True)[0].token_ids == \
        greedy_transformers(ref, ids, 6)


def test_unsupported_architecture_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    from .conftest import write_safetensors

    write_safetensors(tmp_path, {"wte.weight": torch.zeros(4, 4)},
                      {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    with pytest.raises(IncompatibleError, match="GPT2LMHeadModel.*supported: llama"):
        q.load_engine(tmp_path)


def test_unknown_format_names_what_was_tried(tiny_llama, tmp_path):
    import shutil

    shutil.copytree(tiny_llama(), tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as err:
        q.load_engine(tmp_path / "m")
    assert "awq" in str(err.value) and "hf-fp8" in str(err.value) \
        and "compressed-tensors" in str(err.value)


def test_not_a_model_dir(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        q.load_engine(tmp_path)


def test_prompt_longer_than_context(tiny_llama):
    session = q.load_engine(tiny_llama())
    with pytest.raises(OptionError, match="context is 2048 tokens"):
        session.add_request([5] * 2048)
    with pytest.raises(OptionError, match="empty"):
        session.add_request([])


@pytest.mark.parametrize("bad", [
    {"max_tokens": 0}, {"max_tokens": -3}, {"temperature": -1}, {"top_p": 0},
    {"top_p": 1.5}, {"top_k": -1}, {"seed": -2}, {"stop": [""]}, {"logprobs": 99},
    {"max_tokens": 2.5},
])
def test_invalid_sampling_parameters(bad):
    field = next(iter(bad))
    with pytest.raises(OptionError, match=f"invalid sampling parameter {field}="):
        SamplingParams(**bad)


def test_generation_stops_at_max_tokens_and_context(tiny_llama):
    session = q.load_engine(tiny_llama())
    out = session.generate([[5, 6]], max_tokens=5, ignore_eos=True)[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"
    session.context_length = 6
    out = session.generate([[5, 6]], max_tokens=50, ignore_eos=True)[0]
    assert len(out.token_ids) == 4 and out.finish_reason == "length"


def test_checkpoint_without_tokenizer_is_named(tiny_llama, tmp_path):
    import shutil

    for f in tiny_llama().iterdir():
        if "token" not in f.name and f.name != "special_tokens_map.json":
            shutil.copy(f, tmp_path / f.name)
    with pytest.raises(CheckpointError, match="has no tokenizer.*copy the tokenizer files"):
        q.load_engine(tmp_path)


def test_a_cpu_engine_tunes_glibc_after_load(tiny_llama, monkeypatch):
    """Loading trims the heap, then (KV cache made) has glibc keep a step's freed memory:
    blocks up to 32 MB from the heap, trimmed only above 1 GiB (reuse_freed_memory's
    docstring has why)."""
    from q.plugins.engines import native

    calls = []

    class Recorder:
        def malloc_trim(self, pad):
            calls.append(("malloc_trim", pad))

        def mallopt(self, param, value):
            calls.append(("mallopt", param, value))
            return 1

    monkeypatch.setattr(native, "_glibc", lambda: Recorder())
    q.load_engine(tiny_llama(), device="cpu")
    assert calls == [("malloc_trim", 0), ("mallopt", native.M_MMAP_THRESHOLD, 32 << 20),
                     ("mallopt", native.M_TRIM_THRESHOLD, 1 << 30)]


REUSE_PROBE = """
import ctypes, sys
libc = ctypes.CDLL("libc.so.6")
fields = ("arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost")
libc.mallinfo2.restype = type("MallInfo2", (ctypes.Structure,),
                              {"_fields_": [(f, ctypes.c_size_t) for f in fields.split()]})
libc.malloc.restype = ctypes.c_void_p
from q.plugins.engines.native import reuse_freed_memory  # torch's import allocates too
if sys.argv[1] == "reuse":
    reuse_freed_memory()
before = libc.mallinfo2().hblks
libc.malloc(30 << 20)  # not freed: freeing an mmapped block moves glibc's threshold itself
print(libc.mallinfo2().hblks > before)  # whether glibc gave the block its own mmap
"""


def test_reuse_freed_memory_serves_step_sized_blocks_from_the_heap():
    """glibc mmaps a 30 MB block by default (and unmaps it on free, so the next step pays
    its page faults again); after reuse_freed_memory it comes from the heap. A fresh
    process each, since a first probe would move glibc's threshold for the second."""
    import ctypes
    import subprocess
    import sys

    try:
        ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        pytest.skip("not glibc 2.33+ (no mallinfo2 to see the mmaps)")
    mmapped = []
    for mode in ("default", "reuse"):
        out = subprocess.run([sys.executable, "-c", REUSE_PROBE, mode], capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        mmapped.append(out.stdout.split()[-1])
    assert mmapped == ["True", "False"]
