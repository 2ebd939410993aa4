"""The plugin manager, registries and every hook (one test_hook_<name> per hookspec)."""

from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys
import types

import click
import click.testing
import pytest

import q
from q.errors import DuplicateNameError, PluginLoadError, UnknownNameError
from q.plugin_manager import make_plugin_manager
from q.registry import Registries, Registry, normalize_name


class FakeScheme:
    name = "Fake_Scheme"
    description = "a fake"


class FakeFormat:
    name = "fake-format"


class FakeEngine:
    name = "fake-engine"


class FakePlugin:
    __name__ = "fake-plugin"

    @q.hookimpl
    def register_schemes(self, register):
        register(FakeScheme(), aliases=("fake",))

    @q.hookimpl
    def register_formats(self, register):
        register(FakeFormat())

    @q.hookimpl
    def register_engines(self, register):
        register(FakeEngine(), aliases=("fe",))

    @q.hookimpl
    def register_commands(self, cli):
        @cli.command(name="fake-hello")
        def hello():
            click.echo("hello from a plugin")

    @q.hookimpl
    def register_routes(self, register):
        register("fake-router")


@pytest.fixture
def fake_world():
    return make_plugin_manager(load="builtin", extra=[("fake-plugin", FakePlugin())])


def test_hook_register_schemes(fake_world):
    regs = Registries.from_pm(fake_world)
    assert regs.schemes.get("FAKE SCHEME").name == "Fake_Scheme"
    assert regs.schemes.get("fake").name == "Fake_Scheme"
    assert regs.schemes.owner("fake-scheme") == "fake-plugin"
    assert {"fp8-block", "fp8-dynamic", "fp8-tensor", "wint8", "wint4"} <= set(regs.schemes.names())


def test_hook_register_formats(fake_world):
    regs = Registries.from_pm(fake_world)
    assert regs.formats.get("vllm").name == "compressed-tensors"
    assert regs.formats.get("fake_format").name == "fake-format"
    assert regs.formats.owner("hf-fp8") == "q.plugins.formats.hf_fp8"


def test_hook_register_engines(fake_world):
    regs = Registries.from_pm(fake_world)
    assert regs.engines.get("fe").name == "fake-engine"


def test_hook_register_commands(fake_world):
    group = click.Group()
    fake_world.hook.register_commands(cli=group)
    result = click.testing.CliRunner().invoke(group, ["fake-hello"])
    assert result.output.strip() == "hello from a plugin"


def test_hook_register_routes(fake_world):
    routers = []
    fake_world.hook.register_routes(register=routers.append)
    assert routers == ["fake-router"]


def test_normalize_name():
    assert normalize_name(" FP8_Block ") == "fp8-block"
    assert normalize_name("w4 a16") == "w4-a16"


def test_registry_miss_lists_choices():
    reg = Registry("scheme")
    reg.add(FakeScheme(), "p1")
    with pytest.raises(UnknownNameError, match="unknown scheme 'nope'; choose one of: fake-scheme"):
        reg.get("nope")


def test_duplicate_names_name_both_owners():
    reg = Registry("scheme")
    reg.add(FakeScheme(), "first-plugin")
    with pytest.raises(DuplicateNameError, match="first-plugin and second-plugin"):
        reg.add(FakeScheme(), "second-plugin")
    with pytest.raises(DuplicateNameError):  # an alias may not shadow a name either
        reg.add(type("S", (), {"name": "other"})(), "third", aliases=("fake-scheme",))


def test_duplicate_scheme_across_plugins_is_an_error():
    class Dup:
        @q.hookimpl
        def register_schemes(self, register):
            register(type("S", (), {"name": "fp8_block"})())

    pm = make_plugin_manager(load="builtin", extra=[("dup-plugin", Dup())])
    with pytest.raises(DuplicateNameError, match="dup-plugin"):
        Registries.from_pm(pm)


def test_misspelled_hook_fails_check_pending():
    class Typo:
        @q.hookimpl
        def register_scheme(self, register):  # missing "s"
            pass

    with pytest.raises(PluginLoadError, match="register_scheme"):
        make_plugin_manager(load="builtin", extra=[("typo", Typo())])


class FakeDist:
    def __init__(self, name, eps):
        self.metadata = {"Name": name}
        self.entry_points = eps


def fake_distributions(monkeypatch, extra_dists):
    real = list(md.distributions())
    monkeypatch.setattr(md, "distributions", lambda: real + extra_dists)


def test_broken_plugin_names_itself(monkeypatch):
    ep = md.EntryPoint(name="broken", value="q_no_such_module_xyz", group="q.plugins")
    fake_distributions(monkeypatch, [FakeDist("q-broken-plugin", [ep])])
    with pytest.raises(PluginLoadError, match="plugin 'broken' from q-broken-plugin failed"):
        make_plugin_manager()
    # the escape hatch: load only the named distributions
    monkeypatch.setenv("Q_LOAD_PLUGINS", "q-quant")
    make_plugin_manager()


def test_duplicate_entry_point_names_are_errors(monkeypatch):
    module = types.ModuleType("q_fake_ep_mod")
    sys.modules["q_fake_ep_mod"] = module
    eps = [md.EntryPoint(name="same", value="q_fake_ep_mod", group="q.plugins")]
    fake_distributions(monkeypatch, [FakeDist("dist-a", eps), FakeDist("dist-b", eps)])
    with pytest.raises(PluginLoadError, match="both dist-a and dist-b"):
        make_plugin_manager()


def test_uninstalled_source_tree_says_pip_install(monkeypatch):
    monkeypatch.setattr(md, "distributions", lambda: [])
    with pytest.raises(PluginLoadError, match="pip install -e"):
        make_plugin_manager()


def test_trace_env_prints_hook_calls(monkeypatch, capsys):
    monkeypatch.setenv("Q_TRACE_PLUGINS", "1")
    # registries call impls directly (to learn owners), so trace a normal hook call:
    pm = make_plugin_manager(load="builtin")
    pm.hook.register_schemes(register=lambda *a, **k: None)
    assert "[q plugins] register_schemes" in capsys.readouterr().err


def test_import_q_stays_light():
    code = ("import sys, q; heavy = [m for m in ('triton', 'vllm', 'fastapi', "
            "'transformers') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_plugin_that_raises_while_registering_names_itself():
    class Buggy:
        @q.hookimpl
        def register_schemes(self, register):
            raise TypeError("Can't instantiate abstract class")

    pm = make_plugin_manager(load="builtin", extra=[("buggy-plugin", Buggy())])
    with pytest.raises(PluginLoadError, match="plugin 'buggy-plugin' failed in register_schemes"):
        Registries.from_pm(pm)
