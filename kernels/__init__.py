"""q.kernels: numerics for every quantization scheme and, later, the GEMMs that run them.

Each op lives in its own folder with a pure-torch ``reference.py`` that is the spec and runs
anywhere (CPU CI included). Triton implementations sit beside them as ``triton_impl.py`` and
are imported lazily, so ``import q.kernels`` needs only torch.
"""

from enum import Enum


class Impl(str, Enum):
    """Which implementation of an op to run: ``auto`` picks Triton on a capable GPU."""

    auto = "auto"
    triton = "triton"
    reference = "reference"


__all__ = ["Impl"]
