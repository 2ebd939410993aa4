"""Shared fixtures: fresh plugin managers, tiny in-process Llama checkpoints."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("Q_CACHE_DIR", str(Path(__file__).resolve().parent.parent / ".q-cache"))


@pytest.fixture
def pm():
    """A fresh manager with q's built-in plugins only (no third-party ones)."""
    from q.plugin_manager import make_plugin_manager

    return make_plugin_manager(load="builtin")


def save_tiny_llama(path: Path, intermediate: int = 384, hidden: int = 256, layers: int = 1,
                    tie: bool = False, seed: int = 0) -> Path:
    """A random-weight Llama saved with transformers (bf16 safetensors)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=hidden // 4, num_hidden_layers=layers,
                      vocab_size=512, tie_word_embeddings=tie)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path)
    save_tiny_tokenizer(path, cfg.vocab_size)
    return path


def save_tiny_arch(path: Path, config_class: str, layers: int = 2, **extra) -> Path:
    """A random-weight bf16 model of a transformers config class (``"Qwen3Config"``...):
    hidden 128, 4 heads of 32 over 2 KV heads, MLP 256, vocab 512, with a tokenizer."""
    import transformers

    cfg = getattr(transformers, config_class)(
        hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, num_hidden_layers=layers, vocab_size=512, **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    model.save_pretrained(path)
    save_tiny_tokenizer(path)
    return path


def save_tiny_tokenizer(path: Path, vocab_size: int = 512) -> Path:
    """A word-level tokenizer whose words are "w0".."w{n-3}" plus <s> and </s>, so engines
    can encode and decode text for tiny random models."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, **{f"w{i}": i + 2 for i in range(vocab_size - 2)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<s>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.chat_template = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
                          "{% if add_generation_prompt %}w1{% endif %}")
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """Factory: tiny_llama(intermediate=384, tie=False) -> path, cached per arguments."""
    cache = {}

    def make(**kwargs):
        key = tuple(sorted(kwargs.items()))
        if key not in cache:
            name = "llama-" + "-".join(f"{k}{v}" for k, v in key) if key else "llama"
            cache[key] = save_tiny_llama(tmp_path_factory.mktemp(name), **kwargs)
        return cache[key]

    return make


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], config: dict | None = None):
    """A model dir with one safetensors file (and config.json) built from plain tensors."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config or {"architectures": ["LlamaForCausalLM"],
                                                          "model_type": "llama"}))
    return path


def default_sigint() -> None:
    """``preexec_fn`` for children that a test sends Ctrl-C: a shell starts background jobs
    with SIGINT ignored, children inherit that, and Python then never raises
    KeyboardInterrupt, so the test would fail only because of how pytest was launched."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
