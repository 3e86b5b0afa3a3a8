"""Benchmark configurations build what their names and notes say (a name like ``residual-conv-256x4`` once built
the 128 x 2 network and published its rows under the wrong name)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))

from common import DENOISER_CONFIGS

from invert_ad.models import create_denoiser

SIZED = {name: c for name, c in DENOISER_CONFIGS.items() if re.search(r"\d+x\d+$", name) or "dit-s" in name}


@pytest.mark.parametrize("name", sorted(SIZED))
def test_config_builds_its_named_size(name):
    config = DENOISER_CONFIGS[name]
    overrides = dict(config.overrides)
    if config.preset.startswith("gaussian"):
        overrides["features"] = torch.randn(8, 8, 4, 4)
    model = create_denoiser(config.preset, in_channels=8, grid_size=4, **overrides)
    network = getattr(model, "residual", model).config
    if match := re.search(r"(\d+)x(\d+)$", name):
        width, depth = map(int, match.groups())
        assert (network.get("width", network.get("hidden_size")), network["depth"]) == (width, depth)
    else:  # dit-s size: hidden 256, depth 4, 4 heads (the DiT paper's S)
        assert (network["hidden_size"], network["depth"], network["num_heads"]) == (256, 4, 4)
