"""Wrapping third-party functions where they offer no hook: applied once, undone together."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Callable

Wrap = Callable[[Callable[..., Any]], Callable[..., Any]]


class Patches:
    """The functions one module wraps. Each wrapper sets ``__wrapped__`` to the original."""

    def __init__(self) -> None:
        # (class, name) -> the class's own attribute, or None when it was inherited.
        self._originals: dict[tuple[type, str], Any] = {}

    def apply(self, targets: Iterable[tuple[type, str, Wrap]]) -> None:
        """Wrap each ``class.name`` with ``wrap``; a function already wrapped is left as is."""
        for cls, name, wrap in targets:
            if (cls, name) not in self._originals:
                self._originals[(cls, name)] = cls.__dict__.get(name)
                setattr(cls, name, wrap(getattr(cls, name)))

    def undo(self) -> None:
        """Put every original back (delete the wrapper where the function was inherited)."""
        for (cls, name), original in self._originals.items():
            if original is None:
                delattr(cls, name)
            else:
                setattr(cls, name, original)
        self._originals.clear()

    def __bool__(self) -> bool:
        return bool(self._originals)
