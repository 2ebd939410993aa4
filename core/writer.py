"""Streaming safetensors output: exact layout first, then data written in place, atomically.

The layout (every output tensor's name, dtype and shape) is known before any data is
computed, because q runs each conversion once on meta tensors. So each shard's header is
written first and tensor bytes go straight to their final offsets with ``pwrite``: no
temporary body file, no second copy. The whole output directory is built under a hidden
``.NAME.q-partial-PID`` sibling and renamed into place only when complete, so a crash, a
full disk or SIGKILL never leaves a complete-looking output behind.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import OutputExistsError, QError
from .source import DTYPE_NAMES, SINGLE_FILE, INDEX_FILE

PARTIAL_MARK = ".q-partial-"
ALIGN = 8  # tensor data offsets aligned to 8 bytes, as safetensors' own writer does


@dataclass
class Slot:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    shard: int = 0
    offset: int = 0  # absolute offset in the shard file


@dataclass
class Layout:
    shards: list[list[Slot]] = field(default_factory=list)
    slots: dict[str, Slot] = field(default_factory=dict)
    headers: list[bytes] = field(default_factory=list)

    def shard_name(self, i: int) -> str:
        if len(self.shards) == 1:
            return SINGLE_FILE
        return f"model-{i + 1:05d}-of-{len(self.shards):05d}.safetensors"

    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.slots.values())


def build_layout(tensors: list[tuple[str, torch.dtype, tuple[int, ...]]], max_shard: int,
                 metadata: dict[str, str]) -> Layout:
    """Cut tensors (in write order) into shards of at most ``max_shard`` data bytes."""
    layout = Layout()
    current: list[Slot] = []
    size = 0
    for name, dtype, shape in tensors:
        if name in layout.slots:
            raise QError(f"internal: two conversions produce tensor '{name}'")
        numel = 1
        for s in shape:
            numel *= s
        slot = Slot(name, dtype, tuple(shape), numel * torch.empty((), dtype=dtype).element_size())
        if current and size + slot.nbytes > max_shard:
            layout.shards.append(current)
            current, size = [], 0
        current.append(slot)
        size += slot.nbytes
        layout.slots[name] = slot
    layout.shards.append(current)
    for i, slots in enumerate(layout.shards):
        header, pos = {"__metadata__": metadata}, 0
        for slot in slots:
            slot.shard = i
            header[slot.name] = {
                "dtype": DTYPE_NAMES[slot.dtype], "shape": list(slot.shape),
                "data_offsets": [pos, pos + slot.nbytes],
            }
            slot.offset = pos
            pos += slot.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-(len(raw) + 8) % ALIGN)
        layout.headers.append(raw)
        for slot in slots:
            slot.offset += 8 + len(raw)
    return layout


class ShardWriter:
    """Writes tensors of a known Layout into shard files under ``directory``."""

    def __init__(self, directory: Path, layout: Layout):
        self.directory, self.layout = directory, layout
        self.fds = []
        for i, header in enumerate(layout.headers):
            fd = os.open(directory / layout.shard_name(i), os.O_WRONLY | os.O_CREAT, 0o644)
            self.fds.append(fd)
            self._pwrite(fd, len(header).to_bytes(8, "little") + header, 0)
        self.written: set[str] = set()

    def _pwrite(self, fd: int, data, offset: int) -> None:
        view = memoryview(data).cast("B")
        while view:
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n

    def write(self, name: str, tensor: torch.Tensor) -> None:
        slot = self.layout.slots[name]
        if tensor.dtype != slot.dtype or tuple(tensor.shape) != slot.shape:
            raise QError(
                f"internal: tensor '{name}' is {tensor.dtype}{list(tensor.shape)} but the "
                f"plan said {slot.dtype}{list(slot.shape)}"
            )
        if slot.nbytes:
            data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
            self._pwrite(self.fds[slot.shard], data, slot.offset)
        self.written.add(name)

    def copy_range(self, name: str, src_file: Path, src_offset: int) -> None:
        """Copy a tensor's bytes file-to-file in the kernel (no Python buffer)."""
        slot = self.layout.slots[name]
        with open(src_file, "rb") as src:
            left, soff, doff = slot.nbytes, src_offset, slot.offset
            while left:
                n = os.copy_file_range(src.fileno(), self.fds[slot.shard], left, soff, doff)
                if n == 0:
                    raise QError(f"{src_file}: ended while copying '{name}'")
                left, soff, doff = left - n, soff + n, doff + n
        self.written.add(name)

    def finish(self) -> None:
        missing = set(self.layout.slots) - self.written
        if missing:
            raise QError(f"internal: {len(missing)} planned tensors were never written")
        for fd in self.fds:
            os.fsync(fd)
        self.close()
        if len(self.layout.shards) > 1:
            index = {
                "metadata": {"total_size": self.layout.total_bytes()},
                "weight_map": {
                    s.name: self.layout.shard_name(s.shard) for s in self.layout.slots.values()
                },
            }
            (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

    def close(self) -> None:
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []


class AtomicOutput:
    """A directory that appears at ``target`` only when the block succeeds."""

    def __init__(self, target: str | os.PathLike, overwrite: bool = False,
                 protect: list[Path] = ()):
        self.target = Path(target).absolute()
        self.overwrite = overwrite
        for p in protect:
            p = Path(p).absolute()
            if self.target == p or p.is_relative_to(self.target):
                raise OutputExistsError(
                    f"{self.target}: the output would replace the input {p}; choose another -o"
                )
        if self.target.exists() and not overwrite:
            raise OutputExistsError(
                f"{self.target} already exists; choose another -o or pass --overwrite"
            )
        self.partial = self.target.parent / f".{self.target.name}{PARTIAL_MARK}{os.getpid()}"

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(self.target)
        self.partial.mkdir()
        return self.partial

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.partial, ignore_errors=True)
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                raise QError(
                    f"no space left while writing {self.target} ({exc.strerror}); the partial "
                    "output was removed and nothing was written there. Free space and rerun."
                ) from None
            return False
        if self.target.exists():
            old = self.target.parent / f".{self.target.name}.q-old-{os.getpid()}"
            os.rename(self.target, old)
            os.rename(self.partial, self.target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(self.partial, self.target)
        return False


def remove_stale_partials(target: Path) -> None:
    """Delete partial outputs of earlier runs that were killed (their PID is gone)."""
    for p in target.parent.glob(f".{target.name}{PARTIAL_MARK}*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
