"""Build the plugin manager: entry points of group ``q.plugins``, validated loudly.

Nothing happens at import. Built-ins are entry points in q's own pyproject, loaded exactly
like third-party plugins, so ``q plugins`` shows every provider the same way.
"""

from __future__ import annotations

import functools
import importlib.metadata as md
import os
import sys

import pluggy

from . import hookspecs
from .errors import PluginLoadError
from .hookspecs import ENTRY_POINT_GROUP, ENV_LOAD_PLUGINS, ENV_TRACE_PLUGINS, PROJECT

DISTRIBUTION = "q-quant"


def _entry_points(load: str) -> list[tuple[md.EntryPoint, str]]:
    """(entry point, distribution name) pairs to load, by the ``load`` policy."""
    wanted = None
    env = os.environ.get(ENV_LOAD_PLUGINS)
    if load == "none":
        return []
    if load == "builtin":
        wanted = {DISTRIBUTION}
    elif env is not None:
        wanted = {d.strip() for d in env.split(",") if d.strip()} | {DISTRIBUTION}
    found = []
    seen_dists = set()
    for dist in md.distributions():
        dist_name = dist.metadata["Name"] or ""
        # the same distribution can be visible twice (site-packages and a source tree's
        # egg-info on sys.path); like importlib.metadata.entry_points, the first one wins
        if dist_name in seen_dists:
            continue
        seen_dists.add(dist_name)
        if wanted is not None and dist_name not in wanted:
            continue
        for ep in dist.entry_points:
            if ep.group == ENTRY_POINT_GROUP:
                found.append((ep, dist_name))
    return found


def make_plugin_manager(load: str = "all", extra=()) -> pluggy.PluginManager:
    """A fresh, validated plugin manager.

    Args:
        load: ``all`` (every installed plugin, or those named in ``Q_LOAD_PLUGINS``),
            ``builtin`` (only q's own) or ``none``.
        extra: plugin objects to register too (test fakes), as ``(name, plugin)`` pairs or
            plain objects.

    Raises:
        PluginLoadError: q is not installed (no entry points), two entry points share a
            name, a plugin fails to import, or a hookimpl matches no hook.
    """
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    eps = _entry_points(load)
    if load != "none" and not any(dist == DISTRIBUTION for _, dist in eps):
        raise PluginLoadError(
            "q's built-in plugins are not registered: the distribution 'q-quant' has no "
            f"'{ENTRY_POINT_GROUP}' entry points. Install q with `pip install -e .` "
            "(or `pip install q-quant`)."
        )
    seen: dict[str, str] = {}
    dists: dict[str, str] = {}
    for ep, dist in eps:
        if ep.name in seen:
            raise PluginLoadError(
                f"plugin name '{ep.name}' is provided by both {seen[ep.name]} and {dist}; "
                f"uninstall one, or limit loading with {ENV_LOAD_PLUGINS}=dist1,dist2"
            )
        seen[ep.name] = dist
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken plugin must name itself, whatever it raised
            raise PluginLoadError(
                f"plugin '{ep.name}' from {dist} failed to import ({ep.value}): "
                f"{type(exc).__name__}: {exc}. Fix or uninstall it, or skip it with "
                f"{ENV_LOAD_PLUGINS}=<the distributions you want>"
            ) from exc
        pm.register(plugin, name=ep.name)
        dists[ep.name] = dist
    for item in extra:
        name, plugin = item if isinstance(item, tuple) else (None, item)
        pm.register(plugin, name=name)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginLoadError(f"plugin {exc.plugin!r} has a hook q does not define: {exc}")
    pm.q_distributions = dists  # plugin name -> distribution, for `q plugins`
    if os.environ.get(ENV_TRACE_PLUGINS):
        pm.add_hookcall_monitoring(_trace_before, _trace_after)
    return pm


def _trace_before(hook_name, hook_impls, kwargs):
    names = ", ".join(impl.plugin_name for impl in hook_impls)
    print(f"[q plugins] {hook_name} -> {names}", file=sys.stderr)


def _trace_after(outcome, hook_name, hook_impls, kwargs):
    pass


def plugin_distribution(pm, plugin_name: str) -> str:
    return getattr(pm, "q_distributions", {}).get(plugin_name, "(registered in-process)")


@functools.lru_cache(maxsize=1)
def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide manager the CLI and API use (built on first use)."""
    return make_plugin_manager()


@functools.lru_cache(maxsize=1)
def get_registries():
    """Registries built from :func:`get_plugin_manager` (cached for the process)."""
    from .registry import Registries

    return Registries.from_pm(get_plugin_manager())
