"""q's strip-layout kernels (``kernels/amx_tiles.h``: W8A8 int8, weight-only int8 and int4,
bf16) have two paths for 5+ tokens: AMX tiles, and AVX-512 registers on CPUs without
tiles. tests/test_kernels_torch.py checks whichever path this CPU builds; on a CPU with AMX
this reruns its strip-kernel tests with the kernels built without tiles
(``Q_NO_AMX_TILES=1``), so both paths are checked against the references wherever CI runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from q.kernels import cpp_build


def test_the_strip_kernels_pass_their_tests_without_amx_tiles():
    if not cpp_build.amx_tiles():
        pytest.skip("no AMX tiles on this CPU: test_kernels_torch.py ran the AVX-512 path")
    tests = Path(__file__).with_name("test_kernels_torch.py")
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests), "-k",
         "amx", "-rs"], env={**os.environ, "Q_NO_AMX_TILES": "1"}, capture_output=True,
        text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "SKIPPED" not in run.stdout, run.stdout[-4000:]


def test_without_tiles_the_kernels_say_so(monkeypatch):
    monkeypatch.setenv("Q_NO_AMX_TILES", "1")
    assert not cpp_build.amx_tiles() and cpp_build.strip_kernel_name() == "avx512"
    assert cpp_build.NO_TILES[0] in cpp_build._flags()
    monkeypatch.delenv("Q_NO_AMX_TILES")
    assert cpp_build.NO_TILES[0] not in cpp_build._flags()
