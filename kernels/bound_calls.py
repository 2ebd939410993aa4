"""Kernel calls bound once to fixed tensors, and runs of them replayed by one C++ call.

A replayed decode step (plugins/engines/native/decode_program.py) is a fixed list of some
200 kernel calls on fixed buffers. A :class:`BoundCall` is one of them: a C++ kernel with
its arguments checked and converted once, callable without arguments. Called one by one
through ctypes, each call costs the interpreter's loop, ctypes' conversion of a dozen
arguments and a return to Python: on a 2-core CPU a lone request's step spent a tenth of
its time with only the main thread working (``perf record``, docs/benchmarks.md).
:func:`batch` turns each run of consecutive bound calls into one :class:`CallRun`, which
hands them to the call runner (``bound_calls.cpp``) as arrays of 64-bit words: one ctypes
call per run, the GIL released throughout. The kernels and their arguments are the same
either way, so are the results, bit for bit.

Arguments that change per step (rotary tables, cache slots, block tables) are ctypes
objects (``c_void_p``, ``c_int64``) the caller points anew before each step, named as the
*registers* of :func:`batch`: each run copies their values into its words before its
calls run.
"""

from __future__ import annotations

import ctypes
import functools
import struct
from pathlib import Path

from . import cpp_build

RUNNER_SOURCE = Path(__file__).with_name("bound_calls.cpp")


@functools.cache
def _runner():
    lib, why = cpp_build.bind(RUNNER_SOURCE, q_run_calls="ppl p ppl p")
    return None if lib is None else lib.q_run_calls, why


def runner_unavailable() -> str | None:
    """Why runs of bound calls go through Python one call at a time (None: they need not)."""
    return _runner()[1]


def _word(kind, value) -> int:
    """One argument as the 64-bit word the kernel's ``_packed`` entry reads (packed_call.h)."""
    if kind is ctypes.c_float:
        return struct.unpack("<I", struct.pack("<f", value))[0]
    if kind is ctypes.c_void_p:
        return 0 if value is None else int(value)
    return int(value)


class BoundCall:
    """``lib.name(*args)`` as a call without arguments, for a kernel whose tensors (fixed
    buffers and weights) were checked once when it was bound; the tensors behind the
    pointers must outlive it. Raises where the kernel refuses its arguments (returns
    nonzero). ``lib.name`` must have its argument types declared (:func:`cpp_build.bind`);
    where the library also exports ``name_packed`` (``Q_PACKED``, packed_call.h), the call
    can join a :class:`CallRun`."""

    def __init__(self, lib: ctypes.CDLL, name: str, args: tuple):
        self.fn, self.name, self.args = getattr(lib, name), name, args
        if len(args) != len(self.fn.argtypes):
            raise TypeError(f"{name} takes {len(self.fn.argtypes)} arguments, "
                            f"{len(args)} were bound")
        packed = getattr(lib, f"{name}_packed", None)
        self.packed = None if packed is None else ctypes.cast(packed, ctypes.c_void_p).value

    @property
    def parts(self) -> tuple[BoundCall, ...]:
        return (self,)

    def __call__(self) -> None:
        if self.fn(*self.args):
            raise RuntimeError(f"the C++ kernel {self.name} refused its bound arguments")

    def words(self, registers: tuple) -> tuple[list[int], list[tuple[int, int]]]:
        """The arguments as words, and (word, register) for each that is one of
        ``registers`` (its word is written before each run)."""
        words, patches = [], []
        for i, (kind, arg) in enumerate(zip(self.fn.argtypes, self.args)):
            if isinstance(arg, ctypes._SimpleCData):
                which = [r for r, register in enumerate(registers) if register is arg]
                if not which:  # its value may change: a run would keep the one seen here
                    raise ValueError(f"argument {i} (from 0) of {self.name} is a ctypes "
                                     "object that is not one of the step's registers")
                patches.append((i, which[0]))
                words.append(0)
            else:
                words.append(_word(kind, arg))
        return words, patches


class BoundCalls:
    """Bound calls run one after another as one call (an int8 GEMM's activation
    quantization, then the GEMM); ``keep``: tensors their pointers point into."""

    def __init__(self, parts: tuple[BoundCall, ...], keep: tuple = ()):
        self.parts, self.keep = parts, keep

    def __call__(self) -> None:
        for part in self.parts:
            part()


def _array(values: list[int]):
    return (ctypes.c_int64 * max(len(values), 1))(*values)


class CallRun:
    """Consecutive bound calls run by one call to the C++ runner."""

    def __init__(self, calls: list[BoundCall], registers: tuple):
        self.calls, self.registers = calls, registers
        words, offsets, targets, sources = [], [], [], []
        for call in calls:
            own, patches = call.words(registers)
            offsets.append(len(words))
            targets += [len(words) + i for i, _ in patches]
            sources += [r for _, r in patches]
            words += own
        arrays = [_array(a) for a in ([c.packed for c in calls], offsets, words, targets,
                                      sources, [0] * len(registers))]
        self._arrays = arrays  # what the pointers below point into
        self.values = arrays[5]
        at = ctypes.addressof
        self._args = (at(arrays[0]), at(arrays[1]), len(calls), at(arrays[2]), at(arrays[3]),
                      at(arrays[4]), len(targets), at(arrays[5]))

    def __call__(self) -> None:
        for i, register in enumerate(self.registers):
            self.values[i] = register.value or 0
        failed = _runner()[0](*self._args)
        if failed:
            raise RuntimeError(f"the C++ kernel {self.calls[failed - 1].name} refused its "
                               "bound arguments")


def batch(calls: list, registers: tuple = ()) -> list:
    """``calls`` (bound calls and other callables, run in order) with each run of
    consecutive bound calls made one :class:`CallRun`; the list unchanged where the runner
    is unavailable. ``registers``: the ctypes objects bound calls take that change between
    runs."""
    if runner_unavailable() is not None:
        return list(calls)
    steps, pending = [], []
    for call in calls:
        parts = getattr(call, "parts", None)
        if parts is not None and all(p.packed is not None for p in parts):
            pending += parts
            continue
        if pending:
            steps.append(CallRun(pending, registers))
            pending = []
        steps.append(call)
    if pending:
        steps.append(CallRun(pending, registers))
    return steps
