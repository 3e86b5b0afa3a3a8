"""One registry of named factories, shared by scorers, feature extractors, denoisers and adapters (timm-style)."""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable
from typing import Any

__all__ = ["Registry"]


class Registry:
    """Factories by name.

    Args:
        kind: what is registered, for messages (``"denoiser preset"``, ``"scoring"``, ...).
        hint: appended to the unknown-name error (e.g. ``"or pass a Scorer instance"``).
    """

    def __init__(self, kind: str, hint: str = "") -> None:
        self.kind = kind
        self.hint = hint
        self.factories: dict[str, Callable[..., Any]] = {}

    def register(self, name: str, factory: Callable[..., Any] | None = None) -> Any:
        """Register ``factory`` under ``name`` (without it: a decorator); a name given again warns and is replaced."""

        def add(f: Callable[..., Any]) -> Callable[..., Any]:
            if name in self.factories:
                warnings.warn(
                    f"{self.kind} {name!r} is registered again; the new factory replaces the old", stacklevel=3
                )
            self.factories[name] = f
            return f

        return add(factory) if factory is not None else add

    def names(self, pattern: str = "*") -> list[str]:
        """Registered names matching a glob ``pattern``, sorted."""
        return sorted(n for n in self.factories if fnmatch.fnmatch(n, pattern))

    def create(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Call the factory registered as ``name``.

        Raises:
            ValueError: unknown name (the message lists the registered ones).
        """
        if name not in self.factories:
            hint = f" {self.hint}" if self.hint else ""
            raise ValueError(f"unknown {self.kind} {name!r}; choose one of {self.names()}{hint}")
        return self.factories[name](*args, **kwargs)
