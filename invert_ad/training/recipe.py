"""The main job: a folder of normal images in, a saved, calibrated :class:`AnomalyDetector` out.

Steps: index the data, extract backbone features once (cached on disk), hold out a share of the normal
images, standardise the features per channel, build (fit or train) the denoiser, fit the scorer's
normalisation and the thresholds on the held-out normal images, save everything. No test image is touched.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler

from ..data import FeatureCache, FolderDataset, ImageDataset, MVTecDataset, cached_features
from ..defaults import DEFAULT_BACKBONE, DEFAULT_DENOISER
from ..features import create_feature_extractor
from ..models import create_denoiser
from ..pipeline import AnomalyDetector, channel_statistics
from ..schedule import alphas_cumprod_of
from ..scorer import InversionScorer
from .config import TrainingConfig
from .diagnostics import diagnose_training
from .loop import init_distributed_from_env, train_denoiser

__all__ = [
    "DEFAULT_BACKBONE",
    "DEFAULT_DENOISER",
    "TrainSummary",
    "default_cache_dir",
    "open_dataset",
    "train_detector",
]

logger = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """``$INVERT_AD_CACHE`` or ``~/.cache/invert_ad``: where features are cached between runs."""
    return Path(os.environ.get("INVERT_AD_CACHE", Path.home() / ".cache" / "invert_ad")) / "features"


def open_dataset(data: str | os.PathLike | ImageDataset, split: str, image_size: int) -> ImageDataset:
    """An MVTec-layout category folder (``train/good`` inside) or a plain folder of normal images."""
    if isinstance(data, ImageDataset):
        return data
    root = Path(data)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")
    if (root / "train").is_dir() or (root / "test").is_dir():
        return MVTecDataset(root, split=split, image_size=image_size, skip_bad=True)
    if split != "train":
        raise ValueError(f"{root} is a plain folder of normal images: it has no {split!r} split")
    return FolderDataset(root, image_size=image_size, skip_bad=True)


@dataclass
class TrainSummary:
    """What :func:`train_detector` did.

    Attributes:
        detector: the calibrated detector (also saved in ``out_dir``).
        out_dir: the model folder.
        num_train: images the denoiser learned from.
        num_holdout: normal images held out for calibration.
        steps: optimiser steps (0 for a fitted-only denoiser).
        seconds: wall time of the denoiser's training.
        final_loss: mean loss of the last 20 steps (``None`` when nothing was trained).
    """

    detector: AnomalyDetector
    out_dir: Path
    num_train: int
    num_holdout: int
    steps: int
    seconds: float
    final_loss: float | None
    info: dict[str, Any] = field(default_factory=dict)


def _split(n: int, holdout_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if n < 4:
        raise ValueError(f"need at least 4 normal training images, found {n}")
    holdout = min(n - 2, max(2, round(holdout_fraction * n)))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[holdout:].sort().values, order[:holdout].sort().values


def train_detector(
    data: str | os.PathLike | ImageDataset,
    out_dir: str | os.PathLike,
    *,
    backbone: str = DEFAULT_BACKBONE,
    denoiser: str = DEFAULT_DENOISER,
    denoiser_overrides: dict[str, Any] | None = None,
    timesteps: Any = "paper",
    scoring: str = "hybrid",
    training: TrainingConfig | None = None,
    holdout_fraction: float = 0.1,
    fpr: float = 0.01,
    image_size: int = 256,
    cache_dir: str | os.PathLike | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> TrainSummary:
    """Train and save a detector from normal images.

    Args:
        data: an MVTec-layout category folder, a plain folder of normal images, or a dataset.
        out_dir: the model folder to write (replaced atomically when done).
        backbone: a feature extractor name (:func:`invert_ad.features.list_feature_extractors`).
        denoiser: a denoiser preset (:func:`invert_ad.models.list_denoisers`).
        denoiser_overrides: constructor arguments for the preset.
        timesteps, scoring: the :class:`InversionScorer` settings.
        training: the optimisation recipe (time or step budget).
        holdout_fraction: share of the normal images kept out of training for calibration.
        fpr: false-positive rate on normal images that sets the thresholds.
        image_size: images are resized to this square size.
        cache_dir: feature cache (default :func:`default_cache_dir`); ``None`` there means the default.
        device: where the backbone and the denoiser run.
        progress: progress bars.

    Returns:
        A :class:`TrainSummary`.
    """
    out_dir = Path(out_dir)
    training = training or TrainingConfig()
    rank, world = init_distributed_from_env()  # under torchrun: every process trains its share of each batch
    if world > 1 and device == "cuda":
        device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"  # one GPU per process
    extractor = create_feature_extractor(backbone, image_size=image_size).to(device)
    dataset = open_dataset(data, "train", extractor.image_size)
    cache = FeatureCache(cache_dir or default_cache_dir())
    raw, paths = cached_features(extractor, dataset, cache, progress=progress)
    train_idx, holdout_idx = _split(len(paths), holdout_fraction, training.seed)
    mean, std = channel_statistics(raw[train_idx])
    features = (raw - mean.reshape(1, -1, 1, 1)) / std.reshape(1, -1, 1, 1)
    train_features, holdout_features = features[train_idx], features[holdout_idx]

    overrides = dict(denoiser_overrides or {})
    if denoiser.startswith("gaussian"):
        overrides.setdefault("features", train_features)
    with torch.random.fork_rng(devices=[]):  # initial weights follow training.seed; the global RNG is restored
        torch.manual_seed(training.seed)
        model = create_denoiser(
            denoiser, in_channels=features.shape[1], grid_size=tuple(features.shape[2:]), **overrides
        )
    model = model.to(device)
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", clip_sample=False
    )
    steps, seconds, final_loss = 0, 0.0, None
    if any(p.requires_grad for p in model.parameters()):
        checkpoint_dir = out_dir.with_name(out_dir.name + ".checkpoint")
        result = train_denoiser(
            model, train_features, alphas_cumprod_of(scheduler), training, checkpoint_dir, progress=progress
        )
        model, steps, seconds = result.model, result.steps, result.seconds
        final_loss = sum(result.losses[-20:]) / max(1, len(result.losses[-20:])) if result.losses else None
    model = model.eval().requires_grad_(False)
    diagnostics = diagnose_training(  # per-t eps-MSE, latents, scale ratio: the verdict of the card and the CLI
        model,
        train_features,
        holdout_features.to(device),
        alphas_cumprod_of(scheduler),
        grid=timesteps,
        trained=steps > 0,
    )
    if world > 1:
        torch.distributed.barrier()

    scorer = InversionScorer(model, scheduler, timesteps=timesteps, scoring=scoring)
    scorer.fit(holdout_features.to(device))
    detector = AnomalyDetector(extractor, scorer, feature_mean=mean, feature_std=std)
    detector.fit_calibration(normal_features=holdout_features.to(device), fpr=fpr)
    info = {
        "data": str(data) if not isinstance(data, ImageDataset) else repr(data),
        "backbone": backbone,
        "denoiser": denoiser,
        "num_train": len(train_idx),
        "num_holdout": len(holdout_idx),
        "steps": steps,
        "train_seconds": round(seconds, 1),
        "final_loss": final_loss,
        "training": training.to_dict(),
        "verdict": diagnostics["verdict"],
        "diagnostics": diagnostics,
    }
    card_training = ", ".join(f"{k}: {v}" for k, v in info.items() if k not in ("training", "diagnostics"))
    if rank == 0:  # one writer; the other processes hold the same weights
        detector.save_pretrained(out_dir, model_card={"dataset": info["data"], "training": card_training})
        if steps:
            shutil.rmtree(out_dir.with_name(out_dir.name + ".checkpoint"), ignore_errors=True)
        logger.info("saved detector to %s", out_dir)
    return TrainSummary(detector, out_dir, len(train_idx), len(holdout_idx), steps, seconds, final_loss, info)
