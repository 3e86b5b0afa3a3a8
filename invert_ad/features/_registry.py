"""Feature extractors by name: ``register_feature_extractor``, ``create_feature_extractor``, ``list_...``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ..registry import Registry

__all__ = ["create_feature_extractor", "list_feature_extractors", "register_feature_extractor"]

_EXTRACTORS = Registry("feature extractor")


def register_feature_extractor(name: str, factory: Callable[..., nn.Module] | None = None) -> Any:
    """Register ``factory`` (a function or class returning a feature extractor) under ``name``.

    Usable as ``register_feature_extractor("mine", build_mine)`` or as a decorator
    ``@register_feature_extractor("mine")``. Re-registering a name warns and replaces it.
    """
    return _EXTRACTORS.register(name, factory)


def list_feature_extractors(pattern: str = "*") -> list[str]:
    """Registered feature extractor names matching a glob ``pattern``, sorted."""
    return _EXTRACTORS.names(pattern)


def create_feature_extractor(name: str, **kwargs: Any) -> nn.Module:
    """Build the feature extractor registered as ``name`` with ``kwargs``.

    ``create_feature_extractor(**extractor.get_config())`` rebuilds a saved extractor.

    Raises:
        ValueError: unknown name (the message lists the registered ones).
    """
    return _EXTRACTORS.create(name, **kwargs)
