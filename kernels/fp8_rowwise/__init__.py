"""Per-channel and per-tensor fp8 weights, per-token fp8 activations."""

from .reference import (
    dequantize_fp8_rowwise,
    quantize_act_per_token,
    quantize_fp8_per_channel,
    quantize_fp8_per_tensor,
)

__all__ = [
    "quantize_fp8_per_channel",
    "quantize_fp8_per_tensor",
    "dequantize_fp8_rowwise",
    "quantize_act_per_token",
]
