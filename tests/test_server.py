"""`q serve` on the real SmolLM2, driven by the official openai SDK over real HTTP."""

from __future__ import annotations

import asyncio
import sys
import time

import httpx
import pytest

import q

from .server_fixtures import running_server

pytestmark = pytest.mark.slow
MODEL = "smollm2"


@pytest.fixture(scope="module")
def session():
    # fp32: greedy text batched must equal greedy text alone (below), and only fp32 compute
    # is batch-invariant here; bf16 GEMMs round differently for different numbers of rows
    # (docs/engine.md, "Compute dtype")
    return q.load_engine(q.default_model(), dtype="float32")


@pytest.fixture(scope="module")
def alone():
    """A second engine for the answers the server's must equal: the server's engine thread
    steps ``session`` whenever it has requests, so a test calling ``session.generate`` at
    the same time raced it (seen with the newest releases: a freed block read, a 500)."""
    return q.load_engine(q.default_model(), dtype="float32")


@pytest.fixture(scope="module")
def server(session):
    with running_server(session, model_name=MODEL, max_tokens_limit=512) as (url, app):
        yield url, app


@pytest.fixture
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def test_models(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]


def test_completion_matches_the_engine(client, alone):
    r = client.completions.create(model=MODEL, prompt="The capital of France is",
                                  max_tokens=12, temperature=0)
    direct = alone.generate(["The capital of France is"], max_tokens=12)[0]
    assert r.choices[0].text == direct.text
    assert r.choices[0].finish_reason == direct.finish_reason
    assert r.usage.prompt_tokens == direct.prompt_tokens
    assert r.usage.completion_tokens == len(direct.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_uses_the_chat_template(client, alone):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16,
                                       temperature=0)
    direct = alone.generate([alone.chat_prompt_ids(messages)], max_tokens=16)[0]
    assert r.choices[0].message.content == direct.text and "Paris" in direct.text
    assert r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == direct.prompt_tokens


def test_streaming_with_usage(client):
    messages = [{"role": "user", "content": "Count from one to five."}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24,
                                           temperature=0)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and
              c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_stop_strings_are_cut_and_never_streamed(client):
    base = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=20,
                                     temperature=0).choices[0].text
    stop = base.strip().split(" ")[2]  # a word a few tokens in
    r = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=20,
                                  temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop" and stop not in r.choices[0].text
    assert base.startswith(r.choices[0].text)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="1, 2, 3, 4,", max_tokens=20, temperature=0, stop=[stop],
        stream=True))
    assert streamed == r.choices[0].text


def test_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=4, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)
    assert content[0].logprob == pytest.approx(content[0].top_logprobs[0].logprob)  # greedy
    c = client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, temperature=0,
                                  logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == 3 and len(lp.top_logprobs[0]) <= 2 and lp.text_offset[0] == 0


def test_n_and_seed(client):
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=1.0, seed=7)
    a = client.completions.create(n=2, **kw)
    b = client.completions.create(n=2, **kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert sorted(c.index for c in a.choices) == [0, 1]
    assert a.choices[0].text != a.choices[1].text  # different seeds per choice
    assert a.usage.prompt_tokens == b.usage.prompt_tokens < 10  # the prompt counted once


def test_openai_errors(client):
    import openai

    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.BadRequestError, match="presence_penalty"):
        client.completions.create(model=MODEL, prompt="x", presence_penalty=1.0)
    with pytest.raises(openai.BadRequestError, match="limit of 512"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=100000)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="x", extra_body={"frobnicate": 1})
    assert err.value.body["param"] == "frobnicate" or "frobnicate" in str(err.value)


BAD_REQUESTS = [
    ("malformed json", "/v1/completions", b'{"model": "smollm2", "prompt": ', 400),
    ("wrong type", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": "many"}, 400),
    ("negative max_tokens", "/v1/completions", {"model": MODEL, "prompt": "x",
                                                "max_tokens": -5}, 400),
    ("huge max_tokens", "/v1/completions", {"model": MODEL, "prompt": "x",
                                            "max_tokens": 10**12}, 400),
    ("prompt longer than context", "/v1/completions",
     {"model": MODEL, "prompt": [5] * 9000, "max_tokens": 4}, 400),
    ("unknown model", "/v1/chat/completions",
     {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404),
    ("empty messages", "/v1/chat/completions", {"model": MODEL, "messages": []}, 400),
    ("invalid utf-8", "/v1/completions", b'{"model": "smollm2", "prompt": "\xff\xfe"}', 400),
    ("not an object", "/v1/completions", b"[1, 2, 3]", 400),
    ("temperature out of range", "/v1/completions", {"model": MODEL, "prompt": "x",
                                                     "temperature": 9}, 400),
    ("token id out of vocabulary", "/v1/completions", {"model": MODEL, "prompt": [10**9]}, 400),
    ("image content", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user",
     "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400),
    ("too big", "/v1/completions", {"model": MODEL, "prompt": "x" * (3 << 20)}, 413),
]


@pytest.mark.parametrize("name,path,body,status", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_gets_openai_4xx_and_the_server_keeps_serving(server, name, path, body,
                                                                 status):
    url = server[0]
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} \
        if isinstance(body, bytes) else {"json": body}
    r = httpx.post(url + path, timeout=60, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"]
    ok = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "Hi",
                                                   "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200


def test_health_metrics_and_docs(server, client):
    url = server[0]
    client.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    metrics = httpx.get(url + "/metrics").text
    for name in ("q_requests_total", "q_generation_tokens_total", "q_queue_depth",
                 "q_request_latency_seconds_bucket", "q_batch_size_bucket",
                 "q_time_to_first_token_seconds_bucket"):
        assert name in metrics, name
    assert httpx.get(url + "/docs").status_code == 200
    spec = httpx.get(url + "/openapi.json").json()
    assert "/v1/chat/completions" in spec["paths"]


PROMPTS = [f"Write a short sentence about the number {i}." for i in range(32)]


def test_32_concurrent_streams_match_one_at_a_time(server, client):
    from openai import AsyncOpenAI

    def one(prompt):
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
        return r.choices[0].text

    alone = [one(p) for p in PROMPTS]
    aclient = AsyncOpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)

    async def stream(prompt):
        parts = []
        async for chunk in await aclient.completions.create(
                model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True):
            parts.append(chunk.choices[0].text)
        return "".join(parts)

    async def all_at_once():
        return await asyncio.gather(*(stream(p) for p in PROMPTS))

    together = asyncio.run(all_at_once())
    assert together == alone
    loop = server[1].state.engine_loop
    assert loop.running() == 0 and loop.waiting() == 0


def test_a_cancelled_stream_frees_its_slot(server):
    url, app = server
    loop = app.state.engine_loop
    with httpx.stream("POST", url + "/v1/completions", timeout=60, json={
            "model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 400,
            "stream": True, "ignore_eos": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                break
        deadline = time.time() + 10
        while loop.running() != 1 and time.time() < deadline:
            time.sleep(0.01)
        assert loop.running() == 1, line
    deadline = time.time() + 10
    while loop.running() and time.time() < deadline:
        time.sleep(0.05)
    assert loop.running() == 0


def test_api_key_required(session):
    with running_server(session, model_name=MODEL, api_key="s3cret") as (url, _):
        body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
        r = httpx.post(url + "/v1/completions", json=body)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        r = httpx.post(url + "/v1/completions", json=body,
                       headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        r = httpx.post(url + "/v1/completions", json=body,
                       headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200
        assert httpx.get(url + "/health").status_code == 200  # liveness stays open


def test_full_queue_answers_429(tiny_llama):
    session = q.load_engine(tiny_llama(), max_batch=1)
    step = session.step
    session.step = lambda: (time.sleep(0.02), step())[1]  # slow enough to stay busy
    with running_server(session, model_name=MODEL, max_queue=1) as (url, app):
        body = {"model": MODEL, "prompt": "w5", "max_tokens": 300, "ignore_eos": True,
                "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as first:
            lines = first.iter_lines()  # keep it referenced: dropping it closes the connection
            assert next(lines).startswith("data:")
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as second:
                deadline = time.time() + 10
                while app.state.engine_loop.waiting() < 1 and time.time() < deadline:
                    time.sleep(0.02)
                third = httpx.post(url + "/v1/completions", json=body, timeout=60)
                assert third.status_code == 429, third.text
                assert third.json()["error"]["code"] == "queue_full"
                assert second.status_code == 200


def test_a_client_that_gives_up_on_a_plain_request_frees_its_slot(server):
    url, app = server
    loop = app.state.engine_loop
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", timeout=httpx.Timeout(10, read=1.0), json={
            "model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 500,
            "ignore_eos": True})
    deadline = time.time() + 10
    while (loop.running() or loop.waiting()) and time.time() < deadline:
        time.sleep(0.05)
    assert loop.running() == 0 and loop.waiting() == 0


def test_serve_command_defaults_and_refusals(tiny_llama):
    from click.testing import CliRunner

    from q.cli import _build

    help_text = CliRunner().invoke(_build(), ["serve", "--help"]).output
    assert "127.0.0.1" in help_text and "23333" in help_text and "Q_API_KEY" in help_text
    result = CliRunner().invoke(_build(), ["serve", str(tiny_llama()), "-tp", "2"])
    assert result.exit_code != 0
    assert "--engine vllm" in str(result.exception or result.output)


@pytest.mark.parametrize("missing", ["fastapi", "uvicorn", "prometheus_client"])
def test_serve_without_the_serve_extra_says_what_to_install(tiny_llama, monkeypatch, missing):
    """The README's set-up installs q without the serve extra: `q serve` then says what to
    install, before it imports the server (whose first line imports fastapi)."""
    from click.testing import CliRunner

    from q.cli import _build

    monkeypatch.setitem(sys.modules, missing, None)  # `import missing` raises ImportError
    monkeypatch.delitem(sys.modules, "q.server.app", raising=False)
    result = CliRunner().invoke(_build(), ["serve", str(tiny_llama())])
    assert result.exit_code != 0
    text = str(result.exception or "") + result.output
    assert "q-quant[serve]" in text and missing in text
    assert not isinstance(result.exception, ImportError)
