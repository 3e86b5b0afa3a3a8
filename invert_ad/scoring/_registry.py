"""Scorers by name: ``register_scorer``, ``create_scorer``, ``list_scorers``."""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable
from typing import Any

from .base import Scorer

__all__ = ["create_scorer", "list_scorers", "register_scorer", "scorer_class"]

_SCORERS: dict[str, Callable[..., Scorer]] = {}


def register_scorer(name: str, factory: Callable[..., Scorer] | None = None):
    """Register ``factory`` (a scorer class or function returning one) under ``name``.

    Usable as ``register_scorer("nll", NLLScorer)`` or as a decorator ``@register_scorer("nll")``.
    Re-registering a name warns and replaces it.
    """

    def add(f: Callable[..., Scorer]) -> Callable[..., Scorer]:
        if name in _SCORERS:
            warnings.warn(f"scorer {name!r} is registered again; the new factory replaces the old", stacklevel=3)
        _SCORERS[name] = f
        return f

    return add(factory) if factory is not None else add


def list_scorers(pattern: str = "*") -> list[str]:
    """Registered scorer names matching a glob ``pattern``, sorted."""
    return sorted(n for n in _SCORERS if fnmatch.fnmatch(n, pattern))


def create_scorer(name: str, **kwargs: Any) -> Scorer:
    """Build the scorer registered as ``name`` with ``kwargs``.

    Raises:
        ValueError: unknown name (the message lists the registered ones).
    """
    if name not in _SCORERS:
        raise ValueError(f"unknown scoring {name!r}; choose one of {list_scorers()} or pass a Scorer instance")
    return _SCORERS[name](**kwargs)


def scorer_class(class_name: str) -> type[Scorer]:
    """The registered scorer class called ``class_name`` (for rebuilding a saved scorer).

    Only classes behind registered names qualify, so a saved config can never name arbitrary code.

    Raises:
        ValueError: no registered scorer has that class.
    """
    for factory in _SCORERS.values():
        cls = getattr(factory, "func", factory)
        if isinstance(cls, type) and issubclass(cls, Scorer) and cls.__name__ == class_name:
            return cls
    raise ValueError(f"scorer class {class_name!r} is not registered; register it with register_scorer first")
