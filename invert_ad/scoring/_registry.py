"""Scorers by name: ``register_scorer``, ``create_scorer``, ``list_scorers``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..registry import Registry
from .base import Scorer

__all__ = ["create_scorer", "list_scorers", "register_scorer", "scorer_class"]

_SCORERS = Registry("scoring", "or pass a Scorer instance")


def register_scorer(name: str, factory: Callable[..., Scorer] | None = None) -> Any:
    """Register ``factory`` (a scorer class or function returning one) under ``name``.

    Usable as ``register_scorer("nll", NLLScorer)`` or as a decorator ``@register_scorer("nll")``.
    Re-registering a name warns and replaces it.
    """
    return _SCORERS.register(name, factory)


def list_scorers(pattern: str = "*") -> list[str]:
    """Registered scorer names matching a glob ``pattern``, sorted."""
    return _SCORERS.names(pattern)


def create_scorer(name: str, **kwargs: Any) -> Scorer:
    """Build the scorer registered as ``name`` with ``kwargs``.

    Raises:
        ValueError: unknown name (the message lists the registered ones).
    """
    return _SCORERS.create(name, **kwargs)


def scorer_class(class_name: str) -> type[Scorer]:
    """The registered scorer class called ``class_name`` (for rebuilding a saved scorer).

    Only classes behind registered names qualify, so a saved config can never name arbitrary code.

    Raises:
        ValueError: no registered scorer has that class.
    """
    for factory in _SCORERS.factories.values():
        cls = getattr(factory, "func", factory)
        if isinstance(cls, type) and issubclass(cls, Scorer) and cls.__name__ == class_name:
            return cls
    raise ValueError(f"scorer class {class_name!r} is not registered; register it with register_scorer first")
