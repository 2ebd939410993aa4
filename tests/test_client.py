"""``q client`` against an in-process mock of an OpenAI-compatible server (httpx.MockTransport)."""

from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import click
import pytest
from click.testing import CliRunner

from q.cli import client as client_mod
from q.cli.client import ClientError, _events, add_commands
from q.errors import OptionError

from .conftest import default_sigint

httpx = pytest.importorskip("httpx")  # q.cli.client imports it only when the command runs


def _sse(*events, done=True, extra=()) -> bytes:
    lines = [*extra]
    for event in events:
        lines += [f"data: {json.dumps(event)}", ""]
    if done:
        lines += ["data: [DONE]", ""]
    return "\n".join(lines).encode()


def _chunk(text, chat=True):
    if chat:
        return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {
            "content": text}, "finish_reason": None}]}
    return {"object": "text_completion", "choices": [{"index": 0, "text": text}]}


class FakeServer:
    """Answers /v1/models, /v1/chat/completions and /v1/completions; records every request."""

    def __init__(self, replies=("Hello", " there", "!"), models=("tiny-model", "other"),
                 status=200, error=None, sse_extra=()):
        self.replies, self.models, self.status, self.error = replies, models, status, error
        self.sse_extra = sse_extra
        self.requests: list[httpx.Request] = []
        self.handler = self  # tests swap in their own handler

    def bodies(self, path):
        return [json.loads(r.content) for r in self.requests if r.url.path == path]

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.status != 200:
            return httpx.Response(self.status, json={"error": {"message": self.error,
                                                              "type": "invalid_request_error"}})
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [
                {"id": m, "object": "model"} for m in self.models]})
        body = json.loads(request.content)
        chat = request.url.path == "/v1/chat/completions"
        text = "".join(self.replies)
        usage = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
        if body.get("stream"):
            chunks = [_chunk(r, chat) for r in self.replies]
            if body.get("stream_options", {}).get("include_usage"):
                chunks.append({"choices": [], "usage": usage})
            return httpx.Response(200, headers={"content-type": "text/event-stream"},
                                  content=_sse(*chunks, extra=self.sse_extra))
        choice = ({"index": 0, "message": {"role": "assistant", "content": text},
                   "finish_reason": "stop"} if chat else {"index": 0, "text": text})
        return httpx.Response(200, json={"id": "x", "model": body["model"],
                                         "choices": [choice], "usage": usage})


@pytest.fixture
def server(monkeypatch):
    fake = FakeServer()
    seen = {}
    real = client_mod._make_client

    def make(base_url, api_key, timeout, transport=None):
        seen.update(base_url=base_url, api_key=api_key, timeout=timeout)
        transport = httpx.MockTransport(lambda request: fake.handler(request))
        return real(base_url, api_key, timeout, transport=transport)

    monkeypatch.setattr(client_mod, "_make_client", make)
    monkeypatch.delenv("Q_API_KEY", raising=False)
    fake.seen = seen
    return fake


def run(*args, input=None, env=None):
    group = click.Group()
    add_commands(group)
    return CliRunner().invoke(group, ["client", *args], input=input, env=env)


def test_streaming_one_shot_prints_concatenated_deltas(server):
    result = run("http://127.0.0.1:23333", "--prompt", "hi", "--max-tokens", "5",
                 "--temperature", "0", "--stop", "x", "--stop", "y", "--seed", "1")
    assert result.exit_code == 0, result.output
    assert result.stdout == "Hello there!\n"
    [body] = server.bodies("/v1/chat/completions")
    assert body == {"model": "tiny-model", "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 5, "temperature": 0.0, "seed": 1, "stop": ["x", "y"],
                    "stream": True}


@pytest.mark.parametrize("url", ["http://127.0.0.1:23333", "http://127.0.0.1:23333/",
                                 "http://127.0.0.1:23333/v1", "http://127.0.0.1:23333/v1/",
                                 "127.0.0.1:23333"])
def test_v1_suffix_is_optional(server, url):
    result = run(url, "-p", "hi")
    assert result.exit_code == 0, result.output
    assert server.seen["base_url"] == "http://127.0.0.1:23333"
    assert [str(r.url) for r in server.requests] == [
        "http://127.0.0.1:23333/v1/models", "http://127.0.0.1:23333/v1/chat/completions"]


def test_default_url():
    assert client_mod._base_url(client_mod.DEFAULT_URL) == "http://127.0.0.1:23333"


def test_default_model_is_the_first_listed_and_model_option_skips_listing(server):
    assert run("-p", "hi").exit_code == 0
    assert server.bodies("/v1/chat/completions")[0]["model"] == "tiny-model"
    server.requests.clear()
    assert run("-p", "hi", "--model", "other").exit_code == 0
    assert [r.url.path for r in server.requests] == ["/v1/chat/completions"]
    assert server.bodies("/v1/chat/completions")[0]["model"] == "other"


def test_no_models_listed(server):
    server.models = ()
    result = run("-p", "hi")
    assert isinstance(result.exception, ClientError)
    assert "lists no models: pass --model" in str(result.exception)


def test_api_key_is_sent_from_option_and_env(server):
    assert run("-p", "hi", "--api-key", "sk-1").exit_code == 0
    assert {r.headers["authorization"] for r in server.requests} == {"Bearer sk-1"}
    server.requests.clear()
    assert run("-p", "hi", env={"Q_API_KEY": "sk-2"}).exit_code == 0
    assert {r.headers["authorization"] for r in server.requests} == {"Bearer sk-2"}


def test_401_asks_for_an_api_key(server):
    server.status, server.error = 401, "invalid api key"
    result = run("-p", "hi")
    assert result.exit_code != 0
    assert str(result.exception) == ("the server wants an API key: pass --api-key or set "
                                     "Q_API_KEY")
    assert "rejected the API key" in str(run("-p", "hi", "--api-key", "bad").exception)


def test_http_error_shows_the_servers_message_and_status(server):
    server.status, server.error = 404, "the model `nope` does not exist"
    result = run("-p", "hi", "--model", "nope")
    assert isinstance(result.exception, ClientError) and result.exit_code != 0
    message = str(result.exception)
    assert "404 Not Found" in message and "the model `nope` does not exist" in message


def test_connection_refused(monkeypatch):
    monkeypatch.delenv("Q_API_KEY", raising=False)
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = run(f"http://127.0.0.1:{port}", "-p", "hi", "--timeout", "5")
    assert isinstance(result.exception, ClientError) and result.exit_code != 0
    assert str(result.exception) == f"cannot reach http://127.0.0.1:{port}: is `q serve` running?"


def test_connection_error_from_transport(server):
    def refuse(request):
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    server.handler = refuse
    result = run("http://h:1/v1", "-p", "hi", "--model", "m")
    assert str(result.exception) == "cannot reach http://h:1: is `q serve` running?"


def test_no_stream_json_prints_the_servers_answer(server):
    result = run("-p", "hi", "--json")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["choices"][0]["message"]["content"] == "Hello there!"
    assert answer["usage"]["total_tokens"] == 7
    assert server.bodies("/v1/chat/completions")[0]["stream"] is False


def test_no_stream_prints_the_message(server):
    result = run("-p", "hi", "--no-stream", "--usage")
    assert result.exit_code == 0, result.output
    assert result.stdout == "Hello there!\n"
    assert "[3 prompt + 4 completion tokens]" in result.stderr


def test_streamed_usage(server):
    result = run("-p", "hi", "--usage")
    assert result.exit_code == 0, result.output
    assert result.stdout == "Hello there!\n"
    assert "[3 prompt + 4 completion tokens]" in result.stderr
    assert server.bodies("/v1/chat/completions")[0]["stream_options"] == {"include_usage": True}


def test_no_chat_uses_completions_with_the_raw_prompt(server):
    result = run("-p", "Once upon", "--no-chat")
    assert result.exit_code == 0, result.output
    assert result.stdout == "Hello there!\n"
    [body] = server.bodies("/v1/completions")
    assert body["prompt"] == "Once upon" and "messages" not in body and body["stream"]
    assert not server.bodies("/v1/chat/completions")
    assert run("-p", "x", "--no-chat", "--no-stream").stdout == "Hello there!\n"


def test_prompt_from_stdin_and_system(server):
    result = run("-p", "-", "--system", "be brief", input="from stdin\n")
    assert result.exit_code == 0, result.output
    assert server.bodies("/v1/chat/completions")[0]["messages"] == [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "from stdin"}]


def test_option_errors(server):
    assert isinstance(run("--json").exception, OptionError)
    assert isinstance(run("-p", "x", "--no-chat", "--system", "s").exception, OptionError)


def test_interactive_history_and_reset(server):
    result = run("--system", "sys", input="hello\nagain\n/reset\nhi\n/exit\nnever sent\n")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("Hello there!") == 3
    first, second, third = [b["messages"] for b in server.bodies("/v1/chat/completions")]
    system = {"role": "system", "content": "sys"}
    assert first == [system, {"role": "user", "content": "hello"}]
    assert second == [system, {"role": "user", "content": "hello"},
                      {"role": "assistant", "content": "Hello there!"},
                      {"role": "user", "content": "again"}]
    assert third == [system, {"role": "user", "content": "hi"}]  # /reset kept the system


def test_interactive_ctrl_d_quits_and_errors_do_not(server):
    server.status, server.error = 500, "boom"
    result = run("--model", "m", input="hello\n")  # ends with EOF (Ctrl-D)
    assert result.exit_code == 0, result.output
    assert "error: POST /v1/chat/completions failed with 500" in result.stderr
    assert "boom" in result.stderr


def test_interactive_failed_turn_leaves_history(server):
    calls = []

    def flaky(request):
        calls.append(json.loads(request.content)["messages"])
        if len(calls) == 1:
            return httpx.Response(503, json={"message": "overloaded"})  # LMDeploy's shape
        return server(request)

    server.handler = flaky
    result = run("--model", "m", input="lost\nkept\n")
    assert "overloaded" in result.stderr
    assert calls[1] == [{"role": "user", "content": "kept"}]


def test_sse_parsing_skips_comments_keepalives_and_blank_lines():
    lines = [": ping", "", "event: message", "id: 1", "retry: 100",
             'data: {"a": 1}\r', "", ":", 'data:{"b": 2}', "", "data: [DONE]", 'data: {"c": 3}']
    assert list(_events(lines)) == [{"a": 1}, {"b": 2}]


def test_streamed_reply_with_keepalives(server):
    server.sse_extra = [": ping", "", ": keep-alive", ""]
    result = run("-p", "hi")
    assert result.exit_code == 0, result.output
    assert result.stdout == "Hello there!\n"


@pytest.mark.parametrize("lines, message", [
    (["data: {not json"], "malformed server-sent event"),
    (["data: [1, 2]"], "malformed server-sent event"),
    (['{"choices": []}'], "malformed server-sent event line"),
    (['data: {"a": 1}'], "closed the stream before `data: [DONE]`"),
    (['data: {"error": {"message": "out of memory"}}'], "failed mid-reply: out of memory"),
])
def test_malformed_sse_is_a_clear_error(lines, message):
    with pytest.raises(ClientError, match=message.replace("[", r"\[").replace("]", r"\]")):
        list(_events(lines))


def test_malformed_stream_in_one_shot(server):
    def broken(request):
        if request.url.path == "/v1/models":
            return server(request)
        return httpx.Response(200, content=_sse(_chunk("partial"), done=False))

    server.handler = broken
    result = run("-p", "hi")
    assert result.stdout == "partial\n"  # the partial reply ends its line before the error
    assert "cut short" in str(result.exception)


def test_plain_output_when_not_a_tty(server):
    result = run(input="hello\n")
    assert "\x1b[" not in result.output
    assert "model> Hello there!" in result.stdout


_SEEN: list = []  # the messages of every chat request _SlowHandler got
_HUNG_UP = threading.Event()


class _SlowHandler(http.server.BaseHTTPRequestHandler):
    """A real server: "slow" streams one token, then keep-alives until the client hangs up."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _send(self, status, body: bytes, kind="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._send(200, json.dumps({"data": [{"id": "slow-model"}]}).encode())

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _SEEN.append(body["messages"])
        if body["messages"][-1]["content"] != "slow":
            return self._send(200, _sse(_chunk("quick reply")), "text/event-stream")
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(_sse(_chunk("tick"), done=False) + b"\n")
        self.wfile.flush()
        try:
            for _ in range(200):
                time.sleep(0.05)
                self.wfile.write(b": ping\n\n")
                self.wfile.flush()
        except OSError:
            _HUNG_UP.set()


@pytest.mark.skipif(sys.platform == "win32", reason="sends SIGINT")
def test_interactive_ctrl_c_cancels_the_reply_and_closes_the_stream():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SlowHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    code = ("import click; from q.cli.client import add_commands; g = click.Group(); "
            f"add_commands(g); g(['client', 'http://127.0.0.1:{httpd.server_port}/v1'])")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("Q_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            preexec_fn=default_sigint)
    try:
        proc.stdin.write(b"slow\n")
        proc.stdin.flush()
        out = b""
        while b"tick" not in out:  # the reply has started
            chunk = os.read(proc.stdout.fileno(), 4096)
            assert chunk, proc.stderr.read().decode()
            out += chunk
        proc.send_signal(signal.SIGINT)
        assert _HUNG_UP.wait(10), "the client kept the stream open"
        rest, err = proc.communicate(b"fast\n/exit\n", timeout=30)
    finally:
        proc.kill()
        httpd.shutdown()
    output = (out + rest).decode()
    assert proc.returncode == 0, err.decode()
    assert "(cancelled)" in output and "model> quick reply" in output
    assert _SEEN == [[{"role": "user", "content": "slow"}],
                   [{"role": "user", "content": "fast"}]]
