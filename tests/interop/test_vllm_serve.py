"""`q serve --engine vllm` against a real vLLM server (the CPU build, in its own venv).

The proxy tests of tests/test_engine_vllm.py (which stand q's own server in for vLLM) run
here again, unchanged, with vLLM's server as the upstream; then vLLM is killed and the
proxy must answer 502. Last, the whole command line: `q serve --engine vllm --vllm-python`
starts vLLM, serves through the openai SDK, and exits with vLLM's last lines when vLLM dies.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

import q
from q.plugins.engines.vllm_proxy import launch

# the proxy tests and their `proxied` fixture, collected here a second time: `proxied`
# resolves `upstream` in this module, the real vLLM server below
from ..test_engine_vllm import (  # noqa: F401
    KEY, MODEL, openai_client, proxied,
    test_completion_equals_the_upstream_answer,
    test_health_metrics_docs, test_models_through_the_proxy,
    test_streamed_chat_concatenates_to_the_plain_one, test_the_proxy_enforces_the_api_key,
    test_the_proxy_limits_body_size_and_max_tokens,
    test_upstream_errors_pass_through_with_their_body)

pytestmark = pytest.mark.slow

# torch.compile takes about a minute per model on 2 cores; the KV cache is sized for tests
VLLM_ARGS = ["--enforce-eager", "--max-model-len", "1024"]
STARTUP_S = 600


@pytest.fixture(scope="module")
def checkpoint(vllm, tmp_path_factory):
    from q.embedded import default_model

    return q.quantize(default_model(), "wint4", tmp_path_factory.mktemp("serve") / "out",
                      args={"group_size": 64}, progress=False).output


@pytest.fixture(scope="module")
def vllm_server(vllm, checkpoint):
    """vLLM's OpenAI server, started the way `q serve --engine vllm` starts it."""
    port = launch.free_port()
    argv = launch.vllm_command(checkpoint, served_model_name=MODEL, port=port,
                               extra=VLLM_ARGS, python=vllm)
    process = launch.VllmProcess(argv, echo=False)
    try:
        process.wait_ready(f"http://{launch.UPSTREAM_HOST}:{port}", STARTUP_S)
        yield f"http://{launch.UPSTREAM_HOST}:{port}", process
    finally:
        process.terminate()


@pytest.fixture(scope="module")
def upstream(vllm_server):
    return vllm_server[0]


def test_streamed_usage_equals_the_plain_usage(proxied):
    client = openai_client(proxied)
    kw = {"model": MODEL, "messages": [{"role": "user", "content": "Name a colour."}],
          "max_tokens": 12, "temperature": 0}
    plain = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True,
                                                 stream_options={"include_usage": True}, **kw))
    assert chunks[-1].usage is not None and not chunks[-1].choices
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        plain.choices[0].message.content


def test_zz_vllm_dies_then_502(proxied, vllm_server):
    """Runs last in this module (it stops the shared vLLM)."""
    from openai import InternalServerError

    _, process = vllm_server
    process.terminate()
    with pytest.raises(InternalServerError) as err:
        openai_client(proxied).completions.create(model=MODEL, prompt="Hello", max_tokens=2)
    assert err.value.status_code == 502
    assert err.value.response.json()["error"]["code"] == "upstream_unavailable"


def _vllm_child(parent: psutil.Process) -> psutil.Process | None:
    for child in parent.children(recursive=True):
        if launch.SERVER_MODULE in " ".join(child.cmdline()):
            return child
    return None


def test_q_serve_engine_vllm_end_to_end(vllm, checkpoint):
    port = launch.free_port()
    env = {**os.environ, "Q_VLLM_ARGS": " ".join(VLLM_ARGS), "Q_VLLM_PYTHON": vllm}
    cmd = [str(Path(sys.executable).with_name("q")), "serve", str(checkpoint), "--engine", "vllm",
           "--port", str(port), "--api-key", KEY, "--served-model-name", MODEL]
    serve = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            assert serve.poll() is None, serve.communicate()[1][-3000:]
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "q serve --engine vllm did not come up"
            time.sleep(1)
        answer = openai_client(url).completions.create(model=MODEL, prompt="The capital of "
                                                       "France is", max_tokens=6, temperature=0)
        assert answer.choices[0].text.strip() and answer.usage.completion_tokens == 6
        child = _vllm_child(psutil.Process(serve.pid))
        assert child is not None, "no vLLM process under q serve"
        os.killpg(child.pid, signal.SIGKILL)  # vLLM dies: q serve must stop and say so
        _, err = serve.communicate(timeout=60)
        assert serve.returncode != 0
        assert "vLLM stopped while serving" in err, err[-3000:]
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.communicate()
