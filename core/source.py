"""ModelSource: a lazy, validated view of an HF model directory's safetensors shards.

Headers are parsed by q itself (8-byte little-endian length + JSON), so every defect gets
an error naming the file and tensor: a truncated or corrupt header, data that runs past the
end of the file, a dtype/shape that disagrees with the byte range, an index that names a
missing shard or a tensor the shard lacks. Tensors are read with plain ``pread`` into fresh
buffers (not mmap), so reading a model does not grow resident memory with the file size.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors spec's own limit

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
    "BF16": torch.bfloat16, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
if hasattr(torch, "float8_e8m0fnu"):  # DeepSeek-V3.1-style power-of-two scales
    DTYPES["F8_E8M0"] = torch.float8_e8m0fnu
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict]:
    """Parse and validate one file's header; returns (tensors, __metadata__)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: file is {size} bytes, too short for a header")
            (hlen,) = struct.unpack("<Q", head)
            if hlen > MAX_HEADER_BYTES or 8 + hlen > size:
                raise CheckpointError(
                    f"{path}: header claims {hlen} bytes but the file has {size}; the file "
                    "is truncated or not safetensors. Re-download or re-export it."
                )
            raw = f.read(hlen)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    data_start = 8 + hlen
    tensors = {}
    for name, entry in header.items():
        tensors[name] = _tensor_info(path, name, entry, data_start, size)
    return tensors, meta


def _tensor_info(path, name, entry, data_start, size) -> TensorInfo:
    try:
        dtype = DTYPES[entry["dtype"]]
        shape = tuple(int(s) for s in entry["shape"])
        begin, end = (int(v) for v in entry["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(
            f"{path}: tensor '{name}' has a malformed header entry: {str(entry)[:120]}"
        ) from None
    numel = 1
    for s in shape:
        numel *= s
    expected = numel * torch.empty((), dtype=dtype).element_size()
    if end - begin != expected or begin < 0:
        raise CheckpointError(
            f"{path}: tensor '{name}' is {entry['dtype']}{list(shape)} ({expected} bytes) "
            f"but its byte range holds {end - begin}; the header is inconsistent"
        )
    if data_start + end > size:
        raise CheckpointError(
            f"{path}: tensor '{name}' runs past the end of the file (needs byte "
            f"{data_start + end}, file has {size}); the file is truncated. Re-download it."
        )
    return TensorInfo(name, path, dtype, shape, data_start + begin, expected)


class ModelSource:
    """Tensor metadata of every shard up front; tensor data only when asked for."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a directory (expected an HF model dir)")
        self.config = load_config(self.path)
        self.files, self.tensors, self.metadata = self._scan()

    def _scan(self):
        index_path = self.path / INDEX_FILE
        tensors: dict[str, TensorInfo] = {}
        metadata: dict = {}
        if index_path.exists():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index_path}: not a valid index ({exc})") from None
            files = sorted(set(weight_map.values()))
            for fname in files:
                if not (self.path / fname).exists():
                    users = [k for k, v in weight_map.items() if v == fname][:3]
                    raise CheckpointError(
                        f"{index_path} names shard '{fname}' (for {', '.join(users)}...) "
                        "but the file is missing; copy the complete checkpoint"
                    )
            headers = {f: read_safetensors_header(self.path / f) for f in files}
            for name, fname in weight_map.items():
                found, _ = headers[fname]
                if name not in found:
                    raise CheckpointError(
                        f"{index_path} maps '{name}' to {fname}, which has no such tensor"
                    )
                tensors[name] = found[name]
            for fname, (_, meta) in headers.items():
                metadata.update(meta)
        else:
            files = sorted(p.name for p in self.path.glob("*.safetensors"))
            if not files:
                raise CheckpointError(
                    f"{self.path}: no *.safetensors weights (and no {INDEX_FILE}); q reads "
                    "safetensors checkpoints only. Convert .bin weights with "
                    "transformers' save_pretrained(safe_serialization=True)."
                )
            for fname in files:
                found, meta = read_safetensors_header(self.path / fname)
                for name, info in found.items():
                    if name in tensors:
                        raise CheckpointError(
                            f"{self.path}: tensor '{name}' appears in both "
                            f"{tensors[name].file.name} and {fname} and there is no index"
                        )
                    tensors[name] = info
                metadata.update(meta)
        return [self.path / f for f in files], tensors, metadata

    def names(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named '{name}'") from None

    def meta(self, name: str) -> torch.Tensor:
        """A data-less stand-in with the tensor's shape and dtype (for planning)."""
        info = self.info(name)
        return torch.empty(info.shape, dtype=info.dtype, device="meta")

    def read(self, name: str, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """Read one tensor into a CPU buffer (no mmap): ``buffer`` (uint8, reused) or a new one."""
        info = self.info(name)
        buf = torch.empty(info.nbytes, dtype=torch.uint8) if buffer is None else \
            buffer[: info.nbytes]
        try:
            fd = os.open(info.file, os.O_RDONLY)
            try:
                view = memoryview(buf.numpy())
                got = 0
                while got < info.nbytes:
                    n = os.preadv(fd, [view[got:]], info.offset + got)
                    if n == 0:
                        raise CheckpointError(
                            f"{info.file}: tensor '{name}' ends early; the file was truncated "
                            "while q was reading it"
                        )
                    got += n
            finally:
                os.close(fd)
        except OSError as exc:
            raise CheckpointError(f"{info.file}: cannot read '{name}': {exc}") from None
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        return buf.view(info.dtype).reshape(info.shape)

    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def load_config(path: Path) -> dict:
    cfg = path / "config.json"
    if not cfg.exists():
        raise CheckpointError(
            f"{path}: no config.json; q needs an HF model directory (config.json plus "
            "*.safetensors). If this is a GGUF or .bin model, convert it with transformers."
        )
    try:
        data = json.loads(cfg.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{cfg}: unreadable or not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{cfg}: expected a JSON object")
    return data


def model_dtype(config: dict) -> torch.dtype:
    """The checkpoint's float dtype from config.json (``dtype`` or ``torch_dtype``)."""
    name = config.get("dtype") or config.get("torch_dtype") or "bfloat16"
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.bfloat16


def read_recipe_file(path: Path):
    """The q_recipe.json q writes beside its outputs, or None."""
    from .recipe import RECIPE_FILE, QuantRecipe

    f = Path(path) / RECIPE_FILE
    return QuantRecipe.from_json(f.read_text()) if f.exists() else None
