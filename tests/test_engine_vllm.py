"""The ``vllm`` engine plugin without vLLM: its command line, checkpoint preparation, the
child-process handling, and q's proxy against real upstream servers (q's own server stands
in for vLLM: both speak the OpenAI API)."""

from __future__ import annotations

import importlib.util
import json
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import pytest
import q
import q.plugins.engines.vllm_proxy as vp
from q.errors import IncompatibleError, OptionError, QError
from q.plugins.engines.vllm_proxy import launch, proxy
from q.server.app import ServerSettings

from .server_fixtures import running_app, running_server

MODEL = "tiny"
KEY = "sekret"
_real_find_spec = importlib.util.find_spec


# --- helpers --------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def vllm_in_this_interpreter(monkeypatch):
    """These tests fake vLLM in q's own interpreter; tests/run.sh points Q_VLLM_PYTHON at the
    real one (tests/interop uses it)."""
    monkeypatch.delenv("Q_VLLM_PYTHON", raising=False)


def settings(**kw):
    kw.setdefault("model_name", MODEL)
    return ServerSettings(**kw)


def vllm_is(installed: bool, monkeypatch):
    def find_spec(name, *args):
        if name == "vllm":
            return _real_find_spec("json") if installed else None
        return _real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


class _Started(Exception):
    pass


@pytest.fixture
def record_start(monkeypatch):
    """Replace the vLLM process start: record argv, then stop serve() right there."""
    seen = []

    def fake(argv):
        seen.append(argv)
        raise _Started

    monkeypatch.setattr(launch, "start_vllm", fake)
    return seen


def model_arg(argv) -> Path:
    return Path(argv[argv.index("--model") + 1])


@pytest.fixture(scope="module")
def q_ckpt(tiny_llama, tmp_path_factory):
    return q.quantize(tiny_llama(), "fp8-dynamic", tmp_path_factory.mktemp("ct") / "out",
                      progress=False).output


@pytest.fixture(scope="module")
def fp8_ckpt(tiny_llama, tmp_path_factory):
    return q.quantize(tiny_llama(), "fp8-block", tmp_path_factory.mktemp("hf") / "out",
                      format="hf-fp8", progress=False).output


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("Q_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def serve(model, **kw):
    kw.setdefault("settings", settings())
    kw.setdefault("host", "127.0.0.1")
    kw.setdefault("port", 23333)
    return vp.VllmEngine().serve(model, **kw)


# --- command lines, refusals ----------------------------------------------------------------


def test_vllm_command():
    argv = vp.vllm_command("/m/out", served_model_name="my-model", port=8123,
                           tensor_parallel_size=4, extra=["--max-model-len", 4096])
    assert argv[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    flags = dict(zip(argv[3::2], argv[4::2]))
    assert flags == {"--model": "/m/out", "--served-model-name": "my-model",
                     "--host": "127.0.0.1", "--port": "8123", "--tensor-parallel-size": "4",
                     "--max-model-len": "4096"}
    assert "--api-key" not in argv  # vLLM listens on 127.0.0.1; the proxy checks the key


def test_missing_vllm_says_how_to_install_and_the_fallback(q_ckpt, monkeypatch):
    vllm_is(False, monkeypatch)
    with pytest.raises(QError) as err:
        serve(q_ckpt, tensor_parallel_size=2, settings=settings(api_key=KEY), host="0.0.0.0",
              port=9000)
    msg = str(err.value)
    assert "pip install vllm" in msg and "GPU" in msg
    assert (f"vllm serve {q_ckpt} --tensor-parallel-size 2 --served-model-name {MODEL} "
            "--host 0.0.0.0 --port 9000 --api-key KEY") in msg
    assert KEY not in msg and "q export" not in msg  # compressed-tensors: no export needed


def test_missing_vllm_fallback_exports_hf_fp8_first(fp8_ckpt, monkeypatch, cache):
    vllm_is(False, monkeypatch)
    with pytest.raises(QError) as err:
        serve(fp8_ckpt)
    msg = str(err.value)
    assert f"q export {fp8_ckpt} --format vllm -o {fp8_ckpt}-vllm" in msg
    assert f"vllm serve {fp8_ckpt}-vllm --tensor-parallel-size 1" in msg
    assert not cache.exists()  # nothing exported for a vLLM that is not there


def test_online_quantization_is_refused(tiny_llama):
    with pytest.raises(OptionError) as err:
        serve(tiny_llama(), scheme="fp8-dynamic")
    assert "not wired" in str(err.value)
    assert (f"q quantize {tiny_llama()} --scheme fp8-dynamic --format vllm -o OUT"
            in str(err.value))


def test_load_refuses(q_ckpt):
    with pytest.raises(IncompatibleError) as err:
        vp.VllmEngine().load(q_ckpt)
    assert "q serve" in str(err.value) and "--engine vllm" in str(err.value)
    assert "native" in str(err.value)


def test_registers_as_vllm():
    from q.plugin_manager import make_plugin_manager
    from q.registry import Registries

    pm = make_plugin_manager(load="builtin")
    if not pm.is_registered(vp):  # until pyproject.toml lists the entry point
        pm.register(vp)
    assert isinstance(Registries.from_pm(pm).engines.get("vllm"), vp.VllmEngine)


def test_a_busy_port_is_refused_before_vllm_starts(q_ckpt, monkeypatch, record_start):
    import socket

    vllm_is(True, monkeypatch)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(QError, match="cannot listen on 127.0.0.1:.*another --port"):
            serve(q_ckpt, port=busy.getsockname()[1])
    assert record_start == []


# --- checkpoint preparation -----------------------------------------------------------------


def _quant_method(path: Path) -> str:
    return json.loads((path / "config.json").read_text())["quantization_config"]["quant_method"]


def test_hf_fp8_is_exported_to_compressed_tensors_once(fp8_ckpt, monkeypatch, cache,
                                                       record_start):
    vllm_is(True, monkeypatch)
    with pytest.raises(_Started):
        serve(fp8_ckpt, tensor_parallel_size=2)
    model_dir = model_arg(record_start[0])
    assert model_dir.is_relative_to(cache / "vllm-exports")
    assert _quant_method(model_dir) == "compressed-tensors"
    assert (model_dir / "tokenizer.json").exists()
    assert record_start[0][record_start[0].index("--tensor-parallel-size") + 1] == "2"

    monkeypatch.setattr(q, "export", lambda *a, **k: pytest.fail("exported twice"))
    with pytest.raises(_Started):
        serve(fp8_ckpt)
    assert model_arg(record_start[1]) == model_dir


def test_compressed_tensors_and_plain_models_are_served_as_is(q_ckpt, tiny_llama, monkeypatch,
                                                              cache, record_start):
    vllm_is(True, monkeypatch)
    for model in (q_ckpt, tiny_llama()):
        with pytest.raises(_Started):
            serve(model)
    assert [model_arg(a) for a in record_start] == [Path(q_ckpt).absolute(),
                                                   Path(tiny_llama()).absolute()]
    assert not cache.exists()


# --- the vLLM child process -----------------------------------------------------------------


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def test_early_exit_reports_the_last_lines():
    proc = launch.VllmProcess(_python("""
        import sys
        print("INFO loading", flush=True)
        print("RuntimeError: no CUDA GPUs are available", file=sys.stderr)
        sys.exit(3)"""), echo=False)
    try:
        with pytest.raises(QError) as err:
            proc.wait_ready(f"http://127.0.0.1:{launch.free_port()}", timeout=30,
                            interval=0.05)
    finally:
        proc.terminate()
    assert "exited before it was ready (exit code 3)" in str(err.value)
    assert "no CUDA GPUs are available" in str(err.value) and "INFO loading" in str(err.value)


def test_startup_timeout_then_sigterm():
    proc = launch.VllmProcess(_python("import time; time.sleep(60)"), echo=False)
    with pytest.raises(QError, match="not ready after"):
        proc.wait_ready(f"http://127.0.0.1:{launch.free_port()}", timeout=0.3, interval=0.05)
    proc.terminate(timeout=10)
    assert proc.returncode == -15


def test_sigkill_after_the_timeout_and_the_whole_group():
    proc = launch.VllmProcess(_python("""
        import signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        print(child.pid, flush=True)
        time.sleep(60)"""), echo=False)
    deadline = time.time() + 20
    while not proc.tail and time.time() < deadline:
        time.sleep(0.02)
    worker = int(proc.tail[0])
    start = time.time()
    proc.terminate(timeout=0.5)
    assert proc.returncode == -9 and time.time() - start < 5
    time.sleep(0.2)
    try:
        state = Path(f"/proc/{worker}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        state = "gone"
    assert state in ("gone", "Z")  # the worker went with its group


def test_startup_timeout_setting(monkeypatch):
    assert launch.startup_timeout(None) == 900
    monkeypatch.setenv("Q_VLLM_STARTUP_TIMEOUT", "12")
    assert launch.startup_timeout(None) == 12 and launch.startup_timeout(5) == 5
    monkeypatch.setenv("Q_VLLM_STARTUP_TIMEOUT", "soon")
    with pytest.raises(OptionError):
        launch.startup_timeout(None)


# --- the proxy, against q's own server as the upstream --------------------------------------


@pytest.fixture(scope="module")
def session(tiny_llama):
    return q.load_engine(tiny_llama())


@pytest.fixture(scope="module")
def upstream(session):
    with running_server(session, model_name=MODEL, max_tokens_limit=64) as (url, _):
        yield url


@pytest.fixture(scope="module")
def proxied(upstream):
    app = proxy.create_proxy_app(upstream, settings(api_key=KEY, max_request_bytes=4096,
                                                    max_tokens_limit=32))
    with running_app(app) as url:
        yield url


def openai_client(url, key=KEY):
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


def test_models_through_the_proxy(proxied):
    assert [m.id for m in openai_client(proxied).models.list().data] == [MODEL]


def test_completion_equals_the_upstream_answer(proxied, upstream):
    kw = {"model": MODEL, "prompt": "w5 w6 w7", "max_tokens": 8, "temperature": 0}
    via_proxy = openai_client(proxied).completions.create(**kw)
    direct = openai_client(upstream, key="unused").completions.create(**kw)
    assert via_proxy.choices[0].text == direct.choices[0].text
    assert via_proxy.usage == direct.usage


def test_streamed_chat_concatenates_to_the_plain_one(proxied):
    client = openai_client(proxied)
    kw = {"model": MODEL, "messages": [{"role": "user", "content": "w3 w4"}],
          "max_tokens": 10, "temperature": 0}
    whole = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert len(chunks) > 2
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole


def test_upstream_errors_pass_through_with_their_body(proxied, upstream):
    from openai import NotFoundError

    body = {"model": "nope", "prompt": "w1", "max_tokens": 2}
    direct = httpx.post(upstream + "/v1/completions", json=body)
    via_proxy = httpx.post(proxied + "/v1/completions", json=body,
                           headers={"Authorization": f"Bearer {KEY}"})
    assert via_proxy.status_code == direct.status_code == 404
    assert via_proxy.json() == direct.json()
    with pytest.raises(NotFoundError, match="does not exist"):
        openai_client(proxied).completions.create(**body)


def test_the_proxy_enforces_the_api_key(proxied):
    from openai import AuthenticationError

    for key in ("wrong", ""):
        with pytest.raises(AuthenticationError) as err:
            openai_client(proxied, key=key or "x").models.list()
    assert err.value.status_code == 401
    r = httpx.post(proxied + "/v1/chat/completions", json={})
    assert r.status_code == 401 and r.json() == {"error": {
        "message": "missing or wrong API key: send 'Authorization: Bearer KEY'",
        "type": "authentication_error", "param": None, "code": "invalid_api_key"}}


def test_the_proxy_limits_body_size_and_max_tokens(proxied):
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(proxied + "/v1/completions", headers=auth,
                   json={"model": MODEL, "prompt": "w1 " * 3000})
    assert r.status_code == 413 and "4096 bytes" in r.json()["error"]["message"]
    r = httpx.post(proxied + "/v1/completions", headers=auth,
                   json={"model": MODEL, "prompt": "w1", "max_tokens": 33})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_health_metrics_docs(proxied):
    assert httpx.get(proxied + "/health").json() == {"status": "ok"}
    metrics = httpx.get(proxied + "/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    assert "# TYPE" in metrics.text
    assert httpx.get(proxied + "/docs").status_code == 200
    paths = httpx.get(proxied + "/openapi.json").json()["paths"]
    assert {"/v1/models", "/v1/completions", "/v1/chat/completions"} <= set(paths)
    unknown = httpx.get(proxied + "/v1/nothing")
    assert unknown.status_code == 404 and "error" in unknown.json()


def test_upstream_down_is_a_502(monkeypatch):
    from openai import InternalServerError

    app = proxy.create_proxy_app(f"http://127.0.0.1:{launch.free_port()}", settings())
    with running_app(app) as url:
        with pytest.raises(InternalServerError) as err:
            openai_client(url).completions.create(model=MODEL, prompt="w1", max_tokens=2)
        health = httpx.get(url + "/health")
    assert err.value.status_code == 502
    body = err.value.response.json()["error"]
    assert body["type"] == "server_error" and body["code"] == "upstream_unavailable"
    assert set(body) == {"message", "type", "param", "code"}
    assert health.status_code == 502


def test_a_client_disconnect_closes_the_upstream_stream():
    """An endless SSE upstream: once the client hangs up, the proxy must hang up too."""
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse

    closed = threading.Event()
    fake = FastAPI()

    @fake.post("/v1/completions")
    async def endless():
        import asyncio

        async def events():
            try:
                while True:
                    yield b'data: {"choices": [{"text": "w1"}]}\n\n'
                    await asyncio.sleep(0.01)
            finally:
                closed.set()

        return StreamingResponse(events(), media_type="text/event-stream")

    with running_app(fake) as upstream:
        app = proxy.create_proxy_app(upstream, settings())
        with running_app(app) as url:
            with httpx.stream("POST", url + "/v1/completions",
                              json={"model": MODEL, "stream": True}) as r:
                assert r.headers["content-type"].startswith("text/event-stream")
                lines = r.iter_lines()
                assert next(lines).startswith("data: ")
            assert closed.wait(10), "the upstream stream stayed open"


# --- serve() end to end, with a stand-in vllm package ---------------------------------------

FAKE_SERVER = '''
"""Stands in for vLLM's OpenAI server: q's own server on the same command line."""
import argparse, json, os, sys
import uvicorn
import q
from q.server.app import ServerSettings, create_app

p = argparse.ArgumentParser()
for flag in ("--model", "--served-model-name", "--host", "--port", "--tensor-parallel-size"):
    p.add_argument(flag)
a = p.parse_args()
with open(os.environ["FAKE_VLLM_ARGV"], "w") as f:
    json.dump(sys.argv[1:], f)
print("fake vllm: loading", a.model, flush=True)
app = create_app(q.load_engine(a.model), ServerSettings(model_name=a.served_model_name))
uvicorn.run(app, host=a.host, port=int(a.port), log_level="warning")
'''


def test_serve_end_to_end_with_a_stand_in_vllm(tiny_llama, session, tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "vllm" / "entrypoints" / "openai"
    pkg.mkdir(parents=True)
    for d in (pkg, pkg.parent, pkg.parent.parent):
        (d / "__init__.py").write_text("")
    (pkg / "api_server.py").write_text(FAKE_SERVER)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "site"))
    monkeypatch.setenv("FAKE_VLLM_ARGV", str(tmp_path / "argv.json"))
    started, answers = [], []
    real_start = launch.start_vllm
    monkeypatch.setattr(launch, "start_vllm", lambda argv: started.append(real_start(argv))
                        or started[-1])

    def run_proxy(app, host, port, process):  # instead of uvicorn on a fixed port
        with running_app(app) as url:
            r = openai_client(url).completions.create(model="served", prompt="w9 w8",
                                                      max_tokens=6, temperature=0)
            answers.append(r.choices[0].text)

    monkeypatch.setattr(proxy, "run_proxy", run_proxy)
    serve(tiny_llama(), settings=settings(model_name="served", api_key=KEY),
          startup_timeout=120)
    assert answers == [session.generate(["w9 w8"], max_tokens=6)[0].text]
    argv = json.loads((tmp_path / "argv.json").read_text())
    assert argv[argv.index("--served-model-name") + 1] == "served"
    assert started[0].returncode is not None  # terminated when serve() returned
