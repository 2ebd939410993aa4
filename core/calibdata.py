"""Calibration text: a built-in real-text corpus or the user's files, as token windows.

``--calib`` names a corpus of :mod:`q.textdata` (``botchan``, the default, or ``lee``; fetched
from PyPI once and cached, never part of the repository), a ``.txt`` file, a ``.jsonl``
file whose records carry ``text`` or chat ``messages`` (rendered with the model's chat
template, as the model will see them when serving), or a directory of such files.

Documents are tokenized in order and concatenated; ``samples`` windows of ``seqlen`` tokens
are then taken evenly spaced over what was read, so a long corpus is sampled across its
length rather than only at its start.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import OptionError, QError
from .modeling import load_tokenizer

DEFAULT_CALIB = "botchan"
DEFAULT_SAMPLES = 128
DEFAULT_SEQLEN = 512
# Below this many tokens a per-channel max is dominated by which few tokens happened to be
# sampled; LMDeploy defaults to 128 x 2048 and llm-compressor's examples to 512 x 2048.
MIN_TRUSTED_TOKENS = 8192
# Read at most this many times the tokens needed: enough to spread the windows over a
# long corpus without tokenizing all of a multi-gigabyte file.
READ_FACTOR = 4
TEXT_SUFFIXES = (".txt", ".jsonl")


class CalibrationWarning(UserWarning):
    """Calibration ran, but on less data than the statistics need to be trusted."""


@dataclass
class CalibrationSet:
    """Token windows ``[samples, seqlen]`` and where they came from (for the manifest)."""

    input_ids: torch.Tensor
    source: str
    warnings: list[str]

    def describe(self) -> dict:
        n, length = self.input_ids.shape
        return {"data": self.source, "samples": n, "seqlen": length, "tokens": n * length}


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise QError(f"{path}: cannot read calibration data ({exc.strerror or exc})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise QError(
            f"{path}: calibration data is not UTF-8 (byte 0x{raw[exc.start]:02x} at offset "
            f"{exc.start}); convert it, e.g. `iconv -f latin1 -t utf-8 {path.name}`"
        ) from None


def _jsonl_documents(path: Path, tokenizer):
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise QError(f"{path}:{lineno}: not a JSON object ({exc.msg})") from None
        if isinstance(record, dict) and isinstance(record.get("text"), str):
            yield record["text"], True
        elif isinstance(record, dict) and isinstance(record.get("messages"), list):
            if not getattr(tokenizer, "chat_template", None):
                raise QError(f"{path}:{lineno}: 'messages' needs a chat template and the "
                             "model has none; give the samples as 'text' instead")
            try:
                text = tokenizer.apply_chat_template(record["messages"], tokenize=False)
            except Exception as exc:  # noqa: BLE001 (jinja's errors name no file: add it)
                raise QError(f"{path}:{lineno}: the chat template rejects these messages "
                             f"({type(exc).__name__}: {exc})") from None
            yield text, False  # the template already holds the special tokens
        else:
            found = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
            raise QError(f"{path}:{lineno}: a calibration record needs a 'text' string or a "
                         f"'messages' list; found: {found or 'an empty object'}")


def _documents(spec: str, tokenizer):
    """(text, add_special_tokens) pairs, lazily, from a corpus name, file or directory."""
    from .textdata import SOURCES, real_text

    path = Path(spec)
    if spec in SOURCES and not path.exists():
        yield real_text(spec), True
        return
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise QError(f"{path}: no .txt or .jsonl files for calibration in this directory")
    elif path.is_file():
        if path.suffix not in TEXT_SUFFIXES:
            raise QError(f"{path}: calibration files must be .txt or .jsonl")
        files = [path]
    else:
        raise OptionError(f"--calib {spec}: no such file or directory, and not a built-in "
                          f"corpus ({', '.join(sorted(SOURCES))})")
    for f in files:
        if f.suffix == ".jsonl":
            yield from _jsonl_documents(f, tokenizer)
        else:
            yield _read_text(f), True


def load_calibration(model_dir: Path, spec: str | None = None, samples: int | None = None,
                     seqlen: int | None = None, tokenizer=None) -> CalibrationSet:
    """Token windows for calibrating the model in ``model_dir``.

    Raises:
        QError: the data is missing, empty, not UTF-8, malformed, or shorter than one window.
    """
    spec = str(spec or DEFAULT_CALIB)
    samples = DEFAULT_SAMPLES if samples is None else samples
    seqlen = DEFAULT_SEQLEN if seqlen is None else seqlen
    if samples < 1 or seqlen < 2:
        raise OptionError(f"--calib-samples must be >= 1 and --calib-seqlen >= 2 (got "
                          f"{samples} x {seqlen})")
    tokenizer = tokenizer or load_tokenizer(model_dir)
    ids: list[int] = []
    empty = True
    for text, special in _documents(spec, tokenizer):
        if text.strip():
            empty = False
            ids.extend(tokenizer(text, add_special_tokens=special).input_ids)
        if len(ids) >= READ_FACTOR * samples * seqlen:
            break
    if empty:
        raise QError(f"calibration data '{spec}' is empty (no text to run through the model)")
    windows = len(ids) // seqlen
    if windows == 0:
        raise QError(f"calibration data '{spec}' has only {len(ids)} tokens; one sample needs "
                     f"--calib-seqlen {seqlen}. Give more text or lower --calib-seqlen")
    notes = []
    if windows < samples:
        notes.append(f"calibration data '{spec}' holds {windows} windows of {seqlen} tokens; "
                     f"using {windows}, not the {samples} asked for")
        samples = windows
    starts = torch.linspace(0, windows - 1, samples).round().long() * seqlen
    flat = torch.tensor(ids, dtype=torch.long)
    input_ids = torch.stack([flat[s:s + seqlen] for s in starts.tolist()])
    if samples * seqlen < MIN_TRUSTED_TOKENS:
        notes.append(f"calibrating on only {samples} x {seqlen} = {samples * seqlen} tokens; "
                     f"statistics from fewer than {MIN_TRUSTED_TOKENS} tokens are not "
                     "reliable (raise --calib-samples / --calib-seqlen)")
    for note in notes:
        warnings.warn(note, CalibrationWarning, stacklevel=2)
    return CalibrationSet(input_ids, spec, notes)
