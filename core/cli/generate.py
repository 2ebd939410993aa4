"""``q generate`` and ``q chat``: run a checkpoint (or a model quantized online) on an engine."""

from __future__ import annotations

import functools
import logging
import sys

import click

from ..errors import OptionError
from ..generation import SamplingParams
from .quantize import parse_extra_args


def setup_logging(verbose: bool) -> None:
    """q's own INFO lines always (which kernel path each layer kind runs, load time);
    other libraries' INFO lines only with --verbose."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(message)s", stream=sys.stderr)
    logging.getLogger("q").setLevel(logging.INFO)


def _load(model, engine, scheme, args, ragged, device, impl, verbose, native_options):
    from ..pipeline import load_engine

    setup_logging(verbose)
    return load_engine(model, engine=engine, scheme=scheme, args=parse_extra_args(args),
                       ragged=ragged, device=device, impl=impl,
                       **native_options_for(engine, native_options))


def native_options_for(engine: str, options: dict) -> dict:
    """The native engine's own options (--dtype, --kv-cache-tokens) that were given; an
    error if they were given to another engine."""
    if options and engine != "native":
        flags = ", ".join("--" + k.replace("_", "-") for k in options)
        raise OptionError(f"{flags}: options of the native engine, not of --engine {engine}")
    return options


def engine_options(f):
    options = [
        click.option("--engine", default="native", show_default=True,
                     help="engine plugin (`q plugins` lists them)"),
        click.option("--scheme", help="quantize a bf16 model online with this scheme"),
        click.option("--arg", "args", multiple=True, metavar="KEY=VALUE",
                     help="scheme option for online quantization (repeatable)"),
        click.option("--ragged", type=click.Choice(["skip", "quantize"]), default="skip",
                     show_default=True, help="online quantization of non-aligned Linears"),
        click.option("--device", default="auto", show_default=True,
                     help="auto (CUDA if present), cpu, cuda, cuda:1, ..."),
        click.option("--impl", type=click.Choice(["auto", "triton", "torch", "reference"]),
                     default="auto", show_default=True,
                     help="kernel implementation: auto picks Triton on a GPU, torch's "
                          "built-in kernels on a CPU, else the reference"),
        click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float32"]),
                     help="compute dtype of the native engine [default: auto: bfloat16 on "
                          "CPUs with bf16 instructions and on GPUs, else float32]"),
        click.option("--kv-cache-tokens", type=click.IntRange(min=1),
                     help="native engine's KV cache size in tokens [default: 20%% of free "
                          "memory, at most max-batch full contexts]"),
        click.option("--woq-activations", type=click.Choice(["bf16", "int8"]),
                     help="native engine, weight-only int8/int4 checkpoints: int8 multiplies "
                          "prompts (steps of 17+ tokens) with int8 activations, one scale per "
                          "32 values: faster prefill, not exact [default: bf16]"),
        click.option("--verbose", "-v", is_flag=True, help="log loading details"),
    ]

    @functools.wraps(f)
    def gather_native_options(*a, dtype, kv_cache_tokens, woq_activations, **kw):
        kw["native_options"] = {k: v for k, v in (("dtype", dtype),
                                                  ("kv_cache_tokens", kv_cache_tokens),
                                                  ("woq_activations", woq_activations))
                                if v is not None}
        return f(*a, **kw)

    for option in reversed(options):
        gather_native_options = option(gather_native_options)
    return gather_native_options


def sampling_options(f):
    options = [
        click.option("--max-tokens", default=128, show_default=True, type=int),
        click.option("--temperature", default=0.0, show_default=True, type=float,
                     help="0 = greedy"),
        click.option("--top-p", default=1.0, show_default=True, type=float),
        click.option("--top-k", default=0, show_default=True, type=int, help="0 = off"),
        click.option("--seed", type=int, help="makes sampling reproducible"),
        click.option("--stop", multiple=True, help="stop string (repeatable)"),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _params(max_tokens, temperature, top_p, top_k, seed, stop) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                          top_k=top_k, seed=seed, stop=tuple(stop))


def add_commands(cli: click.Group) -> None:
    @cli.command()
    @click.argument("model", type=click.Path(file_okay=False))
    @click.option("--prompt", "-p", "prompts", multiple=True, required=True,
                  help="prompt text (repeatable: prompts run as one batch)")
    @click.option("--chat", is_flag=True, help="wrap each prompt in the model's chat template")
    @engine_options
    @sampling_options
    def generate(model, prompts, chat, engine, scheme, args, ragged, device, impl, verbose,
                 native_options, max_tokens, temperature, top_p, top_k, seed, stop):
        """Complete PROMPTs with MODEL (a q or peer checkpoint, or a bf16 model + --scheme).

        One prompt streams its tokens as they come; several run as one batch.
        """
        params = _params(max_tokens, temperature, top_p, top_k, seed, stop)
        session = _load(model, engine, scheme, args, ragged, device, impl, verbose,
                        native_options)
        encoded = [session.chat_prompt_ids([{"role": "user", "content": p}]) if chat else p
                   for p in prompts]
        if len(encoded) == 1:
            for out in session.stream(encoded[0], params):
                click.echo(out.text, nl=False)
            click.echo()
            return
        for prompt, result in zip(prompts, session.generate(encoded, params)):
            click.secho(f"--- {prompt}", bold=True)
            click.echo(result.text)

    @cli.command()
    @click.argument("model", type=click.Path(file_okay=False))
    @click.option("--system", help="system prompt")
    @engine_options
    @sampling_options
    def chat(model, system, engine, scheme, args, ragged, device, impl, verbose,
             native_options, max_tokens, temperature, top_p, top_k, seed, stop):
        """Chat with MODEL in the terminal, through the model's chat template.

        Type a message and press Enter; `/reset` clears the history, `/exit` or Ctrl-D quits.
        """
        params = _params(max_tokens, temperature, top_p, top_k, seed, stop)
        session = _load(model, engine, scheme, args, ragged, device, impl, verbose,
                        native_options)
        session.apply_chat_template([{"role": "user", "content": "hi"}])  # fail early
        history = [{"role": "system", "content": system}] if system else []
        start = len(history)
        while True:
            try:
                line = input("you> ")
            except EOFError:
                click.echo()
                return
            if line.strip() in ("/exit", "/quit"):
                return
            if line.strip() == "/reset":
                del history[start:]
                continue
            if not line.strip():
                continue
            history.append({"role": "user", "content": line})
            click.echo("model> ", nl=False)
            reply = []
            for out in session.stream(session.chat_prompt_ids(history), params):
                click.echo(out.text, nl=False)
                reply.append(out.text)
            click.echo()
            history.append({"role": "assistant", "content": "".join(reply)})
