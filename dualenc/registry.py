"""Name -> object registries, so configs can pick towers, losses, plugins and data sources by name."""

from __future__ import annotations

import difflib
from typing import Any, Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A named table. Registering a name twice, or asking for an unknown one, fails loudly."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None, *, aliases: tuple[str, ...] = ()) -> Any:
        """Register ``obj`` under ``name`` (and aliases); usable as a decorator when ``obj`` is None."""

        def add(o: T) -> T:
            for n in (name, *aliases):
                if n in self._items:
                    raise KeyError(f"{self.kind} {n!r} is already registered (by {self._items[n]!r})")
                self._items[n] = o
            return o

        return add if obj is None else add(obj)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._items, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise KeyError(
                f"unknown {self.kind} {name!r}.{hint} Known: {', '.join(sorted(self._items))}"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def names(self) -> list[str]:
        return sorted(self._items)


def closest(name: str, known: list[str] | Callable[[], list[str]], n: int = 5) -> list[str]:
    """Closest names to ``name`` among ``known``, for error messages."""
    pool = known() if callable(known) else known
    return difflib.get_close_matches(name, pool, n=n, cutoff=0.4)
