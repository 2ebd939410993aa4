"""The top-level folder kernels/ is q.kernels; it must never pass for Hugging Face's `kernels`
package (which transformers imports) when Python runs with the repo root on sys.path."""

from __future__ import annotations

import importlib.metadata as md
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Imports what a user's session in the clone would, then reports where each module came from.
PROBE = """
import json, sys
{setup}
import q, q.kernels, transformers.integrations.hub_kernels, kernels
from kernels import CUDAProperties  # the name whose absence broke transformers
print(json.dumps({{"path0": sys.path[0], "kernels": kernels.__file__,
                  "q.kernels": q.kernels.__file__, "impl": q.kernels.Impl.auto.value}}))
"""


def hf_kernels_init() -> Path:
    return Path(md.distribution("kernels").locate_file("kernels/__init__.py")).resolve()


def probe(setup: str = "", how: str = "-c") -> dict:
    code = PROBE.format(setup=setup)
    args = [sys.executable, "-c", code] if how == "-c" else [sys.executable, "-"]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          input=None if how == "-c" else code)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def check(found: dict) -> None:
    assert Path(found["kernels"]).resolve() == hf_kernels_init()
    assert Path(found["q.kernels"]).resolve() == ROOT / "kernels" / "__init__.py"
    assert found["impl"] == "auto"


def test_python_c_in_repo_root_imports_hf_kernels():
    found = probe()
    assert found["path0"] == ""  # '' is the working directory: the repo root
    check(found)


def test_script_with_repo_root_as_sys_path0():
    check(probe(setup=f"sys.path.insert(0, {str(ROOT)!r})"))
    found = probe(how="stdin")  # `python -` reads a script, as a REPL session would
    assert found["path0"] == ""
    check(found)


def test_this_pytest_process_sees_hf_kernels():
    # pytest puts the repo root on sys.path because tests/ is a package
    assert str(ROOT) in [str(Path(p).resolve()) for p in sys.path if p]
    import kernels
    import transformers.integrations.hub_kernels  # noqa: F401

    assert Path(kernels.__file__).resolve() == hf_kernels_init()


def test_another_copy_of_q_on_sys_path_is_skipped(tmp_path):
    # a second clone of q earlier on sys.path: its kernels/ carries the same marker
    shutil.copytree(ROOT / "kernels", tmp_path / "kernels",
                    ignore=shutil.ignore_patterns("__pycache__"))
    check(probe(setup=f"sys.path.insert(0, {str(tmp_path)!r})"))


def site_without_hf_kernels(tmp_path) -> Path:
    """A site-packages of links to this environment's packages, Hugging Face's kernels left
    out: the same environment as if that package had never been installed."""
    site_dir = Path(md.distribution("kernels").locate_file(""))
    fake = tmp_path / "site-packages"
    fake.mkdir()
    for entry in site_dir.iterdir():
        if entry.name == "kernels" or entry.name.startswith("kernels-"):
            continue
        (fake / entry.name).symlink_to(entry)
    return fake


def test_without_hf_kernels_transformers_still_imports(tmp_path):
    # transformers before 5.25 does not require `kernels`; it must read q's folder as absent
    code = f"""
import site, sys
site.addsitedir({str(site_without_hf_kernels(tmp_path))!r})
import q, q.kernels, transformers.integrations.hub_kernels as hub
assert not hub.is_kernels_available()
import kernels
try:
    from kernels import get_kernel
except ModuleNotFoundError as e:
    print(e)
"""
    done = subprocess.run([sys.executable, "-S", "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    said = done.stdout.strip().splitlines()[-1]
    assert said.startswith("No module named 'kernels'")
    assert "q.kernels" in said and "pip install kernels" in said
