"""Helpers for building transformers models without paying for their weights.

Shared by every place that builds a model class from a config (the native engine's
skeleton and, layer by layer, calibration) or loads a model's tokenizer (engine,
calibration, evaluation). Imports nothing heavy at import time.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from torch import nn

from .errors import CheckpointError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@contextlib.contextmanager
def parameters_on_meta():
    """Create parameters on the meta device but buffers (rotary tables) for real.

    ``nn.Linear`` registers an empty weight and then initializes it; moving it to meta at
    registration makes both free, so building the skeleton of any size costs nothing.
    """
    original = nn.Module.register_parameter

    def register(module, name, param):
        if param is not None:
            param = nn.Parameter(param.to("meta"), requires_grad=False)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def load_tokenizer(path):
    """The model directory's tokenizer, or a CheckpointError that says what to copy."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not any((path / n).exists() for n in TOKENIZER_FILES):
        raise CheckpointError(
            f"{path} has no tokenizer ({', '.join(TOKENIZER_FILES)}); copy the tokenizer files "
            "of the original model into it (`q quantize` does this itself)")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (ValueError, OSError) as exc:
        raise CheckpointError(f"{path}: the tokenizer does not load: {exc}") from None
