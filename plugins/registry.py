"""Registries for plugins and targets, extended lazily by Python entry points of third-party packages.

A package adds its own plugin with, in its pyproject.toml::

    [project.entry-points."dualenc.plugins"]
    my_map = "my_pkg.maps:MyMap"

The entry point is only imported when its name is looked up (or listed with ``names()``: listing
reads the names without importing anything).
"""

from __future__ import annotations

import difflib
import importlib.metadata
import inspect
from typing import Any, TypeVar

from dualenc.registry import Registry

T = TypeVar("T")

PLUGIN_GROUP = "dualenc.plugins"
TARGET_GROUP = "dualenc.targets"


class EntryPointRegistry(Registry[T]):
    """A ``Registry`` whose misses fall back to the entry points of ``group``.

    Built-in names win over an entry point of the same name (a third party cannot shadow them).
    """

    def __init__(self, kind: str, group: str) -> None:
        super().__init__(kind)
        self.group = group

    def _entry_points(self) -> dict[str, Any]:
        # Read on every miss (cheap): packages installed after import are still found.
        return {ep.name: ep for ep in importlib.metadata.entry_points(group=self.group)}

    def get(self, name: str) -> T:
        if name not in self._items:
            ep = self._entry_points().get(name)
            if ep is not None:
                try:
                    obj = ep.load()
                except Exception as e:  # a broken third-party package: say which one
                    raise ImportError(f"{self.kind} {name!r} (entry point {getattr(ep, 'value', ep)!r} in group "
                                      f"{self.group!r}) failed to import: {e}") from e
                self.register(name, obj)
        if name not in self._items:
            known = self.names()
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise KeyError(f"unknown {self.kind} {name!r}.{hint} Known: {', '.join(known) or 'none'} "
                           f"(third parties add more through the {self.group!r} entry-point group)")
        return self._items[name]

    def __contains__(self, name: object) -> bool:
        return name in self._items or name in self._entry_points()

    def names(self) -> list[str]:
        return sorted(set(self._items) | set(self._entry_points()))

    def __iter__(self):  # type: ignore[override]
        return iter(self.names())

    def build(self, name: str, kwargs: dict[str, Any] | None = None) -> Any:
        """Look up ``name`` and call it with ``kwargs``; a misspelt argument fails listing the valid ones."""
        return call_checked(self.get(name), kwargs or {}, f"{self.kind} {name!r}")


def call_checked(factory: Any, kwargs: dict[str, Any], what: str) -> Any:
    """``factory(**kwargs)``, but unknown or missing arguments raise a ``TypeError`` naming the valid ones."""
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):  # builtins without a signature: just call
        return factory(**kwargs)
    try:
        sig.bind(**kwargs)
    except TypeError as e:
        params = [p for p in sig.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        bad = [k for k in kwargs if k not in sig.parameters]
        hints = [f"{k!r} (did you mean {difflib.get_close_matches(k, [p.name for p in params], n=1)[0]!r}?)"
                 if difflib.get_close_matches(k, [p.name for p in params], n=1) else repr(k) for k in bad]
        detail = f"unknown argument(s) {', '.join(hints)}" if bad else str(e)
        raise TypeError(f"{what}: {detail}. Valid arguments: {', '.join(p.name for p in params)}") from None
    return factory(**kwargs)


PLUGINS: EntryPointRegistry[Any] = EntryPointRegistry("plugin", PLUGIN_GROUP)
TARGETS: EntryPointRegistry[Any] = EntryPointRegistry("target", TARGET_GROUP)
