"""``q client``: talk to an OpenAI-compatible server (``q serve``, vLLM, SGLang, LMDeploy)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import click

from ..errors import OptionError, QError

DEFAULT_URL = "http://127.0.0.1:23333"


class ClientError(QError):
    """The server could not be reached, refused a request, or answered something unreadable."""

    exit_code = 1


def _base_url(url: str) -> str:
    """``host:port``, ``http://host:port/`` or ``.../v1`` -> ``http://host:port``."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = f"http://{url}"
    return url.removesuffix("/v1")


def _make_client(base_url: str, api_key: str | None, timeout: float, transport=None):
    """The HTTP client for ``{base_url}/v1`` (tests pass an ``httpx.MockTransport``)."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.Client(base_url=f"{base_url}/v1", headers=headers, transport=transport,
                        timeout=httpx.Timeout(timeout, connect=min(timeout, 30.0)))


@contextmanager
def _errors(url: str, timeout: float):
    """Turn httpx's transport errors into one-line ClientErrors."""
    import httpx

    try:
        yield
    except (httpx.ConnectError, httpx.ConnectTimeout):
        raise ClientError(f"cannot reach {url}: is `q serve` running?") from None
    except httpx.TimeoutException:
        raise ClientError(f"{url} did not answer within {timeout:g} s (see --timeout)") from None
    except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
        raise OptionError(f"bad server URL {url}: {exc}") from None
    except httpx.HTTPError as exc:  # the server went away mid-answer, broken HTTP, ...
        raise ClientError(f"the connection to {url} failed: {exc}") from None


def _message(body) -> str:
    """The text of an error body: OpenAI ``{"error": {"message"}}``, LMDeploy ``{"message"}``,
    FastAPI ``{"detail"}``."""
    error = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(error, dict):
        error = error.get("message") or error.get("detail") or json.dumps(error)
    return str(error)


def _check(resp) -> None:
    """Raise a ClientError for a 4xx/5xx answer, with the server's own message."""
    if resp.status_code < 400:
        return
    resp.read()
    if resp.status_code == 401:
        if "authorization" in resp.request.headers:
            raise ClientError("the server rejected the API key (--api-key or Q_API_KEY)")
        raise ClientError("the server wants an API key: pass --api-key or set Q_API_KEY")
    try:
        message = _message(resp.json())
    except ValueError:
        message = resp.text.strip()[:200] or "(empty body)"
    raise ClientError(f"{resp.request.method} {resp.request.url.path} failed with "
                      f"{resp.status_code} {resp.reason_phrase}: {message}")


def _json(resp) -> dict:
    try:
        body = resp.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise ClientError(f"the answer to {resp.request.method} {resp.request.url.path} is not "
                          f"a JSON object: {resp.text.strip()[:200]!r}")
    return body


def _events(lines: Iterable[str]) -> Iterator[dict]:
    """The JSON payloads of an OpenAI-style server-sent event stream, up to ``data: [DONE]``.

    Blank lines and comments (``: ping`` keep-alives) are skipped, as are ``event:``, ``id:``
    and ``retry:`` fields; anything else is an error, not a silently truncated reply.
    """
    for line in lines:
        line = line.rstrip("\r")
        if not line or line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        if field in ("event", "id", "retry"):
            continue
        if field != "data":
            raise ClientError(f"malformed server-sent event line {line[:100]!r} (does the "
                              "server support stream: true?)")
        value = value.removeprefix(" ")
        if value.strip() == "[DONE]":
            return
        try:
            event = json.loads(value)
        except ValueError:
            event = None
        if not isinstance(event, dict):
            raise ClientError(f"malformed server-sent event: {value[:100]!r} is not a JSON "
                              "object")
        if event.get("error"):
            raise ClientError(f"the server failed mid-reply: {_message(event)}")
        yield event
    raise ClientError("the server closed the stream before `data: [DONE]`; the reply is cut "
                      "short")


def _text(body: dict, chat: bool, stream: bool) -> str:
    """The reply text in one answer or stream chunk (chunks without choices carry usage)."""
    try:
        choices = body["choices"]
        if not choices:
            return ""
        if not chat:
            return choices[0].get("text") or ""
        return choices[0]["delta" if stream else "message"].get("content") or ""
    except (KeyError, TypeError, IndexError, AttributeError):
        raise ClientError(f"unexpected answer from the server: {json.dumps(body)[:200]}") from None


class _Server:
    """One server, one model, one set of request options."""

    def __init__(self, url, http, timeout, model, chat, stream, usage, options):
        self.url, self.http, self.timeout = url, http, timeout
        self.chat, self.stream, self.usage, self.options = chat, stream, usage, options
        self._model = model

    @property
    def model(self) -> str:
        """--model, or the first id ``GET /v1/models`` lists."""
        if self._model is None:
            with _errors(self.url, self.timeout):
                resp = self.http.get("models")
                _check(resp)
                data = _json(resp).get("data")
            ids = [m.get("id") for m in data if isinstance(m, dict)] if isinstance(data, list) \
                else []
            if not ids or not isinstance(ids[0], str):
                raise ClientError(f"{self.url} lists no models: pass --model")
            self._model = ids[0]
        return self._model

    def send(self, content, on_text: Callable[[str], None], raw: bool = False):
        """Send a message list (chat) or a prompt (completions); pass the reply to on_text as
        it comes. Returns (reply text, usage or None), or the whole JSON answer when raw."""
        stream = self.stream and not raw
        body = {"model": self.model, "messages" if self.chat else "prompt": content,
                **self.options, "stream": stream}
        if stream and self.usage:
            body["stream_options"] = {"include_usage": True}
        path = "chat/completions" if self.chat else "completions"
        with _errors(self.url, self.timeout):
            if not stream:
                resp = self.http.post(path, json=body)
                _check(resp)
                data = _json(resp)
                if raw:
                    return data
                text = _text(data, self.chat, stream=False)
                on_text(text)
                return text, data.get("usage")
            parts, usage = [], None
            with self.http.stream("POST", path, json=body) as resp:
                _check(resp)
                for event in _events(resp.iter_lines()):
                    piece = _text(event, self.chat, stream=True)
                    if piece:
                        on_text(piece)
                        parts.append(piece)
                    usage = event.get("usage") or usage
            return "".join(parts), usage

    def show_usage(self, usage) -> None:
        if self.usage and not isinstance(usage, dict):
            click.secho("[the server sent no token counts]", dim=True, err=True)
        elif self.usage:
            click.secho(f"[{usage.get('prompt_tokens', '?')} prompt + "
                        f"{usage.get('completion_tokens', '?')} completion tokens]",
                        dim=True, err=True)


def _echo(text: str) -> None:
    click.echo(text, nl=False)


def _interactive(server: _Server, system: str | None) -> None:
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    history = [{"role": "system", "content": system}] if system else []
    start = len(history)
    click.secho(f"{server.url}, model {server.model}: /reset clears the history, /exit or "
                "Ctrl-D quits, Ctrl-C stops a reply", dim=True)
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            click.echo()
            return
        command = line.strip()
        if command in ("/exit", "/quit"):
            return
        if command == "/reset":
            del history[start:]
            click.secho("(history cleared)", dim=True)
            continue
        if not command:
            continue
        if server.chat:
            history.append({"role": "user", "content": line})
        click.secho("model> ", fg="blue", bold=True, nl=False)
        try:
            reply, usage = server.send(list(history) if server.chat else line, _echo)
        except (KeyboardInterrupt, QError) as exc:
            click.echo()
            if isinstance(exc, QError):
                click.secho(f"error: {exc}", fg="red", err=True)
            else:
                click.secho("(cancelled)", fg="yellow")
            if server.chat:
                history.pop()  # the unanswered question leaves the history
            continue
        click.echo()
        server.show_usage(usage)
        if server.chat:
            history.append({"role": "assistant", "content": reply})


def add_commands(cli: click.Group) -> None:
    @cli.command()
    @click.argument("url", default=DEFAULT_URL, required=False)
    @click.option("--model", "-m", help="model id (default: the first one GET /v1/models lists)")
    @click.option("--api-key", envvar="Q_API_KEY", show_envvar=True,
                  help="sent as `Authorization: Bearer KEY`")
    @click.option("--prompt", "-p", help="one-shot: send PROMPT (`-` reads stdin), print the "
                  "reply and exit")
    @click.option("--system", help="system prompt")
    @click.option("--chat/--no-chat", default=True, show_default=True,
                  help="POST /v1/chat/completions, or /v1/completions with the raw prompt")
    @click.option("--stream/--no-stream", default=True, show_default=True,
                  help="print the reply token by token, or all at once")
    @click.option("--json", "as_json", is_flag=True,
                  help="print the server's whole JSON answer (one-shot, implies --no-stream)")
    @click.option("--usage", is_flag=True, help="print token counts on stderr after each reply")
    @click.option("--max-tokens", type=int, help="[default: the server's]")
    @click.option("--temperature", type=float, help="0 = greedy [default: the server's]")
    @click.option("--top-p", type=float, help="[default: the server's]")
    @click.option("--seed", type=int, help="makes sampling reproducible")
    @click.option("--stop", multiple=True, help="stop string (repeatable)")
    @click.option("--timeout", default=600.0, show_default=True, type=float,
                  help="seconds to wait for the server (between tokens when streaming)")
    def client(url, model, api_key, prompt, system, chat, stream, as_json, usage, max_tokens,
               temperature, top_p, seed, stop, timeout):
        """Chat with the model an OpenAI-compatible server at URL serves (`q serve`, vLLM,
        SGLang, LMDeploy); URL may end in /v1.

        Type a message and press Enter; `/reset` clears the history, `/exit` or Ctrl-D quits,
        Ctrl-C stops a reply. With --no-chat each line is a raw prompt, without history.
        --prompt sends one message, prints the reply and exits (non-zero on errors).
        """
        if as_json and prompt is None:
            raise OptionError("--json needs --prompt")
        if system is not None and not chat:
            raise OptionError("--system needs chat (drop --no-chat)")
        if timeout <= 0:
            raise OptionError("--timeout must be positive")
        try:
            import httpx  # noqa: F401
        except ImportError:
            raise OptionError("q client needs httpx: pip install 'q-quant[serve]'") from None
        base = _base_url(url)
        options = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p,
                   "seed": seed, "stop": list(stop) or None}
        options = {key: value for key, value in options.items() if value is not None}
        with _errors(base, timeout):
            http = _make_client(base, api_key, timeout)
        with http:
            server = _Server(base, http, timeout, model, chat, stream, usage, options)
            if prompt is None:
                return _interactive(server, system)
            if prompt == "-":
                prompt = sys.stdin.read().rstrip("\n")
            content = prompt
            if chat:
                content = [{"role": "user", "content": prompt}]
                if system is not None:
                    content.insert(0, {"role": "system", "content": system})
            if as_json:
                data = server.send(content, _echo, raw=True)
                click.echo(json.dumps(data, indent=2, ensure_ascii=False))
                return
            printed = []

            def out(text: str) -> None:
                printed.append(text)
                _echo(text)

            try:
                _, used = server.send(content, out)
            except (KeyboardInterrupt, QError) as exc:
                if printed:
                    click.echo()  # end the partial reply before the error line
                if isinstance(exc, QError):
                    raise
                raise click.exceptions.Exit(130) from None
            click.echo()
            server.show_usage(used)
