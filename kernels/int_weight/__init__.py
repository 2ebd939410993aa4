"""Symmetric weight-only int8 / int4 (per-channel or group-wise)."""

from .reference import dequantize_int_weight, quantize_int_weight, quantize_int_weight_asym

__all__ = ["quantize_int_weight", "quantize_int_weight_asym", "dequantize_int_weight"]
