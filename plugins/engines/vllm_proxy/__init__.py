"""The ``vllm`` engine: ``q serve MODEL --engine vllm`` runs vLLM's OpenAI server on
127.0.0.1 and q's proxy in front of it (API key, body limit, the same routes as q's server).

vLLM loads q's compressed-tensors output and unquantized models as they are; other q
formats (hf-fp8) are exported to compressed-tensors into q's cache first. The engine only
serves: ``q generate`` and ``q.pipeline`` use the native engine.

This module stays light (no vllm, fastapi or httpx import) because every q command loads
it through its entry point.
"""

from __future__ import annotations

import logging
import os
import shlex

import click
import q
from q.errors import IncompatibleError, OptionError, QError
from q.interfaces import Engine, EngineSupport

from . import launch
from .launch import fallback_commands, vllm_command
from .offline import INSTALL_HINT, missing_vllm_reason, resolve_vllm_python

log = logging.getLogger("q.engine.vllm")


class VllmEngine(Engine):
    name = "vllm"
    description = ("vLLM's OpenAI server behind q's proxy (`q serve --engine vllm`; "
                   "needs vLLM, in q's environment or at --vllm-python)")
    moe = ("every MoE model vLLM serves, with its fused MoE kernels and expert parallelism "
           "(`Q_VLLM_ARGS=--enable-expert-parallel q serve MODEL --engine vllm`)")

    def support(self, report):
        from .support import VLLM_CPU, vllm_cpu_verdict

        verdict = vllm_cpu_verdict(report)
        return [EngineSupport(VLLM_CPU, verdict.runs, verdict.reason)]

    def score(self, checkpoints, windows, prompts, *, max_tokens, vllm_python=None, **_):
        from .offline import score

        results = score(checkpoints, windows, prompts, max_tokens=max_tokens,
                        python=vllm_python, ignore_eos=False,
                        max_model_len=max(len(w) for w in windows) + max_tokens + 64)
        for name, r in results.items():
            if not r.ok:
                raise IncompatibleError(f"vLLM ({resolve_vllm_python(vllm_python)}) cannot run "
                                        f"{checkpoints[name]}: {r.error_type}: {r.error}")
        return {name: {"top1": r.top1, "logprob": r.logprob, "greedy": r.greedy}
                for name, r in results.items()}

    def load(self, path, *, scheme=None, args=None, **options):
        raise IncompatibleError(
            "the vllm engine only serves: run `q serve MODEL --engine vllm`; for "
            "`q generate` and `q.pipeline` use the native engine (--engine native, the "
            "default)")

    def serve(self, model, *, settings, host, port, tensor_parallel_size=1, scheme=None,
              args=None, ragged="skip", startup_timeout=None, vllm_args=(), vllm_python=None,
              **_):
        """Serve ``model`` with vLLM behind q's proxy on ``host:port`` until Ctrl-C.

        ``vllm_args`` (or the ``Q_VLLM_ARGS`` environment variable, shell-quoted) are
        appended to vLLM's command line, e.g. ``--max-model-len 8192``. ``startup_timeout``
        (default ``Q_VLLM_STARTUP_TIMEOUT`` or 900 s) bounds vLLM's start. ``vllm_python``
        (or ``Q_VLLM_PYTHON``) is the interpreter that has vLLM, if not q's own: vLLM's CPU
        build, for one, pins versions that need a virtual environment of its own.
        """
        if scheme:
            first = shlex.join(["q", "quantize", str(model), "--scheme", scheme, "--format",
                                "vllm", "-o", "OUT"])
            raise OptionError(
                "online quantization with vLLM is not wired into q; quantize first, then "
                f"serve the result:\n  {first}\n  q serve OUT --engine vllm")
        if args:
            raise OptionError("--arg sets options of --scheme, which the vllm engine does "
                              "not take")
        if tensor_parallel_size < 1:
            raise OptionError(f"--tensor-parallel-size must be 1 or more, got "
                              f"{tensor_parallel_size}")
        extra = [*vllm_args, *shlex.split(os.environ.get("Q_VLLM_ARGS", ""))]
        timeout = launch.startup_timeout(startup_timeout)
        fmt_name = launch.checkpoint_format(model)
        python = resolve_vllm_python(vllm_python)
        missing = missing_vllm_reason(python)
        if missing:
            steps = fallback_commands(model, fmt_name, served_model_name=settings.model_name,
                                      host=host, port=port,
                                      tensor_parallel_size=tensor_parallel_size,
                                      api_key=settings.api_key is not None, extra=extra)
            raise QError(
                f"{missing}; {INSTALL_HINT}, then rerun. Or serve the checkpoint with a vLLM "
                "installed elsewhere:\n  " + "\n  ".join(steps))
        launch.check_port_free(host, port)
        model_dir = launch.prepare_checkpoint(model, fmt_name)
        upstream_port = launch.free_port()
        argv = vllm_command(model_dir.absolute(), served_model_name=settings.model_name,
                            port=upstream_port, tensor_parallel_size=tensor_parallel_size,
                            extra=extra, python=python)
        with launch.sigterm_as_interrupt():  # so the finally below runs on SIGTERM too
            process = launch.start_vllm(argv)
            try:
                _serve_with(process, f"http://{launch.UPSTREAM_HOST}:{upstream_port}",
                            settings, host, port, timeout)
            finally:
                process.terminate()


def _serve_with(process, upstream, settings, host, port, timeout):
    from .proxy import create_proxy_app, run_proxy

    click.echo(f"waiting for vLLM to load the model (up to {timeout:.0f} s)...", err=True)
    process.wait_ready(upstream, timeout)
    app = create_proxy_app(upstream, settings, process=process)
    shown = "localhost" if host in ("127.0.0.1", "0.0.0.0") else host
    click.echo(f"serving '{settings.model_name}' with vLLM at http://{shown}:{port}/v1 "
               f"(docs: http://{shown}:{port}/docs; "
               f"{'API key required' if settings.api_key else 'no API key'})", err=True)
    code = run_proxy(app, host, port, process)
    if code is not None:
        raise process.failure("vLLM stopped while serving")


@q.hookimpl
def register_engines(register):
    register(VllmEngine())
