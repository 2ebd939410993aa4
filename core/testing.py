"""Test helpers shipped with q, for q's tests and for plugin authors."""

from __future__ import annotations

import torch


def sqnr(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (higher is better)."""
    ref = reference.double()
    noise = (ref - approx.double()).pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(ref.pow(2).sum() / noise))


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Same shape, dtype-width and bits; reports the first differing coordinate."""
    if tuple(actual.shape) != tuple(expected.shape):
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    a = actual.contiguous().view(torch.uint8) if actual.element_size() == 1 else actual.contiguous()
    e = expected.to(actual.dtype).contiguous()
    e = e.view(torch.uint8) if e.element_size() == 1 else e
    if a.dtype.is_floating_point:
        width = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        a, e = a.view(width), e.view(width)
    diff = (a != e).nonzero()
    if len(diff):
        idx = tuple(diff[0].tolist())
        raise AssertionError(
            f"{what}: {len(diff)} elements differ; first at {idx}: "
            f"{actual[idx].item()!r} != {expected[idx].item()!r}"
        )
