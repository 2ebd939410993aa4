"""Layer-by-layer calibration: run a model one decoder layer at a time over calibration tokens.

The transformers model is built on the meta device (no weights). The decoder layers are
swapped for catchers and the model's own forward runs once per batch: the first catcher
stores the hidden states entering layer 0 and every catcher records the arguments the
model passes its layer (attention mask, rotary embeddings, position ids; per layer, since
Gemma 2/3 and Qwen alternate sliding and full attention). Then each layer in turn gets its
weights from the checkpoint (fp32), runs over every batch while forward pre-hooks record
``max|x_j|`` per input channel of each Linear, hands its statistics to a callback, and is
returned to the meta device. Its outputs are the next layer's inputs.

Peak memory is one layer's fp32 weights plus two ``[samples, seqlen, hidden]`` fp32
activation buffers and one batch's intermediates (plus at most a layer's worth of freed heap,
see ``_HeapTrimmer``); the embedding matrix is read row by row for the tokens used only.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .errors import BadTensorError, CheckpointError
from .modeling import parameters_on_meta
from .moe_experts import checkpoint_name, fused_expert_tensor
from .progress import count_progress


class _HeapTrimmer:
    """Return freed memory to the OS when the heap has grown by one layer's weights.

    glibc keeps freed chunks in its arenas, and with a layer's intermediates freed and
    reallocated per layer the heap fragments: on tests/test_smoothquant_smollm2.py's memory
    test RSS grew about 5 MiB per layer while live tensors stayed at 18 MiB. ``malloc_trim``
    keeps it flat, but what it releases is faulted back in (zero-filled) by the next layer
    (about 1 s of system time over SmolLM2's 30 layers). Trimming only once RSS exceeds the
    last trimmed level by a layer's fp32 weights bounds the growth to one more layer and
    skips the trims that would not pay; how many remain depends on the model (SmolLM2 at
    2048 tokens per batch: 23-28 of 30 layers). No-op off glibc / Linux.
    """

    def __init__(self):
        self.baseline: int | None = None
        try:
            import ctypes

            self.trim = ctypes.CDLL("libc.so.6").malloc_trim
            self.page = os.sysconf("SC_PAGE_SIZE")
        except (OSError, AttributeError, ValueError):
            self.trim = None

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def __call__(self, slack_bytes: int) -> None:
        if self.trim is None:
            return
        if self.baseline is None or self.rss() > self.baseline + slack_bytes:
            self.trim(0)
            self.baseline = self.rss()


# Tokens per forward batch: large enough to keep the GEMMs efficient, small enough that a
# layer's intermediate activations stay far below its weights on big models.
CALIB_BATCH_TOKENS = 2048


@dataclass
class LayerCalibration:
    """What one decoder layer's pass produced, handed to ``on_layer``.

    Attributes:
        index: layer number.
        prefix: checkpoint name prefix (``model.layers.3``).
        layer: the fp32 layer with its weights loaded (valid during the callback only).
        act_max: Linear (name relative to the layer) -> ``[K]`` max |x_j| over all tokens.
        samples: Linear -> ``[B, L, K]`` inputs of the first ``B`` calibration windows
            (``sample_modules`` only; about ``sample_tokens`` tokens), whole sequences so
            attention can run on them.
        sample_args: the layer's call arguments sliced to those ``B`` windows.
    """

    index: int
    prefix: str
    layer: nn.Module
    act_max: dict[str, torch.Tensor]
    samples: dict[str, torch.Tensor]
    sample_args: tuple = ((), {})


class _Stop(Exception):
    """Raised by the last catcher: nothing after the decoder layers needs to run."""


class _Catcher(nn.Module):
    def __init__(self, index: int, store: dict, last: bool):
        super().__init__()
        self.index, self.store, self.last = index, store, last

    def forward(self, hidden_states, *args, **kwargs):
        self.store[self.index] = (args, kwargs)
        if self.index == 0:
            self.store["input"] = hidden_states
        if self.last:
            raise _Stop
        return hidden_states


def build_meta_model(config: dict) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    clean = {k: v for k, v in config.items() if k != "quantization_config"}
    hf_config = AutoConfig.for_model(**clean)
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    return model.eval()


def _qualified_name(model: nn.Module, target: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is target)


def read_rows(source, name: str, rows: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` (sorted, unique) of a 2-D tensor, read without loading the rest."""
    info = source.info(name)
    n, k = info.shape
    if len(rows) and int(rows[-1]) >= n:
        raise CheckpointError(f"{source.path}: token id {int(rows[-1])} is past the {n} rows of "
                              f"'{name}'; the tokenizer does not match the model")
    out = torch.empty((len(rows), k), dtype=info.dtype)
    raw = out.view(torch.uint8).numpy()
    row_bytes = info.nbytes // n
    fd = os.open(info.file, os.O_RDONLY)
    try:
        for i, r in enumerate(rows.tolist()):
            if os.preadv(fd, [memoryview(raw[i])], info.offset + r * row_bytes) != row_bytes:
                raise CheckpointError(f"{info.file}: '{name}' ends early; the file is truncated")
    finally:
        os.close(fd)
    return out


def _load_layer(source, layer: nn.Module, prefix: str, cache: dict) -> None:
    """Read one layer's weights into fp32 buffers reused from layer to layer.

    Fresh buffers per layer cost a zero-filled page fault per 4 KiB: converting SmolLM2's
    30 layers from bf16 into new fp32 tensors took 1.5 s, into reused ones 0.09 s.
    """
    for pname, param in list(layer.named_parameters()):
        full = f"{prefix}.{pname}"
        stored = checkpoint_name(source, full)
        if stored is None:
            fused = fused_expert_tensor(source, full, tuple(param.shape))
            if fused is None:
                raise CheckpointError(
                    f"{source.path}: decoder layer '{prefix}' ({type(layer).__name__}) needs "
                    f"'{full}', which the checkpoint lacks (nor has it per-expert tensors to "
                    "build it from). Calibration reads layers by their transformers parameter "
                    "names; is this checkpoint for another transformers version?")
            owner, _, attr = pname.rpartition(".")
            module = layer.get_submodule(owner) if owner else layer
            module._parameters[attr] = nn.Parameter(fused, requires_grad=False)
            continue
        full = stored
        info = source.info(full)
        if tuple(info.shape) != tuple(param.shape):
            raise CheckpointError(f"{source.path}: '{full}' is {list(info.shape)}, the "
                                  f"model expects {list(param.shape)}; is config.json right?")
        if cache.get("scratch") is None or cache["scratch"].numel() < info.nbytes:
            cache["scratch"] = torch.empty(info.nbytes, dtype=torch.uint8)
        buf = cache.get(pname)
        if buf is None or tuple(buf.shape) != tuple(param.shape):
            buf = cache[pname] = torch.empty(param.shape, dtype=torch.float32)
        buf.copy_(source.read(full, cache["scratch"]))
        owner, _, attr = pname.rpartition(".")
        module = layer.get_submodule(owner) if owner else layer
        module._parameters[attr] = nn.Parameter(buf, requires_grad=False)


def _capture_inputs(model, layers: nn.ModuleList, rows, table, input_ids, batch: int):
    """Layer-0 inputs ``[N, L, H]`` and the per-layer call arguments per batch size.

    ``table`` holds the embedding rows of the token ids in ``rows`` (sorted). It stands in
    for the embedding module's weight, indexed by position in ``rows``, so the module's own
    forward runs (Gemma scales embeddings by sqrt(hidden) there, not in the model).
    """
    embedding = model.get_input_embeddings()
    embedding._parameters["weight"] = nn.Parameter(table, requires_grad=False)
    originals = list(layers)
    n = len(originals)
    hidden, call_args = None, {}
    base = model.get_decoder()
    try:
        for b0 in range(0, len(input_ids), batch):
            ids = input_ids[b0:b0 + batch]
            store: dict = {}
            for i in range(n):
                layers[i] = _Catcher(i, store, last=i == n - 1)
            with contextlib.suppress(_Stop):
                base(inputs_embeds=embedding(torch.searchsorted(rows, ids)), use_cache=False)
            x = store["input"]
            if hidden is None:
                hidden = torch.empty((len(input_ids), *x.shape[1:]), dtype=torch.float32)
            hidden[b0:b0 + len(ids)] = x
            call_args.setdefault(len(ids), [store[i] for i in range(n)])
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
        embedding.to("meta")
    return hidden, call_args


def _input_abs_max(x: torch.Tensor) -> torch.Tensor:
    """max |x_j| per input channel in one pass (aminmax: about 40% faster here than amax and
    amin, which read x twice); NaN propagates, so the finiteness check sees it."""
    lo, hi = torch.aminmax(x, dim=0)
    return torch.maximum(hi, lo.neg())


def _hooks(layer: nn.Module, act_max: dict, samples: dict, sample_modules, windows: int):
    handles = []
    # q/k/v (and gate/up) read the same tensor: reduce it once per forward, not per Linear
    last: dict = {"input": None, "amax": None}
    for name, module in layer.named_modules():
        if not isinstance(module, nn.Linear):
            continue

        def hook(mod, args, name=name):
            x = args[0]
            if last["input"] is not x:
                last["input"] = x
                last["amax"] = _input_abs_max(x.reshape(-1, x.shape[-1]).float())
            amax = last["amax"]
            act_max[name] = amax if name not in act_max else torch.maximum(act_max[name], amax)
            if name in sample_modules and name not in samples:  # the first batch only
                samples[name] = x[:windows].float().clone()

        handles.append(module.register_forward_pre_hook(hook))
    return handles


def _first_windows(obj, n: int, batch: int):
    """``obj`` (call arguments) with every ``[batch, ...]`` tensor cut to its first ``n``."""
    if isinstance(obj, torch.Tensor):
        return obj[:n] if obj.dim() and obj.shape[0] == batch and batch > 1 else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_first_windows(o, n, batch) for o in obj)
    if isinstance(obj, dict):
        return {k: _first_windows(v, n, batch) for k, v in obj.items()}
    return obj


def run_layers(source, input_ids: torch.Tensor, on_layer: Callable[[LayerCalibration], None],
               *, sample_modules=(), sample_tokens: int = 512, progress: bool | None = None,
               batch_tokens: int = CALIB_BATCH_TOKENS) -> None:
    """Calibrate ``source`` over ``input_ids [N, L]`` one decoder layer at a time.

    Raises:
        BadTensorError: NaN/Inf in a layer's activations, naming the layer (or Linear).
        CheckpointError: a layer's weights are missing or do not fit the config.
    """
    model = build_meta_model(source.config)
    layers = model.get_decoder().layers
    prefix = _qualified_name(model, layers)
    emb_name = f"{_qualified_name(model, model.get_input_embeddings())}.weight"
    rows = torch.unique(input_ids)
    batch = max(1, batch_tokens // input_ids.shape[1])
    first = min(batch, len(input_ids))
    windows = min(first, -(-sample_tokens // input_ids.shape[1]))
    with torch.inference_mode():
        table = read_rows(source, emb_name, rows).float()
        hidden, call_args = _capture_inputs(model, layers, rows, table, input_ids, batch)
        del table
        out = torch.empty_like(hidden)
        weights: dict = {}
        trim_heap = _HeapTrimmer()
        with count_progress("calibrate", len(layers), progress) as advance:
            for i, layer in enumerate(layers):
                name = f"{prefix}.{i}"
                _load_layer(source, layer, name, weights)
                act_max, samples = {}, {}
                handles = _hooks(layer, act_max, samples, set(sample_modules), windows)
                try:
                    for b0 in range(0, len(hidden), batch):
                        x = hidden[b0:b0 + batch]
                        args, kwargs = call_args[len(x)][i]
                        y = layer(x, *args, **kwargs)
                        out[b0:b0 + len(x)] = y[0] if isinstance(y, tuple) else y
                finally:
                    for h in handles:
                        h.remove()
                _check_finite(source, name, act_max, out)
                on_layer(LayerCalibration(i, name, layer, act_max, samples,
                                          _first_windows(call_args[first][i], windows, first)))
                layer.to("meta")  # drops the module's references; the buffers are reused
                trim_heap(sum(t.nbytes for k, t in weights.items() if k != "scratch"))
                hidden, out = out, hidden
                advance(description=f"calibrate {name}")


def _check_finite(source, name: str, act_max: dict, out: torch.Tensor) -> None:
    for linear, amax in act_max.items():
        if not bool(torch.isfinite(amax).all()):
            raise BadTensorError(
                f"{source.path}: calibration activations entering '{name}.{linear}' contain "
                "NaN or Inf: the weights before it overflow on this data. Check the "
                "checkpoint (q dequantize/inspect), or calibrate on other text with --calib"
            )
    # one summing pass: NaN or Inf anywhere makes the sum non-finite (isfinite().all() costs
    # about 6x more on this CPU)
    if not math.isfinite(float(out.sum())):
        raise BadTensorError(
            f"{source.path}: decoder layer '{name}' produced NaN or Inf activations on the "
            "calibration data; check its weights"
        )
