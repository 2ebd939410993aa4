"""Installed metadata matches pyproject, and every package folder ships in the wheel."""

from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PACKAGE_DIRS = PYPROJECT["tool"]["setuptools"]["package-dir"]


def test_installed_entry_points_equal_pyproject():
    table = PYPROJECT["project"]["entry-points"]["q.plugins"]
    installed = {ep.name: ep.value for ep in md.distribution("q-quant").entry_points
                 if ep.group == "q.plugins"}
    assert installed == table, "reinstall q (`pip install -e .`) after adding a built-in plugin"


def package_folders():
    found = set()
    for package, folder in PACKAGE_DIRS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([package, *rel.parts]))
    return found


def test_every_package_folder_is_listed():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    missing = package_folders() - listed
    assert not missing, f"add to [tool.setuptools] packages: {sorted(missing)}"


def test_every_builtin_entry_point_module_exists():
    for name, value in PYPROJECT["project"]["entry-points"]["q.plugins"].items():
        assert name == value, "built-in entry-point names are their module paths"
        __import__(value)


@pytest.mark.slow
def test_wheel_contains_every_package(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("q_quant-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for package in package_folders():
        assert f"{package.replace('.', '/')}/__init__.py" in names, package
    assert any(n.endswith("entry_points.txt") for n in names)
    # data files the code opens at run time: kernel tables, C++ kernels compiled on first use
    # and the headers they include
    for data in ROOT.glob("kernels/**/*"):
        if data.suffix in (".json", ".cpp", ".h"):
            assert f"q/kernels/{data.relative_to(ROOT / 'kernels')}" in names, data
