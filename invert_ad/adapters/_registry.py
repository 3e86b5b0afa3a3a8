"""Adapters by name: ``register_adapter``, ``create_adapter``, ``list_adapters``."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from ..registry import Registry

if TYPE_CHECKING:
    from .base import DiffusionAdapter

__all__ = ["create_adapter", "list_adapters", "register_adapter"]

_ADAPTERS = Registry("adapter")
_F = TypeVar("_F", bound=Callable[..., Any])


def register_adapter(name: str) -> Callable[[_F], _F]:
    """Class decorator registering an adapter under ``name``; registering a name again warns and replaces it."""
    return _ADAPTERS.register(name)


def list_adapters(pattern: str = "*") -> list[str]:
    """Registered adapter names matching a glob ``pattern``, sorted."""
    return _ADAPTERS.names(pattern)


def create_adapter(name: str, *args: Any, **kwargs: Any) -> DiffusionAdapter:
    """Build the adapter registered as ``name``, e.g. ``create_adapter("ddad", unet)``.

    Raises:
        ValueError: unknown name (the message lists the registered ones).
    """
    return _ADAPTERS.create(name, *args, **kwargs)
