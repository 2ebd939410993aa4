"""Property-based fuzzing of the OpenAI-compatible server: no request gets a 5xx.

Three fuzzers, all over real HTTP against a uvicorn server running a tiny random Llama (fast
on CPU), with ``max_tokens_limit=64`` so accepted requests stay cheap:

* schemathesis, from the app's own OpenAPI document (``test_served_schema_*``): valid
  requests (positive mode), requests that break the schema (negative mode: wrong types,
  missing or unknown fields, out-of-range numbers) and its coverage phase (the boundary
  values of every constraint);
* schemathesis again on the document tightened with the rules the server enforces beyond it
  (``test_pinned_schema_*``), so positive cases reach the engine instead of all being 404s
  for an unknown model;
* hypothesis (``test_hostile_*``): a valid body with a few fields replaced by hostile values
  schemathesis does not produce (integers past 2**64, subnormal floats, NaN, lone UTF-16
  surrogates, nested junk), and raw garbage or mutated JSON bytes.

The properties: no 5xx status and no error event inside a 200 stream; every 4xx body is an
OpenAI-style ``{"error": {"message": str, "type": str, ...}}``; afterwards a normal completion
still returns 200 and the engine is idle. Server bugs the fuzzers found (seed overflow, tiny
temperatures, lone surrogates) are fixed and pinned as regression cases in ``FOUND_BUGS``.

The schemathesis schema is built at import time from the app's ``openapi()`` (the routes do
not depend on the session, so an app over no session suffices), because schemathesis' lazy
``from_fixture`` loader fails on pytest 9 (it sets ``Function._nodeid``);
``test_the_fuzzed_schema_is_the_served_one`` checks it is the document the running server
serves at ``/openapi.json``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter

import httpx
import pytest

import q

from .server_fixtures import running_server

schemathesis = pytest.importorskip("schemathesis")  # hypothesis comes with it
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

MODEL = "m"
MAX_EXAMPLES = 40  # schemathesis fuzzing examples per operation and mode
HOSTILE_EXAMPLES = 150  # hostile JSON bodies
GARBAGE_EXAMPLES = 100  # raw byte bodies
MAX_TOKENS_LIMIT = 64  # the fuzzed server's limit: generated requests stay cheap
VOCAB = 512  # the tiny model's vocabulary (tests/conftest.py)
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"


def _openapi_document() -> dict:
    from q.server.app import ServerSettings, create_app

    app = create_app(None, ServerSettings(model_name=MODEL))  # never steps: no request comes
    try:
        return app.openapi()
    finally:
        app.state.engine_loop.close()


def _pinned(spec: dict) -> dict:
    """The document plus the rules the server enforces beyond it: the one served model name,
    max_tokens within the server's limit, non-empty prompts and messages, token ids within
    the tiny model's vocabulary, and the unsupported options left at their defaults.
    Positive cases from it mostly reach the engine (from the served document alone nearly
    every one is a 404 for an unknown model or a 400 for an empty prompt or a penalty);
    negative cases break exactly these rules."""
    spec = json.loads(json.dumps(spec))
    schemas = spec["components"]["schemas"]
    off = {"presence_penalty": {"type": "number", "enum": [0]},
           "frequency_penalty": {"type": "number", "enum": [0]},
           "logit_bias": {"type": "null"}, "echo": {"type": "boolean", "enum": [False]},
           "suffix": {"type": "null"}, "best_of": {"type": "null"}, "tools": {"type": "null"},
           "stop": {"anyOf": [{"type": "string", "minLength": 1},
                              {"type": "array", "maxItems": 4,
                               "items": {"type": "string", "minLength": 1}},
                              {"type": "null"}]}}
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        props = schemas[name]["properties"]
        props["model"] = {"type": "string", "enum": [MODEL]}
        props.update({key: value for key, value in off.items() if key in props})
        for key in ("max_tokens", "max_completion_tokens"):
            if key in props:
                props[key]["anyOf"][0]["maximum"] = MAX_TOKENS_LIMIT
    token = {"type": "integer", "minimum": 0, "maximum": VOCAB - 1}
    ids = {"type": "array", "minItems": 1, "items": token}
    schemas["CompletionRequest"]["properties"]["prompt"] = {"anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
        ids, {"type": "array", "minItems": 1, "items": ids}]}
    schemas["ChatCompletionRequest"]["properties"]["messages"]["minItems"] = 1
    schemas["ContentPart"]["properties"]["type"] = {"type": "string", "enum": ["text"]}
    schemas["ResponseFormat"]["properties"]["type"] = {"type": "string", "enum": ["text"]}
    return spec


def _configured(spec: dict):
    loaded = schemathesis.openapi.from_dict(spec)
    loaded.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                                    max_examples=MAX_EXAMPLES, deterministic=True)
    # read whole streams (n <= 16 choices of <= 64 tokens); schemathesis stops at 100 events
    loaded.config.max_stream_events = 10_000
    return loaded


SPEC = _openapi_document()
served_schema = _configured(SPEC)  # the document as served: every operation
pinned_schema = _configured(_pinned(SPEC)).include(method="POST")
SEEN: Counter = Counter()  # (fuzzer, path, status) of every schemathesis request


@pytest.fixture(scope="module", autouse=True)
def _quiet_server_logs():
    """Silence the server's exception logs (uvicorn's "Exception in ASGI application", the
    engine loop's "engine step failed"): a 500 is asserted from the response, and on Python
    3.11 formatting a traceback in the server thread while pytest formats one in the main
    thread can corrupt the shared AST recursion counter (CPython gh-106905), which makes
    pytest die with INTERNALERROR 'AST constructor recursion depth mismatch'."""
    loggers = [logging.getLogger(name) for name in ("uvicorn.error", "q.server")]
    drop = _DropExceptions()  # a filter: uvicorn's dictConfig resets `disabled`, not filters
    for logger in loggers:
        logger.addFilter(drop)
    yield
    for logger in loggers:
        logger.removeFilter(drop)


class _DropExceptions(logging.Filter):
    def filter(self, record):
        return record.exc_info is None


@pytest.fixture(scope="module")
def fuzz_server(tiny_llama):
    session = q.load_engine(tiny_llama())
    with running_server(session, model_name=MODEL,
                        max_tokens_limit=MAX_TOKENS_LIMIT) as (url, app):
        yield url, app


# --- the properties ---------------------------------------------------------------------------

def check_response(status: int, content_type: str, content: bytes, what: str,
                   whole_stream: bool = True) -> None:
    """No 5xx; a 4xx has an OpenAI error body; a 200 stream has no error event (and ends with
    [DONE] when it was read whole)."""
    where = f"{what} -> {status} {content[:600]!r}"
    assert status < 500, where
    if 400 <= status < 500:
        try:
            body = json.loads(content)
        except ValueError:
            raise AssertionError("the 4xx body is not JSON: " + where) from None
        assert isinstance(body, dict) and isinstance(body.get("error"), dict), where
        error = body["error"]
        assert isinstance(error.get("message"), str) and error["message"], where
        assert isinstance(error.get("type"), str) and error["type"], where
    elif status == 200 and content_type.startswith("text/event-stream"):
        events = [line[len("data:"):].strip() for line in
                  content.decode("utf-8", "replace").splitlines() if line.startswith("data:")]
        if whole_stream:
            assert events and events[-1] == "[DONE]", where
        for event in events:
            assert event == "[DONE]" or "error" not in json.loads(event), where


def post_raw(url: str, path: str, content: bytes, content_type: str | None = "application/json"):
    headers = {"content-type": content_type} if content_type else {}
    return httpx.post(url + path, content=content, headers=headers, timeout=60)


def encode(body) -> bytes:
    # json.dumps escapes lone surrogates as \ud800 and writes NaN/Infinity, which Python's
    # JSON parser (the server's) reads back; httpx's json= would refuse both
    return json.dumps(body).encode()


def check_http(r: httpx.Response, what: str) -> None:
    check_response(r.status_code, r.headers.get("content-type", ""), r.content, what)


# --- schemathesis ------------------------------------------------------------------------------

def _fuzz_one(case, url: str, label: str) -> None:
    response = case.call(base_url=url, timeout=60)
    SEEN[label, case.path, response.status_code] += 1
    content_type = (response.headers.get("content-type") or [""])[0]
    check_response(response.status_code, content_type, response.content or b"",
                   f"{case.method} {case.path} query={case.query!r} body={case.body!r}",
                   whole_stream=not response.stream_cut_short)


SETTINGS = settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


@served_schema.parametrize()
@SETTINGS
def test_served_schema_no_5xx_and_openai_4xx(case, fuzz_server):
    _fuzz_one(case, fuzz_server[0], "served")


@pinned_schema.parametrize()
@SETTINGS
def test_pinned_schema_no_5xx_and_openai_4xx(case, fuzz_server):
    _fuzz_one(case, fuzz_server[0], "pinned")


def test_schemathesis_reached_the_engine_and_the_validators():
    """Guards against a fuzz that only ever sends rejected requests (or only valid ones)."""
    if not SEEN:
        pytest.skip("run together with the schemathesis tests")
    for path in (COMPLETIONS, CHAT):
        assert SEEN["pinned", path, 200] >= 10, sorted(SEEN.items())
        assert SEEN["pinned", path, 400] >= 10, sorted(SEEN.items())


def test_the_fuzzed_schema_is_the_served_one(fuzz_server):
    served = httpx.get(fuzz_server[0] + "/openapi.json", timeout=30).json()
    assert served == json.loads(json.dumps(SPEC))


# --- hypothesis: hostile values and garbage bytes ------------------------------------------------

ODD_INTS = [-1, 0, 1, 2, 16, 17, 64, 65, VOCAB - 1, VOCAB, 2**31, 2**63 - 1, 2**63,
            2**64 - 17, 10**30, -(10**30)]
ODD_FLOATS = [-0.0, 5e-324, 1e-300, 1e-39, 1e-7, 0.5, 1.0000001, 2.0000001, 1e308,
              math.inf, -math.inf, math.nan]
ODD_STRINGS = ["", " ", "\x00", "m", "w5", "text", "user", "\U0001f600", "\u202e", "<s>", "</s>",
               "\ud800", "w5 \udfff", "w5 " * 300]
scalars = st.one_of(st.sampled_from([None, True, False, *ODD_INTS, *ODD_FLOATS, *ODD_STRINGS]),
                    st.integers(), st.floats(), st.text(max_size=12))
junk = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.sampled_from(["type", "text", "role", "content", "include_usage", "x", "\ud800"]),
    inner, max_size=3), max_leaves=6)
messages = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant", "tool", "bot",
                              "\ud800"]),
     "content": st.one_of(st.sampled_from(ODD_STRINGS), st.none(),
                          st.lists(st.fixed_dictionaries({"type": st.sampled_from(
                              ["text", "image_url", "\ud800"]), "text": scalars}), max_size=2),
                          junk)}), max_size=3)
numbers = st.one_of(st.sampled_from(ODD_INTS + ODD_FLOATS), st.integers(),
                    st.floats(allow_subnormal=True))
strings = st.sampled_from(ODD_STRINGS) | st.text(max_size=12)
token_ids = st.lists(st.sampled_from(ODD_INTS) | st.integers(-2, VOCAB + 2), max_size=4)
# mostly the right JSON type with an odd value (so the request passes type validation and
# reaches the handlers and the engine), else anything
BY_FIELD = {
    **dict.fromkeys(["max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "seed",
                     "presence_penalty", "frequency_penalty", "top_k", "top_logprobs",
                     "best_of"], numbers),
    **dict.fromkeys(["stream", "ignore_eos", "echo", "store", "parallel_tool_calls"],
                    st.booleans()),
    **dict.fromkeys(["model", "user", "service_tier", "suffix", "tool_choice"], strings),
    "logprobs": numbers | st.booleans(),
    "stop": strings | st.lists(strings, max_size=5),
    "prompt": strings | st.lists(strings, max_size=3) | token_ids
    | st.lists(token_ids, max_size=3),
    "messages": messages,
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans(),
                                                          "continuous_usage_stats": junk}),
}
FIELDS = {path: sorted(SPEC["components"]["schemas"][name]["properties"]) + ["bogus"]
          for path, name in ((COMPLETIONS, "CompletionRequest"), (CHAT, "ChatCompletionRequest"))}
BASE = {COMPLETIONS: {"model": MODEL, "prompt": "w5 w6", "max_tokens": 4},
        CHAT: {"model": MODEL, "messages": [{"role": "user", "content": "w5"}], "max_tokens": 4}}


@st.composite
def hostile_requests(draw):
    path = draw(st.sampled_from([COMPLETIONS, CHAT]))
    body = dict(BASE[path], stream=draw(st.booleans()))
    for key in draw(st.lists(st.sampled_from(FIELDS[path]), min_size=1, max_size=4,
                             unique=True)):
        typed = BY_FIELD.get(key)
        body[key] = draw(typed | typed | junk if typed is not None else junk)
    return path, body


def _as_number(value) -> float | None:
    if isinstance(value, (bool, int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _has_surrogate(value) -> bool:
    if isinstance(value, str):
        return any("\ud800" <= ch <= "\udfff" for ch in value)
    if isinstance(value, dict):
        return any(_has_surrogate(k) or _has_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_surrogate(v) for v in value)
    return False


@given(hostile=hostile_requests())
@settings(max_examples=HOSTILE_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_hostile_values_no_5xx_and_openai_4xx(fuzz_server, hostile):
    path, body = hostile
    check_http(post_raw(fuzz_server[0], path, encode(body)), f"POST {path} {body!r}")


@st.composite
def garbage_bodies(draw):
    path = draw(st.sampled_from([COMPLETIONS, CHAT]))
    valid = encode(BASE[path])
    kind = draw(st.sampled_from(["bytes", "truncated", "spliced"]))
    if kind == "bytes":
        content = draw(st.binary(max_size=64))
    elif kind == "truncated":
        content = valid[:draw(st.integers(0, len(valid) - 1))]
    else:
        at = draw(st.integers(0, len(valid)))
        content = valid[:at] + draw(st.binary(min_size=1, max_size=8)) + valid[at:]
    content_type = draw(st.sampled_from(["application/json", "text/plain", None]))
    return path, content, content_type


@given(garbage=garbage_bodies())
@settings(max_examples=GARBAGE_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_garbage_bytes_no_5xx_and_openai_4xx(fuzz_server, garbage):
    path, content, content_type = garbage
    check_http(post_raw(fuzz_server[0], path, content, content_type),
               f"POST {path} ({content_type}) {content!r}")


# --- bugs the fuzzers found ----------------------------------------------------------------------

def _bug(name, path, body, reason):
    return pytest.param(path, body, id=name)


_SEED = ("seeds at or above 2**64 (or seed + choice index, with n > 1) reach "
         "torch.Generator.manual_seed: 500 'Overflow when unpacking long long'")
_TEMP = ("a positive temperature below ~1e-38 makes logits/temperature inf: the engine step "
         "raises 'probability tensor contains either inf, nan or element < 0', a 500 (or an "
         "error event in a 200 stream), and every other running request fails with it")
_SURROGATE = ("a lone UTF-16 surrogate (JSON \\ud800) in a prompt reaches the tokenizer "
              "(TypeError), and one echoed in an error message (model name, content part type) "
              "cannot be encoded as UTF-8 by the error response: 500")
FOUND_BUGS = [
    _bug("seed 2**64", COMPLETIONS,
         {"model": MODEL, "prompt": "w5", "max_tokens": 2, "seed": 2**64}, _SEED),
    _bug("seed 2**64-1 with n=2", COMPLETIONS,
         {"model": MODEL, "prompt": "w5", "max_tokens": 2, "seed": 2**64 - 1, "n": 2}, _SEED),
    _bug("temperature 1e-39", COMPLETIONS,
         {"model": MODEL, "prompt": "w5", "max_tokens": 2, "temperature": 1e-39}, _TEMP),
    _bug("temperature 1e-39 streamed", CHAT,
         {"model": MODEL, "messages": [{"role": "user", "content": "w5"}], "max_tokens": 2,
          "temperature": 1e-39, "stream": True}, _TEMP),
    _bug("surrogate in prompt", COMPLETIONS,
         {"model": MODEL, "prompt": "\ud800", "max_tokens": 2}, _SURROGATE),
    _bug("surrogate in prompt list", COMPLETIONS,
         {"model": MODEL, "prompt": ["w5", "\udfff"], "max_tokens": 2}, _SURROGATE),
    _bug("surrogate in model", COMPLETIONS,
         {"model": "m\ud800", "prompt": "w5", "max_tokens": 2}, _SURROGATE),
    _bug("surrogate in content part type", CHAT,
         {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "\ud800"}]}],
          "max_tokens": 2}, _SURROGATE),
]


@pytest.mark.parametrize("path,body", FOUND_BUGS)
def test_found_bug_stays_fixed(fuzz_server, path, body):
    check_http(post_raw(fuzz_server[0], path, encode(body)), f"POST {path} {body!r}")


def test_a_failing_request_does_not_break_the_others(tiny_llama):
    """A request the engine cannot sample (the tiny-temperature bug) must not end another
    client's stream: the app promises a bad request never disturbs the running batch."""
    session = q.load_engine(tiny_llama())
    step = session.step
    session.step = lambda: (time.sleep(0.01), step())[1]  # the healthy stream outlives the bad
    with running_server(session, model_name=MODEL,
                        max_tokens_limit=MAX_TOKENS_LIMIT) as (url, _):
        healthy = {"model": MODEL, "prompt": "w5", "max_tokens": MAX_TOKENS_LIMIT,
                   "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + COMPLETIONS, json=healthy, timeout=60) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data:"))
            bad = post_raw(url, COMPLETIONS, encode({
                "model": MODEL, "prompt": "w5", "max_tokens": 2, "temperature": 1e-39}))
            content = "\n".join([first, *lines]).encode()
        check_response(r.status_code, r.headers["content-type"], content,
                       f"a healthy stream next to a request that got {bad.status_code}")


def test_server_still_serves_after_fuzzing(fuzz_server):
    url, app = fuzz_server
    r = httpx.post(url + "/v1/completions", timeout=60,
                   json={"model": MODEL, "prompt": "w5 w6 w7", "max_tokens": 4,
                         "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1
    loop = app.state.engine_loop
    deadline = time.time() + 10
    while (loop.running() or loop.waiting()) and time.time() < deadline:
        time.sleep(0.05)
    assert loop.running() == 0 and loop.waiting() == 0
