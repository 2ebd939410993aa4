"""RMSNorm in one pass (with the residual add before it, optionally).

``reference`` is the oracle (transformers' ``LlamaRMSNorm`` arithmetic in torch ops);
``cpp_impl`` is the CPU kernel, compiled on first use, which returns None where it cannot
run so that callers keep the reference. In torch ops RMSNorm is six calls: at decode sizes
each costs more in dispatch than in arithmetic, and for prompts each is one more pass over
the activations. The engine swaps in the plain form (plugins/engines/native/elementwise.py);
the residual form is for a decoder-layer forward of q's own, not written yet.
"""

from . import reference

__all__ = ["reference"]
