"""Adapters by name: ``register_adapter``, ``create_adapter``, ``list_adapters``."""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from .base import DiffusionAdapter

__all__ = ["create_adapter", "list_adapters", "register_adapter"]

_ADAPTERS: dict[str, Callable[..., DiffusionAdapter]] = {}
_F = TypeVar("_F", bound=Callable[..., Any])


def register_adapter(name: str) -> Callable[[_F], _F]:
    """Class decorator registering an adapter under ``name``; registering a name again warns and replaces it."""

    def add(factory: _F) -> _F:
        if name in _ADAPTERS:
            warnings.warn(f"adapter {name!r} is registered again; the new factory replaces the old", stacklevel=2)
        _ADAPTERS[name] = factory
        return factory

    return add


def list_adapters(pattern: str = "*") -> list[str]:
    """Registered adapter names matching a glob ``pattern``, sorted."""
    return sorted(n for n in _ADAPTERS if fnmatch.fnmatch(n, pattern))


def create_adapter(name: str, *args: Any, **kwargs: Any) -> DiffusionAdapter:
    """Build the adapter registered as ``name``, e.g. ``create_adapter("ddad", unet)``.

    Raises:
        ValueError: unknown name (the message lists the registered ones).
    """
    if name not in _ADAPTERS:
        raise ValueError(f"unknown adapter {name!r}; choose one of {list_adapters()}")
    return _ADAPTERS[name](*args, **kwargs)
