"""The elementwise ops of a Llama-style decoder layer: (residual add +) RMSNorm, rotary
embedding with the KV-cache write, SiLU(gate) * up.

``reference`` is the oracle (transformers' own arithmetic, op for op); ``cpp_impl`` runs
each in one pass on CPUs, for the engine's own decoder forward (plugins/engines/native/
decoder.py), where transformers' ~25 small ops per layer cost more than their arithmetic at
decode sizes.
"""

from . import reference

__all__ = ["reference"]
