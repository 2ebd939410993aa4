"""The elementwise ops of a Llama-style decoder layer: (residual add +) RMSNorm, and the
rotary embedding with the KV-cache write.

``reference`` is the oracle (transformers' own arithmetic, op for op); ``cpp_impl`` runs
each in one pass on CPUs, for the engine's own decoder forward (plugins/engines/native/
decoder.py), where transformers' ~20 small ops for them per layer cost more than their
arithmetic at decode sizes (tests/bench/bench_decoder_ops.py). SiLU(gate) * up stays two
torch ops: a C++ version measured slower than them.
"""

from . import reference

__all__ = ["reference"]
