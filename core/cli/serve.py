"""``q serve``: an OpenAI-compatible HTTP server over an engine (port 23333, like LMDeploy)."""

from __future__ import annotations

import os

import click

from ..errors import QError
from .generate import engine_options, native_options_for, setup_logging
from .quantize import parse_extra_args

DEFAULT_PORT = 23333


def _need_serve_extra():
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise QError(f"`q serve` needs the serve extra ({exc.name} is missing): "
                     "pip install 'q-quant[serve]'") from None


def add_commands(cli: click.Group) -> None:
    @cli.command()
    @click.argument("model", type=click.Path(file_okay=False))
    @engine_options
    @click.option("--host", default="127.0.0.1", show_default=True,
                  help="address to bind; 0.0.0.0 exposes the server to the network")
    @click.option("--port", default=DEFAULT_PORT, show_default=True, type=int)
    @click.option("--api-key", envvar="Q_API_KEY", show_envvar=True,
                  help="require 'Authorization: Bearer KEY' on /v1 routes")
    @click.option("--served-model-name", help="model id clients send (default: the "
                  "directory name)")
    @click.option("--max-batch", default=32, show_default=True, type=int,
                  help="requests decoded together")
    @click.option("--max-queue", default=256, show_default=True, type=int,
                  help="waiting requests before new ones get 429")
    @click.option("--max-tokens-limit", default=4096, show_default=True, type=int,
                  help="largest max_tokens a request may ask for")
    @click.option("--max-request-bytes", default=2 << 20, show_default=True, type=int)
    @click.option("--tensor-parallel-size", "-tp", default=1, show_default=True, type=int,
                  help="GPUs per model (--engine vllm)")
    @click.option("--vllm-python", envvar="Q_VLLM_PYTHON", show_envvar=True,
                  type=click.Path(dir_okay=False),
                  help="Python interpreter that has vLLM (--engine vllm; default: q's own)")
    def serve(model, engine, scheme, args, ragged, device, impl, verbose, native_options, host,
              port, api_key,
              served_model_name, max_batch, max_queue, max_tokens_limit, max_request_bytes,
              tensor_parallel_size, vllm_python):
        """Serve MODEL over an OpenAI-compatible API (completions, chat, streaming).

        MODEL is a q or peer checkpoint, or a bf16 model with --scheme for online
        quantization. Swagger UI at /docs, the spec at /openapi.json, Prometheus metrics at
        /metrics, liveness at /health.
        """
        _need_serve_extra()  # before the server's imports, which need it
        from ..plugin_manager import get_registries
        from ..server.app import ServerSettings

        setup_logging(verbose)
        name = served_model_name or os.path.basename(os.path.normpath(model))
        settings = ServerSettings(model_name=name, api_key=api_key,
                                  max_tokens_limit=max_tokens_limit,
                                  max_request_bytes=max_request_bytes, max_queue=max_queue)
        engine_obj = get_registries().engines.get(engine)
        options = dict(scheme=scheme, args=parse_extra_args(args), ragged=ragged)
        native_options = native_options_for(engine, native_options)
        if hasattr(engine_obj, "serve"):  # engines with a server of their own (vllm)
            return engine_obj.serve(model, settings=settings, host=host, port=port,
                                    tensor_parallel_size=tensor_parallel_size,
                                    vllm_python=vllm_python, **options)
        if tensor_parallel_size != 1:
            raise QError(f"the {engine} engine runs on one device; --tensor-parallel-size "
                         "needs --engine vllm")
        from ..pipeline import load_engine

        session = load_engine(model, engine=engine, device=device, impl=impl,
                              max_batch=max_batch, **options, **native_options)
        run_server(session, settings, host, port)


def run_server(session, settings, host: str, port: int) -> None:
    import uvicorn

    from ..server.app import create_app

    app = create_app(session, settings)
    shown = "localhost" if host in ("127.0.0.1", "0.0.0.0") else host
    click.echo(f"serving '{settings.model_name}' at http://{shown}:{port}/v1 "
               f"(docs: http://{shown}:{port}/docs; "
               f"{'API key required' if settings.api_key else 'no API key'})", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
