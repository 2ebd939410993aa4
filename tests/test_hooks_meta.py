"""Every hook has a test named test_hook_<name> and a heading ``name(args)`` in the docs."""

from __future__ import annotations

from pathlib import Path

import pytest

from q import hookspecs

from . import test_plugins

ROOT = Path(__file__).resolve().parent.parent
HOOKS = [n for n in dir(hookspecs) if n.startswith("register_")]


def argnames(hook_name):
    import inspect

    return list(inspect.signature(getattr(hookspecs, hook_name)).parameters)


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_test(hook):
    assert hasattr(test_plugins, f"test_hook_{hook}"), f"write tests/test_plugins.py::test_hook_{hook}"


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_documented(hook):
    doc = (ROOT / "docs" / "plugin-hooks.md").read_text()
    heading = f"## {hook}({', '.join(argnames(hook))})"
    assert heading in doc, f"docs/plugin-hooks.md needs the heading '{heading}'"


def test_there_are_five_hooks():
    assert HOOKS == sorted(["register_schemes", "register_formats", "register_engines",
                            "register_commands", "register_routes"])
