"""Helpers for building transformers models without paying for their weights.

Shared by every place that builds a model class from a config: the native engine's
skeleton and (layer by layer) calibration. Imports nothing heavy at import time.
"""

from __future__ import annotations

import contextlib

from torch import nn


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
