"""Run a list of tensor conversions from a ModelSource into an output directory.

Each Job names the source tensors it reads and a pure function that turns them into output
tensors. Jobs run once on meta tensors to fix the output layout, then for real in a
three-stage pipeline: a reader thread (pread), one compute thread per core and a writer
thread (pwrite), joined by small bounded queues so at most a few tensors are in memory at
once whatever the model size. Plain copies never enter
Python memory: they go file-to-file with ``copy_file_range``.
"""

from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .source import ModelSource
from .writer import Layout, ShardWriter, build_layout

DEFAULT_SHARD_BYTES = 5 * 1024**3
_DONE = object()
_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def bound_allocator_growth() -> None:
    """Fix glibc's mmap threshold at 256 MiB for the whole run.

    Left dynamic, glibc moves the threshold after large frees, and tensor-sized buffers end
    up in per-thread heaps where fragmentation grew peak RSS with the number of tensors
    (tests/test_memory.py failed that way). A low fixed threshold (1 MiB) kept RSS flat but
    made every buffer a fresh mmap, zero-filled one page fault at a time. At 256 MiB every
    tensor-sized buffer comes from the heap and is reused and RSS still stays flat. On the
    3B benchmark model: 11.7 s with 1 MiB, 9.3-10.8 s with 256 MiB (docs/benchmarks.md).
    No-op off glibc.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 256 << 20)
    except (OSError, AttributeError):
        pass


@dataclass
class Job:
    inputs: list[str]
    run: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None
    copy: bool = False  # output is the single input, byte for byte

    def outputs_meta(self, source: ModelSource) -> dict[str, torch.Tensor]:
        if self.copy:
            name = self.inputs[0]
            return {name: source.meta(name)}
        return self.run({n: source.meta(n) for n in self.inputs})


def plan_layout(source: ModelSource, jobs: list[Job], max_shard: int,
                metadata: dict[str, str]) -> tuple[Layout, list[dict[str, torch.Tensor]]]:
    metas = [job.outputs_meta(source) for job in jobs]
    specs = [(n, t.dtype, tuple(t.shape)) for out in metas for n, t in out.items()]
    return build_layout(specs, max_shard, metadata), metas


class BufferPool:
    """Reusable uint8 read buffers: a fresh buffer per tensor costs the kernel a zero-filled
    page fault per 4 KiB (measured: 1.4 M faults reading a 5.6 GiB model). At most a few
    buffers are in flight, bounded by the pipeline's queues."""

    def __init__(self):
        self.free: list[torch.Tensor] = []
        self.lock = threading.Lock()

    def acquire(self, nbytes: int) -> torch.Tensor:
        with self.lock:
            fits = [i for i, b in enumerate(self.free) if b.numel() >= nbytes]
            if fits:
                best = min(fits, key=lambda i: self.free[i].numel())
                return self.free.pop(best)  # by index: == on tensors compares values
        return torch.empty(nbytes, dtype=torch.uint8)

    def release(self, buffers) -> None:
        with self.lock:
            self.free.extend(buffers)
            # keep the largest few; big one-off buffers (embeddings) are not hoarded twice
            self.free.sort(key=lambda b: b.numel(), reverse=True)
            del self.free[8:]


def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


def run_jobs(source: ModelSource, jobs: list[Job], layout: Layout, directory: Path,
             progress: Callable[[int], None] | None = None, workers: int | None = None) -> None:
    """Execute ``jobs`` into ``directory`` following ``layout``; re-raises the first error.

    One reader thread, ``workers`` compute threads and one writer thread. Each compute
    thread runs torch with a single intra-op thread. Tensors are independent, so one tensor
    per core uses every core without torch's per-op barriers, which wait on the slowest
    core: on a quiet machine the two layouts quantize equally fast, but when other work
    shares the cores (the reader and writer threads, other processes) the barriers stall
    every op. End to end on the 3B benchmark this change took fp8-block from 27 s to 11.5 s
    (docs/benchmarks.md). Writes go to precomputed offsets, so completion order does not
    matter.
    """
    workers = workers or default_workers()
    writer = ShardWriter(directory, layout)
    read_q: queue.Queue = queue.Queue(maxsize=workers + 1)
    write_q: queue.Queue = queue.Queue(maxsize=workers + 1)
    errors: list[BaseException] = []
    stop = threading.Event()

    def fail(exc: BaseException) -> None:
        errors.append(exc)
        stop.set()

    def put(q, item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def get(q):
        while not stop.is_set():
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                continue
        return None

    pool = BufferPool()

    def read_stage():
        try:
            for job in jobs:
                buffers, tensors = [], {}
                for n in ([] if job.copy else job.inputs):
                    buffers.append(pool.acquire(source.info(n).nbytes))
                    tensors[n] = source.read(n, buffers[-1])
                if not put(read_q, (job, tensors, buffers)):
                    return
        except BaseException as exc:  # handed to the main thread, which re-raises it
            fail(exc)
        finally:
            for _ in range(workers):
                put(read_q, _DONE)

    def compute_stage():
        try:
            while True:
                item = get(read_q)
                if item is None or item is _DONE:
                    return
                job, tensors, buffers = item
                outputs = {} if job.copy else job.run(tensors)
                nbytes = sum(source.info(n).nbytes for n in job.inputs)
                del tensors  # outputs may still view the input buffers (export): the
                if not put(write_q, (job, outputs, nbytes, buffers)):  # writer frees them
                    return
        except BaseException as exc:
            fail(exc)

    def write_stage():
        try:
            while True:
                item = get(write_q)
                if item is None or item is _DONE:
                    return
                job, outputs, nbytes, buffers = item
                if job.copy:
                    info = source.info(job.inputs[0])
                    writer.copy_range(info.name, info.file, info.offset)
                else:
                    for name, tensor in outputs.items():
                        writer.write(name, tensor)
                del outputs
                pool.release(buffers)
                if progress:
                    progress(nbytes)
        except BaseException as exc:
            fail(exc)

    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    reader = threading.Thread(target=read_stage, name="q-read", daemon=True)
    computes = [threading.Thread(target=compute_stage, name=f"q-compute-{i}", daemon=True)
                for i in range(workers)]
    writer_thread = threading.Thread(target=write_stage, name="q-write", daemon=True)
    try:
        for t in (reader, *computes, writer_thread):
            t.start()
        for t in (reader, *computes):
            t.join()
        put(write_q, _DONE)
        writer_thread.join()
    except BaseException as exc:  # Ctrl-C in the main thread: stop every stage, then leave
        fail(exc)
        for t in (reader, *computes, writer_thread):
            if t.ident is not None:  # started (Ctrl-C can land while threads start)
                t.join()
    finally:
        torch.set_num_threads(threads_before)
    if errors:
        writer.close()
        raise errors[0]
    writer.finish()
