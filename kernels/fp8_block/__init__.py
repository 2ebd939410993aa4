"""Block-scaled fp8: 128x128 weight tiles, 1x128 activation groups (DeepSeek-V3 layout)."""

from .reference import (
    dequantize_fp8_block,
    quantize_act_per_token_group,
    quantize_fp8_block,
)

__all__ = ["quantize_fp8_block", "dequantize_fp8_block", "quantize_act_per_token_group"]
