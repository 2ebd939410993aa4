"""The OpenAI-compatible FastAPI app over an engine Session (``q serve``).

Routes: ``GET /health``, ``GET /metrics``, ``GET /v1/models``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (streaming over SSE). Every error is an OpenAI-style body
``{"error": {"message", "type", "param", "code"}}`` with a 4xx status; the engine runs on
its own thread (:class:`EngineLoop`), so a bad request never disturbs the running batch.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from dataclasses import dataclass

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import QError
from ..generation import SamplingParams
from ..interfaces import Session
from .engine_loop import EngineFailed, EngineLoop, QueueFull
from .metrics import Metrics
from .responses import ChoiceState, chat_chunk, completion_chunk, final_body, usage_of
from .schemas import SEED_MAX, ChatCompletionRequest, CompletionRequest, _is_utf8


@dataclass
class ServerSettings:
    model_name: str
    api_key: str | None = None
    max_tokens_limit: int = 4096  # largest max_tokens a request may ask for
    max_request_bytes: int = 2 << 20
    max_queue: int = 256


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        # messages may quote user input: make them encodable (lone surrogates become escapes)
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        param = None if param is None else param.encode("utf-8", "backslashreplace").decode()
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = \
            status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def create_app(session: Session, settings: ServerSettings):
    metrics = Metrics()
    loop = EngineLoop(session, max_queue=settings.max_queue, metrics=metrics)
    app = FastAPI(title="q", version=_version(),
                  description="OpenAI-compatible API over q's engines")
    app.state.engine_loop, app.state.metrics = loop, metrics
    app.add_middleware(BodySizeLimit, limit=settings.max_request_bytes)

    def error_response(err: APIError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(APIError)
    async def _api_error(request, err: APIError):
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        msg = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            msg = "the request body is not valid JSON"
        elif first.get("type") == "extra_forbidden":
            msg = f"unknown field '{loc[-1]}'" if loc else "unknown field"
        param = ".".join(loc) or None
        text = f"{param}: {msg}" if param and not msg.startswith("unknown") else msg
        return error_response(APIError(400, text, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        # FastAPI's own 4xx (a body that is not UTF-8, unknown route, wrong method)
        detail = exc.detail if isinstance(exc.detail, str) else "invalid request"
        if "parsing the body" in detail:
            detail = "the request body is not valid UTF-8 JSON"
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error_response(APIError(exc.status_code, detail, type_))

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):
        return error_response(APIError(500, f"internal error: {exc}", "server_error"))

    app.add_middleware(ObserveRequests, metrics=metrics)

    def check_key(request: Request):
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip(),
                                                                 settings.api_key):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                           "authentication_error", code="invalid_api_key")

    def check_model(name: str):
        if name != settings.model_name:
            raise APIError(404, f"the model '{name}' does not exist; this server serves "
                                f"'{settings.model_name}' (GET /v1/models)",
                           param="model", code="model_not_found")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models():
        return {"object": "list", "data": [{
            "id": settings.model_name, "object": "model", "created": int(time.time()),
            "owned_by": "q", "max_model_len": session.context_length}]}

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        _refuse_unsupported(body)
        prompts = _completion_prompts(session, body.prompt)
        max_tokens = body.max_tokens or 16
        return await _generate(request, body, prompts, max_tokens, chat=False,
                               top_logprobs=body.logprobs)

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        _refuse_unsupported(body)
        try:
            ids = session.chat_prompt_ids(body.template_messages())
        except QError as exc:
            raise APIError(400, str(exc), param="messages") from None
        except Exception as exc:  # a template that rejects these messages (role order...)
            raise APIError(400, f"the chat template rejected the messages: {exc}",
                           param="messages") from None
        max_tokens = body.max_completion_tokens or body.max_tokens
        top = (body.top_logprobs or 0) if body.logprobs else None
        return await _generate(request, body, [ids], max_tokens, chat=True, top_logprobs=top)

    async def _generate(request, body, prompts, max_tokens, *, chat, top_logprobs):
        params = [_sampling(body, p, max_tokens, settings, session, i, top_logprobs)
                  for p in prompts for i in range(body.n)]
        inputs = [p for p in prompts for _ in range(body.n)]
        states = [ChoiceState(i, len(inputs[i]), session.tokenizer, chat, i % body.n == 0)
                  for i in range(len(inputs))]
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        meta = {"id": rid, "created": int(time.time()), "model": settings.model_name}
        submitted = _submit_all(loop, inputs, params)
        merged = _merge(loop, submitted, metrics)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            make = chat_chunk if chat else completion_chunk
            # aborting finished requests is a no-op; this frees slots whose client left
            # before the body started (the stream's own cleanup never ran then)
            cleanup = BackgroundTask(lambda: [loop.abort(rid) for rid, _ in submitted])
            return StreamingResponse(_sse(merged, states, meta, make, include_usage),
                                     media_type="text/event-stream", background=cleanup)
        try:
            await _collect(request, merged, states)
        finally:
            await merged.aclose()
        return final_body(states, meta, chat)

    app.openapi = lambda: _openapi_with_openai_errors(app)
    return app


def _openapi_with_openai_errors(app):
    """FastAPI documents validation failures as 422 ``HTTPValidationError``; this server
    answers 400 with OpenAI's error body, so say that in the spec (schemathesis checks it)."""
    if app.openapi_schema:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(title=app.title, version=app.version, description=app.description,
                         routes=app.routes)
    error_ref = {"$ref": "#/components/schemas/ErrorResponse"}
    errors = {str(code): {"description": why, "content": {"application/json": {
        "schema": error_ref}}} for code, why in (
        (400, "invalid request"), (401, "missing or wrong API key"),
        (404, "unknown model"), (413, "request body too large"), (429, "queue full"))}
    for path, item in schema.get("paths", {}).items():
        for op in item.values():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            if path.startswith("/v1/"):
                responses.update(errors)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    components["ErrorResponse"] = {
        "type": "object", "required": ["error"], "properties": {"error": {
            "type": "object", "required": ["message", "type"], "properties": {
                "message": {"type": "string"}, "type": {"type": "string"},
                "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
    app.openapi_schema = schema
    return schema


def _version() -> str:
    from .. import __version__

    return __version__


def _refuse_unsupported(body) -> None:
    problem = body.unsupported()
    if problem:
        raise APIError(400, f"{problem[0]}: {problem[1]}", param=problem[0])


def _completion_prompts(session, prompt) -> list[list[int]]:
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        prompt = [prompt]
    out, vocab = [], len(session.tokenizer)
    for p in prompt:
        if isinstance(p, str) and not _is_utf8(p):
            raise APIError(400, "prompt must be valid UTF-8 text (no unpaired surrogates)",
                           param="prompt")
        ids = session.tokenize(p) if isinstance(p, str) else list(p)
        if not ids:
            raise APIError(400, "prompt must not be empty", param="prompt")
        if any(not 0 <= t < vocab for t in ids):
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        out.append(ids)
    return out


def _sampling(body, prompt_ids, max_tokens, settings, session, i, top_logprobs):
    room = session.context_length - len(prompt_ids)
    if room <= 0:
        raise APIError(400, f"this model's maximum context length is {session.context_length} "
                            f"tokens; the prompt has {len(prompt_ids)}", param="messages"
                       if isinstance(body, ChatCompletionRequest) else "prompt",
                       code="context_length_exceeded")
    if max_tokens is None:  # as much as the context, this server and the engine's KV cache allow
        capacity = getattr(session, "kv_cache_tokens", None) or session.context_length
        max_tokens = max(1, min(room, settings.max_tokens_limit, capacity - len(prompt_ids)))
    if max_tokens > settings.max_tokens_limit:
        raise APIError(400, f"max_tokens {max_tokens} is above this server's limit of "
                            f"{settings.max_tokens_limit}", param="max_tokens")
    if len(prompt_ids) + max_tokens > session.context_length:
        raise APIError(400, f"this model's maximum context length is {session.context_length} "
                            f"tokens; you asked for {len(prompt_ids) + max_tokens} "
                            f"({len(prompt_ids)} in the prompt, {max_tokens} to generate)",
                       param="max_tokens", code="context_length_exceeded")
    seed = None if body.seed is None else (body.seed + i) % (SEED_MAX + 1)
    try:
        return SamplingParams(max_tokens=max_tokens, temperature=body.temperature,
                              top_p=body.top_p, top_k=max(body.top_k, 0), seed=seed,
                              stop=body.stop_strings(), ignore_eos=body.ignore_eos,
                              logprobs=top_logprobs)
    except QError as exc:
        raise APIError(400, str(exc)) from None


def _submit_all(loop: EngineLoop, inputs, params) -> list:
    """Submit every choice before anything is awaited, so they share the running batch and
    a full queue or a bad prompt is a 4xx status (not an error inside a 200 stream); if one
    is refused, none stays submitted."""
    submitted = []
    try:
        for p, sp in zip(inputs, params):
            submitted.append(loop.submit(p, sp))
    except (QueueFull, QError) as exc:
        for rid, _ in submitted:
            loop.abort(rid)
        if isinstance(exc, QueueFull):
            raise APIError(429, str(exc), "rate_limit_error", code="queue_full") from None
        raise APIError(400, str(exc)) from None
    return submitted


async def _merge(loop: EngineLoop, submitted, metrics):
    """Yield (choice index, RequestOutput) from every submitted request as they come."""
    queue: asyncio.Queue = asyncio.Queue()
    start = time.perf_counter()

    async def pump(i, rid, q):
        gen = loop.stream(rid, q)
        try:
            first = True
            async for out in gen:
                if first:
                    metrics.ttft.observe(time.perf_counter() - start)
                    first = False
                await queue.put((i, out))
        except Exception as exc:
            await queue.put((i, exc))
        finally:
            await gen.aclose()

    tasks = [asyncio.create_task(pump(i, rid, q)) for i, (rid, q) in enumerate(submitted)]
    done = 0
    try:
        while done < len(tasks):
            i, out = await queue.get()
            if isinstance(out, EngineFailed):
                raise APIError(500, str(out), "server_error")
            if isinstance(out, Exception):
                raise out
            metrics.generation_tokens.inc(len(out.token_ids))
            if out.finished:
                done += 1
                metrics.prompt_tokens.inc(out.prompt_tokens)
            yield i, out
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _collect(request, merged, states) -> None:
    async def consume():
        async for i, out in merged:
            states[i].add(out)

    task = asyncio.ensure_future(consume())
    while not task.done():
        await asyncio.wait({task}, timeout=0.5)
        if not task.done() and await request.is_disconnected():
            task.cancel()  # the generators' finally blocks abort the engine requests
            break
    if not task.cancelled():
        task.result()


async def _sse(merged, states, meta, make_chunk, include_usage):
    try:
        if make_chunk is chat_chunk:
            for s in states:
                yield _event(chat_chunk(meta, s.index, {"role": "assistant", "content": ""},
                                        None, None, include_usage))
        async for i, out in merged:
            state = states[i]
            delta_text, logprobs = state.add(out)
            if delta_text or logprobs or out.finished:
                yield _event(make_chunk(meta, i, delta_text, logprobs,
                                        out.finish_reason if out.finished else None,
                                        include_usage))
        if include_usage:
            yield _event({**meta, "object": _object(make_chunk), "choices": [],
                          "usage": usage_of(states)})
        yield "data: [DONE]\n\n"
    except APIError as err:
        yield _event(err.body())
    finally:
        await merged.aclose()


def _object(make_chunk) -> str:
    return "chat.completion.chunk" if make_chunk is chat_chunk else "text_completion"


def _event(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class ObserveRequests:
    """ASGI middleware: count requests by path and status, time the completions endpoints
    (to the end of the body, so streams count whole)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or not (path.startswith("/v1/") or path == "/health"):
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def observing_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observing_send)
        finally:
            self.metrics.requests.labels(path, str(status[0])).inc()
            if path.endswith("completions"):
                self.metrics.latency.labels(path).observe(time.perf_counter() - start)


class BodySizeLimit:
    """ASGI middleware: refuse request bodies above ``limit`` bytes with a 413."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _too_large(send, self.limit)
        seen = 0

        async def counting_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _BodyTooLarge()
            return message

        try:
            await self.app(scope, counting_receive, send)
        except _BodyTooLarge:
            await _too_large(send, self.limit)


class _BodyTooLarge(Exception):
    pass


async def _too_large(send, limit):
    body = json.dumps(APIError(413, f"the request body is larger than {limit} bytes").body())
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body.encode()})
