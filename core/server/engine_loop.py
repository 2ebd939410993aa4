"""Bridge between an engine Session (one scheduler thread) and asyncio request handlers.

One background thread runs ``session.step()`` while any request is unfinished and hands
each RequestOutput to the waiting handler's asyncio queue. Handlers submit with
:meth:`EngineLoop.submit` (refused with :class:`QueueFull` when the waiting queue is at
its bound, so overload answers 429 instead of growing without limit) and abort when their
client goes away, which frees the slot at the next step.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections.abc import AsyncIterator

from ..generation import RequestOutput, SamplingParams
from ..interfaces import Session

log = logging.getLogger("q.server")


class QueueFull(Exception):
    """The engine's waiting queue is at its bound."""


class EngineFailed(Exception):
    """The engine raised while stepping; the request cannot finish."""


class EngineLoop:
    def __init__(self, session: Session, *, max_queue: int = 256, metrics=None):
        self.session = session
        self.max_queue = max_queue
        self.metrics = metrics
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._run, name="q-engine", daemon=True)
        self._thread.start()

    # --- handler side (event loop) -----------------------------------------------------------

    def waiting(self) -> int:
        return getattr(self.session, "num_waiting", 0)

    def running(self) -> int:
        return getattr(self.session, "num_running", 0)

    def submit(self, prompt, params: SamplingParams) -> tuple[str, asyncio.Queue]:
        if self.waiting() >= self.max_queue:
            raise QueueFull(f"the server is at capacity ({self.max_queue} requests waiting); "
                            "retry later")
        rid = f"q-{next(self._ids)}"
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self._queues[rid] = (asyncio.get_running_loop(), queue)
        try:
            self.session.add_request(prompt, params, request_id=rid)
        except BaseException:
            with self._lock:
                self._queues.pop(rid, None)
            raise
        self._wake.set()
        return rid, queue

    def abort(self, rid: str) -> None:
        with self._lock:
            known = self._queues.pop(rid, None) is not None
        if known:
            self.session.abort(rid)
            self._wake.set()

    async def stream(self, rid: str, queue: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        """Yield a submitted request's outputs until finished; aborts it if the consumer
        stops early (client gone, task cancelled)."""
        finished = False
        try:
            while not finished:
                out = await queue.get()
                if isinstance(out, BaseException):
                    raise out
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(rid)
            else:
                with self._lock:
                    self._queues.pop(rid, None)

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=5)

    # --- engine thread -------------------------------------------------------------------------

    def _deliver(self, rid: str, item) -> None:
        with self._lock:
            target = self._queues.get(rid)
        if target is not None:
            loop, queue = target
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def _run(self) -> None:
        while not self._stop:
            self._wake.wait()
            self._wake.clear()
            while not self._stop and self.session.has_unfinished():
                try:
                    outputs = self.session.step()
                except Exception as exc:  # an engine bug must not kill the server
                    log.exception("engine step failed")
                    self._fail_all(exc)
                    continue
                if self.metrics is not None:
                    self.metrics.observe_step(self.running(), self.waiting())
                for out in outputs:
                    self._deliver(out.request_id, out)

    def _fail_all(self, exc: Exception) -> None:
        with self._lock:
            rids = list(self._queues)
        for rid in rids:
            self.session.abort(rid)
            self._deliver(rid, EngineFailed(f"the engine failed: {exc}"))
        try:  # drain the aborts so the loop does not spin on a broken batch
            self.session.step()
        except Exception:
            log.exception("engine could not recover; restart the server")
