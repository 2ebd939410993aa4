"""Choose between an op's Triton kernel and its pure-torch reference.

``auto`` runs Triton on a CUDA device that can run the op and the reference elsewhere (CPU
included). ``triton`` on a device that cannot run it falls back to the reference with one
warning naming the reason; it never crashes. Under ``TRITON_INTERPRET=1`` Triton kernels run
on CPU tensors (slowly): that is how CI tests them against their references.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os

import torch

from . import Impl

log = logging.getLogger("q.kernels")

# fp8 tensor-core MMA exists from Ada / Hopper (sm_89, sm_90) on.
FP8_MIN_CAPABILITY = (8, 9)


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_unavailable_reason(device: torch.device, *, fp8: bool = False) -> str | None:
    """None if Triton can run an op on ``device``, else why not (for the log line)."""
    if not triton_installed():
        return "triton is not installed (pip install 'q-quant[triton]')"
    if device.type == "cpu":
        return None if interpreting() else "tensors are on the CPU"
    if device.type != "cuda":
        return f"Triton does not run on {device.type} devices"
    if fp8:
        cap = torch.cuda.get_device_capability(device)
        if cap < FP8_MIN_CAPABILITY:
            return (f"{torch.cuda.get_device_name(device)} (sm_{cap[0]}{cap[1]}) has no fp8 "
                    "tensor cores (needs sm_89+)")
    return None


@functools.cache
def cpu_features() -> frozenset[str]:
    """The CPU instructions torch's CPU kernels are fast with: ``bf16`` (AVX-512 BF16 or AMX),
    ``vnni`` (int8 dot products). torch's own probes, private API: none if they move."""
    probes = {"bf16": ("_is_avx512_bf16_supported", "_is_amx_tile_supported"),
              "vnni": ("_is_vnni_supported", "_is_amx_tile_supported")}
    found = set()
    for feature, names in probes.items():
        for name in names:
            try:
                if getattr(torch.cpu, name)():
                    found.add(feature)
            except (AttributeError, RuntimeError):
                continue
    return frozenset(found)


_warned: set[tuple[str, str]] = set()


def use_triton(impl: Impl | str, device: torch.device, op: str, *, fp8: bool = False) -> bool:
    """True to run ``op``'s Triton kernel; an explicit ``triton`` that cannot run warns once."""
    impl = Impl(impl)
    if impl in (Impl.reference, Impl.torch):
        return False
    reason = triton_unavailable_reason(device, fp8=fp8)
    if impl is Impl.auto:
        return reason is None and (device.type == "cuda" or interpreting())
    if reason is not None and (op, reason) not in _warned:
        _warned.add((op, reason))
        log.warning("%s: Triton asked for but %s; running the torch reference", op, reason)
    return reason is None
