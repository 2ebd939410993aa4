"""q's OpenAI-compatible front for a vLLM server: API key, body limit, streaming passthrough.

vLLM listens on 127.0.0.1 only; this app forwards ``/v1/models``, ``/v1/completions`` and
``/v1/chat/completions`` to it byte for byte (status, body, SSE chunks as they come) and
answers every error of its own with an OpenAI-style body.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging

import anyio
import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("q.engine.vllm")

# not forwarded either way: per-connection headers, and ones the other hop sets itself
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
              "trailer", "trailers", "transfer-encoding", "upgrade", "host", "content-length"}
DROP_REQUEST = HOP_BY_HOP | {"authorization", "accept-encoding", "cookie"}
DROP_RESPONSE = HOP_BY_HOP | {"date", "server"}
JSON_BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": {"type": "object", "description": "the OpenAI request, forwarded to vLLM"}}}}}


def error_body(message: str, type_: str = "invalid_request_error", param=None,
               code=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error(status: int, message: str, type_: str = "invalid_request_error", param=None,
          code=None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status)


class _Refused(Exception):
    def __init__(self, response: Response):
        self.response = response


def create_proxy_app(upstream_url: str, settings, *, process=None) -> FastAPI:
    """The proxy app in front of the vLLM server at ``upstream_url`` (``http://host:port``).

    ``settings`` is a :class:`q.server.app.ServerSettings` (api_key, max_request_bytes and
    max_tokens_limit apply here; vLLM does its own queueing). ``process`` (a
    :class:`VllmProcess`) lets ``/health`` tell a dead vLLM from a busy one.
    """
    upstream_url = upstream_url.rstrip("/")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        client = getattr(app.state, "client", None)
        if client is not None:
            await client.aclose()

    app = FastAPI(title="q (vLLM)", version=_version(), lifespan=lifespan,
                  description="OpenAI-compatible API: q's proxy in front of vLLM")

    def client() -> httpx.AsyncClient:
        if getattr(app.state, "client", None) is None:  # made on the serving event loop
            app.state.client = httpx.AsyncClient(
                base_url=upstream_url, timeout=httpx.Timeout(None, connect=10),
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        return app.state.client

    @app.exception_handler(_Refused)
    async def _refused(request, exc: _Refused):
        return exc.response

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        detail = exc.detail if isinstance(exc.detail, str) else "invalid request"
        return error(exc.status_code, detail,
                     "invalid_request_error" if exc.status_code < 500 else "server_error")

    def check_key(request: Request) -> None:
        if settings.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                 settings.api_key.encode()):
            raise _Refused(error(401, "missing or wrong API key: send 'Authorization: Bearer "
                                      "KEY'", "authentication_error", code="invalid_api_key"))

    async def read_body(request: Request) -> bytes:
        limit = settings.max_request_bytes
        too_large = _Refused(error(413, f"the request body is larger than {limit} bytes"))
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large
        return bytes(body)

    def check_max_tokens(body: bytes) -> None:
        limit = getattr(settings, "max_tokens_limit", None)
        try:
            obj = json.loads(body)
        except ValueError:
            return  # vLLM answers malformed JSON itself
        if not (limit and isinstance(obj, dict)):
            return
        for key in ("max_tokens", "max_completion_tokens"):
            value = obj.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > limit:
                raise _Refused(error(400, f"{key} {value} is above this server's limit of "
                                          f"{limit}", param=key))

    async def forward(request: Request, path: str, body: bytes | None = None) -> Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in DROP_REQUEST}
        headers["accept-encoding"] = "identity"  # raw bytes == the body the client reads
        req = client().build_request(request.method, path, content=body, headers=headers,
                                     params=request.query_params)
        try:
            upstream = await client().send(req, stream=True)
        except httpx.TransportError as exc:
            return upstream_unreachable(exc)
        return Passthrough(upstream)

    def upstream_unreachable(exc: Exception) -> JSONResponse:
        log.warning("vLLM at %s is not reachable: %r", upstream_url, exc)
        return error(502, f"the vLLM server behind this proxy is not reachable "
                          f"({type(exc).__name__}: {exc or 'no detail'}); it may still be "
                          "starting, or have stopped (see the server's log)", "server_error",
                     code="upstream_unavailable")

    @app.get("/health")
    async def health():
        if process is not None and process.returncode is not None:
            return error(503, f"vLLM exited with code {process.returncode}", "server_error",
                         code="upstream_exited")
        try:
            r = await client().get("/health", timeout=10)
        except httpx.TransportError as exc:
            return upstream_unreachable(exc)
        if r.status_code != 200:
            return error(503, f"vLLM is not healthy (its /health: {r.status_code})",
                         "server_error", code="upstream_unhealthy")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics(request: Request):
        """vLLM's Prometheus metrics."""
        return await forward(request, "/metrics")

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return await forward(request, "/v1/models")

    def generation_route(path: str):
        async def handler(request: Request):
            check_key(request)
            body = await read_body(request)
            check_max_tokens(body)
            return await forward(request, path, body)

        app.add_api_route(path, handler, methods=["POST"], openapi_extra=JSON_BODY,
                          name=path.rsplit("/", 1)[-1].replace(".", "_"))

    for path in ("/v1/completions", "/v1/chat/completions"):
        generation_route(path)

    return app


class Passthrough(Response):
    """An upstream httpx response sent on chunk by chunk. The upstream response is closed
    however this ends (done, client gone, error), so vLLM sees a disconnect and aborts."""

    def __init__(self, upstream: httpx.Response):
        self.upstream = upstream
        self.status_code = upstream.status_code
        self.background = None
        self.raw_headers = [(k.encode("latin-1"), v.encode("latin-1"))
                            for k, v in upstream.headers.multi_items()
                            if k.lower() not in DROP_RESPONSE]

    async def __call__(self, scope, receive, send):
        failed: list[Exception] = []
        try:
            async with anyio.create_task_group() as tg:
                async def stream():
                    try:
                        await self._stream(send)
                    except (httpx.TransportError, OSError) as exc:  # raised below, ungrouped
                        failed.append(exc)
                    tg.cancel_scope.cancel()

                async def watch_disconnect():
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    tg.cancel_scope.cancel()  # stop reading from vLLM

                tg.start_soon(stream)
                tg.start_soon(watch_disconnect)
        finally:
            with anyio.CancelScope(shield=True):
                await self.upstream.aclose()
        if failed:
            raise failed[0]
        if self.background is not None:
            await self.background()

    async def _stream(self, send):
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        try:
            async for chunk in self.upstream.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except httpx.TransportError as exc:
            log.warning("vLLM's response broke off: %r", exc)
            if self.upstream.headers.get("content-type", "").startswith("text/event-stream"):
                event = error_body(f"the vLLM server stopped answering mid-stream ({exc})",
                                   "server_error", code="upstream_unavailable")
                await send({"type": "http.response.body", "more_body": True,
                            "body": f"data: {json.dumps(event)}\n\n".encode()})
            else:
                raise  # an incomplete JSON body: end the connection so the client sees it
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def run_proxy(app, host: str, port: int, process=None) -> int | None:
    """Serve ``app`` with uvicorn until Ctrl-C/SIGTERM, or until vLLM (``process``) exits;
    returns vLLM's exit code in that last case."""
    import threading

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    died: list[int] = []

    def watch():
        code = _wait_exit(process)
        if not process.stopping:
            died.append(code)
            log.error("vLLM exited (code %s); stopping the proxy", code)
            server.should_exit = True

    if process is not None:
        threading.Thread(target=watch, daemon=True, name="vllm-watch").start()
    server.run()
    return died[0] if died else None


def _wait_exit(process) -> int:
    import time

    while process.returncode is None and not process.stopping:
        time.sleep(0.5)
    return process.returncode


def _version() -> str:
    from q import __version__

    return __version__
