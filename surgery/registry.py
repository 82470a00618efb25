"""A small name -> object registry (in the spirit of fvcore's ``Registry``) whose unknown-name error
lists what is available and suggests the closest name."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


def close_matches(name: object, choices: Iterable[str], n: int = 1, cutoff: float = 0.6) -> list[str]:
    """The ``n`` choices closest to ``name`` (``difflib``), best first; the one did-you-mean rule."""
    return difflib.get_close_matches(str(name), list(choices), n=n, cutoff=cutoff)


def did_you_mean(name: object, choices: Iterable[str], cutoff: float = 0.6) -> str:
    """`` (did you mean 'x'?)`` for the closest choice, or ``""``."""
    close = close_matches(name, choices, 1, cutoff)
    return f" (did you mean {close[0]!r}?)" if close else ""


class Registry(Generic[T]):
    """Objects registered under unique names, in registration order.

    ``what`` names the kind of thing in error messages ("ranking method"); ``error`` is the
    exception type raised for an unknown or duplicate name; ``hint`` is appended to the
    unknown-name message (e.g. where else to look).
    """

    def __init__(self, what: str, error: type[Exception] = KeyError, hint: str = "") -> None:
        self.what = what
        self.error = error
        self.hint = hint
        self._items: dict[str, T] = {}

    def add(self, name: str, obj: T) -> T:
        if name in self._items:
            raise self.error(f"{self.what} {name!r} is already registered")
        self._items[name] = obj
        return obj

    def register(self, name: str, make: Callable[[Callable], T] | None = None) -> Callable[[Callable], Callable]:
        """Decorator: ``@REG.register("name")`` adds the decorated function (or ``make(fn)``, e.g. a
        record wrapping it) and returns the function unchanged."""

        def deco(fn: Callable) -> Callable:
            self.add(name, make(fn) if make is not None else fn)  # type: ignore[arg-type]
            return fn

        return deco

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise self.error(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        """``unknown <what> 'x': choose one of a, b, c (did you mean 'b'?) <hint>``."""
        suggestion = did_you_mean(name, self._items)
        hint = f" {self.hint}" if self.hint else ""
        return f"unknown {self.what} {name!r}: choose one of {', '.join(self._items)}{suggestion}{hint}"

    def names(self) -> list[str]:
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.what!r}: {', '.join(self._items)})"
