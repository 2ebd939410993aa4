"""Symmetric weight-only int8 / int4 (per-channel or group-wise)."""

from .reference import dequantize_int_weight, quantize_int_weight

__all__ = ["quantize_int_weight", "dequantize_int_weight"]
