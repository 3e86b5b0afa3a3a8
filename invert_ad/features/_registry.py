"""Feature extractors by name: ``register_feature_extractor``, ``create_feature_extractor``, ``list_...``."""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["create_feature_extractor", "list_feature_extractors", "register_feature_extractor"]

_EXTRACTORS: dict[str, Callable[..., nn.Module]] = {}


def register_feature_extractor(name: str, factory: Callable[..., nn.Module] | None = None):
    """Register ``factory`` (a function or class returning a feature extractor) under ``name``.

    Usable as ``register_feature_extractor("mine", build_mine)`` or as a decorator
    ``@register_feature_extractor("mine")``. Re-registering a name warns and replaces it.
    """

    def add(f: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _EXTRACTORS:
            warnings.warn(
                f"feature extractor {name!r} is registered again; the new factory replaces the old", stacklevel=3
            )
        _EXTRACTORS[name] = f
        return f

    return add(factory) if factory is not None else add


def list_feature_extractors(pattern: str = "*") -> list[str]:
    """Registered feature extractor names matching a glob ``pattern``, sorted."""
    return sorted(n for n in _EXTRACTORS if fnmatch.fnmatch(n, pattern))


def create_feature_extractor(name: str, **kwargs: Any) -> nn.Module:
    """Build the feature extractor registered as ``name`` with ``kwargs``.

    ``create_feature_extractor(**extractor.get_config())`` rebuilds a saved extractor.

    Raises:
        ValueError: unknown name (the message lists the registered ones).
    """
    if name not in _EXTRACTORS:
        raise ValueError(f"unknown feature extractor {name!r}; choose one of {list_feature_extractors()}")
    return _EXTRACTORS[name](**kwargs)
