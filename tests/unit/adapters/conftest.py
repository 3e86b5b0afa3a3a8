"""Fixtures: tiny networks with the retrofitted detectors' classes (built in ``adapter_nets``)."""

from __future__ import annotations

import pytest
import torch
from adapter_nets import make_diad_parts, make_pixel_unet
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel, UNet2DModel


@pytest.fixture
def pixel_unet() -> UNet2DModel:
    return make_pixel_unet(0)


@pytest.fixture(scope="module")
def diad_parts() -> tuple[UNet2DConditionModel, ControlNetModel, AutoencoderKL, torch.Tensor]:
    return make_diad_parts()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The networks here are tiny: intra-op threads only add synchronisation (badly so on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
