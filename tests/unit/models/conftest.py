"""Tiny configurations of every denoiser preset, for fast tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from diffusers import ModelMixin

from invert_ad.models import create_denoiser

CHANNELS = 8
GRID = (4, 4)

TINY_OVERRIDES: dict[str, dict[str, Any]] = {
    "dit-s": {"hidden_size": 32, "depth": 2, "num_heads": 2},
    "dit-b": {"hidden_size": 32, "depth": 1, "num_heads": 4},
    "dit-g": {"hidden_size": 64, "depth": 1, "num_heads": 8},
    "mlp": {"hidden_size": 32, "depth": 2},
    "conv": {"width": 32, "depth": 2, "num_groups": 8},
    "gaussian": {},
    "gaussian-residual-dit": {"residual_config": {"hidden_size": 32, "depth": 1, "num_heads": 2}},
    "gaussian-residual-dit-s": {"residual_config": {"hidden_size": 32, "depth": 1, "num_heads": 2}},
    "gaussian-residual-mlp": {"residual_config": {"hidden_size": 32, "depth": 1, "position_embedding": True}},
    "gaussian-residual-conv": {"residual_config": {"width": 16, "depth": 1, "num_groups": 4}},
    "gaussian-shared": {},
    "gaussian-window": {"window": 3},
    "gaussian-mixture": {"num_components": 2},
}
TINY_OVERRIDES.update({f"{name}-edm": TINY_OVERRIDES[name] for name in list(TINY_OVERRIDES) if "residual" in name})
TINY_OVERRIDES.update(
    {f"{name}-{form}": TINY_OVERRIDES[name] for name in ("dit-s", "mlp", "conv") for form in ("skip", "edm")}
)


@pytest.fixture
def train_features() -> torch.Tensor:
    """``(64, 8, 4, 4)`` correlated, position-dependent features."""
    g = torch.Generator().manual_seed(0)
    mixing = torch.randn(CHANNELS, CHANNELS, generator=g) / CHANNELS**0.5
    base = torch.randn(64, CHANNELS, *GRID, generator=g)
    offset = torch.linspace(-1, 1, GRID[0] * GRID[1]).reshape(1, 1, *GRID)
    return torch.einsum("dc,nchw->ndhw", mixing, base) + offset


@pytest.fixture
def make_tiny(train_features: torch.Tensor) -> Callable[[str], ModelMixin]:
    """Build a preset with tiny sizes (fitted on ``train_features`` where it needs data)."""

    def make(preset: str) -> ModelMixin:
        overrides = dict(TINY_OVERRIDES[preset])
        if preset.startswith("gaussian"):
            overrides["features"] = train_features
        return create_denoiser(preset, CHANNELS, GRID, **overrides)

    return make


@pytest.fixture
def randomize() -> Callable[[ModelMixin], ModelMixin]:
    """Overwrite every parameter with small random values in place, so zero-initialised layers act."""

    def randomize_(model: ModelMixin) -> ModelMixin:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        return model

    return randomize_
