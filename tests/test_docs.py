"""Docs that are generated or referenced stay true."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_cli_reference_is_current():
    proc = subprocess.run([sys.executable, "-m", "cogapp", "--check", "docs/cli.md"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, "docs/cli.md is stale: run `cog -r docs/cli.md`\n" + proc.stderr


def test_readme_commands_exist():
    readme = (ROOT / "README.md").read_text()
    assert "bash tests/run.sh" in readme
    assert "q quantize" in readme and "q default-model" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash tests/run.sh" in ci


def test_docs_pages_exist():
    for page in ("cli.md", "plugin-hooks.md", "formats.md", "writing-plugins.md", "design.md"):
        assert (ROOT / "docs" / page).stat().st_size > 500, page
