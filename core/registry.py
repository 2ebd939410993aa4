"""Registries of schemes, formats and engines: strict names, explicit aliases, helpful misses."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Generic, Iterator, TypeVar

from .errors import DuplicateNameError, PluginLoadError, QError, UnknownNameError

T = TypeVar("T")


def normalize_name(name: str) -> str:
    """``'FP8_Block '`` -> ``'fp8-block'``: lower case, runs of ``_``, space and ``-`` -> ``-``."""
    return re.sub(r"[\s_\-]+", "-", str(name).strip().lower()).strip("-")


@dataclass
class Entry(Generic[T]):
    obj: T
    owner: str
    aliases: tuple[str, ...] = ()


@dataclass
class Registry(Generic[T]):
    """Names -> registered objects for one plugin kind (``scheme``, ``format``, ``engine``)."""

    kind: str
    entries: dict[str, Entry[T]] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)

    def add(self, obj: T, owner: str, aliases=()) -> None:
        name = normalize_name(getattr(obj, "name", ""))
        if not name:
            raise DuplicateNameError(f"{self.kind} from {owner} has no name")
        for key in (name, *map(normalize_name, aliases)):
            clash = self.entries.get(key) or self.entries.get(self.aliases.get(key, ""))
            if clash is not None:
                raise DuplicateNameError(
                    f"{self.kind} name '{key}' registered by both {clash.owner} and {owner}; "
                    f"uninstall one of them or disable it with Q_LOAD_PLUGINS"
                )
        self.entries[name] = Entry(obj, owner, tuple(map(normalize_name, aliases)))
        for alias in aliases:
            self.aliases[normalize_name(alias)] = name

    def resolve(self, name: str) -> str:
        key = normalize_name(name)
        key = self.aliases.get(key, key)
        if key not in self.entries:
            raise UnknownNameError(self.kind, name, self.names())
        return key

    def get(self, name: str) -> T:
        return self.entries[self.resolve(name)].obj

    def owner(self, name: str) -> str:
        return self.entries[self.resolve(name)].owner

    def names(self) -> list[str]:
        return sorted(self.entries)

    def __contains__(self, name: str) -> bool:
        key = normalize_name(name)
        return self.aliases.get(key, key) in self.entries

    def __iter__(self) -> Iterator[tuple[str, Entry[T]]]:
        return iter(sorted(self.entries.items()))


@dataclass
class Registries:
    schemes: Registry
    formats: Registry
    engines: Registry

    @classmethod
    def from_pm(cls, pm) -> "Registries":
        """Ask every plugin to register; owners are the plugin names pluggy knows."""
        regs = cls(Registry("scheme"), Registry("format"), Registry("engine"))
        for hook_name, registry in (
            ("register_schemes", regs.schemes),
            ("register_formats", regs.formats),
            ("register_engines", regs.engines),
        ):
            for impl in getattr(pm.hook, hook_name).get_hookimpls():
                owner = pm.get_name(impl.plugin) or repr(impl.plugin)

                def register(obj, aliases=(), _owner=owner, _registry=registry):
                    _registry.add(obj, _owner, aliases)

                try:
                    impl.function(register=register)
                except QError:
                    raise
                except Exception as exc:  # a plugin's own bug must name the plugin
                    raise PluginLoadError(
                        f"plugin '{owner}' failed in {hook_name}: {type(exc).__name__}: {exc}. "
                        "Fix or uninstall it, or skip it with Q_LOAD_PLUGINS"
                    ) from exc
        return regs
