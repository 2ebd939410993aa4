"""q: quantize any Hugging Face LLM into checkpoints every engine loads, and serve it.

The public API. ``import q`` stays light: it never imports triton, vllm, fastapi or
transformers' model code.
"""

from .api import dequantize, detect_format, execute, export, inspect, plan, quantize
from .evaluate import EvalReport, evaluate
from .generation import Completion, SamplingParams
from .hookspecs import hookimpl
from .pipeline import Pipeline, load_engine, pipeline
from .recipe import QuantRecipe
from .tensor import QuantizedTensor

__version__ = "0.1.0"

__all__ = [
    "hookimpl", "QuantRecipe", "QuantizedTensor", "quantize", "plan", "execute", "export",
    "dequantize", "inspect", "detect_format", "default_model", "pipeline", "load_engine",
    "Pipeline", "SamplingParams", "Completion", "evaluate", "EvalReport", "__version__",
]


def __getattr__(name):
    if name == "default_model":
        from .embedded import default_model

        return default_model
    raise AttributeError(f"module 'q' has no attribute {name!r}")
