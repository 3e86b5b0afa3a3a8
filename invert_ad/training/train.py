"""The main job: a folder of normal images in, a saved, calibrated :class:`AnomalyDetector` out.

Steps: index the data, extract backbone features once (cached on disk), standardise them per channel, build
(fit or train) the denoiser, then :meth:`AnomalyDetector.fit` fits the latent statistic and the thresholds on
normal images the denoiser did not see: out of fold for a refittable denoiser (the Gaussian: every training
image is scored by a Gaussian fitted without it), on a held-out share for a trained one. No test image is
touched.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import DDPMScheduler

from ..data import (
    FeatureCache,
    ImageDataset,
    cached_features,
    category_folders,
    default_cache_dir,
    open_dataset,
)
from ..defaults import DEFAULT_BACKBONE, DEFAULT_DENOISER, DEFAULT_MAP_PRIOR, DEFAULT_TIMESTEPS
from ..detector import CONFIG_NAME, AnomalyDetector, channel_statistics
from ..features import create_feature_extractor
from ..io import check_replaceable
from ..models import create_denoiser
from ..routing import RoutedDetector
from ..schedule import alphas_cumprod_of
from ..scorer import InversionScorer
from ..scoring import MahalanobisMap
from .config import TrainingConfig
from .diagnostics import diagnose_training
from .loop import init_distributed_from_env, train_denoiser

__all__ = ["FITTED_PRESETS", "TrainSummary", "holdout_split", "train_detector"]

FITTED_PRESETS = ("gaussian", "gaussian-mixture")
"""Denoisers fitted in closed form (refittable): every training image is scored out of fold."""

logger = logging.getLogger(__name__)


@dataclass
class TrainSummary:
    """What :func:`train_detector` did.

    Attributes:
        detector: the calibrated detector (also saved in ``out_dir``).
        out_dir: the model folder.
        num_train: images the denoiser learned from (or was fitted on).
        num_calibration: normal images whose scores set the thresholds (all of them when out of fold).
        steps: optimiser steps (0 for a fitted-only denoiser).
        seconds: wall time of the denoiser's training or fit.
        final_loss: mean loss of the last 20 steps (``None`` when nothing was trained).
        info: the JSON-ready record saved in the model card.
    """

    detector: AnomalyDetector
    out_dir: Path
    num_train: int
    num_calibration: int
    steps: int
    seconds: float
    final_loss: float | None
    info: dict[str, Any] = field(default_factory=dict)


def holdout_split(n: int, holdout_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded split of ``n`` normal images into sorted train and held-out indices (at least 2 in each).

    Raises:
        ValueError: fewer than 4 images.
    """
    if n < 4:
        raise ValueError(f"need at least 4 normal training images, found {n}")
    holdout = min(n - 2, max(2, round(holdout_fraction * n)))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[holdout:].sort().values, order[:holdout].sort().values


def default_scheduler() -> DDPMScheduler:
    """The paper's schedule: linear betas 1e-4 .. 0.02 over T = 1000, no clipping."""
    return DDPMScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", clip_sample=False
    )


def train_detector(
    data: str | os.PathLike | ImageDataset | Sequence[str | os.PathLike | ImageDataset],
    out_dir: str | os.PathLike,
    *,
    backbone: str = DEFAULT_BACKBONE,
    denoiser: str = DEFAULT_DENOISER,
    denoiser_overrides: dict[str, Any] | None = None,
    timesteps: Any = DEFAULT_TIMESTEPS,
    scoring: str = "hybrid",
    training: TrainingConfig | None = None,
    scheduler: Any | None = None,
    holdout_fraction: float = 0.1,
    folds: int | None = 5,
    fpr: float = 0.01,
    image_size: int = 256,
    cache_dir: str | os.PathLike | None = None,
    device: str = "cpu",
    progress: bool = True,
    grid: int = 16,
    map_prior: str | None = DEFAULT_MAP_PRIOR,
    map_pool: int = 1,
    unified: Literal["routed", "joint"] = "routed",
) -> TrainSummary:
    """Train and save a detector from normal images.

    Args:
        data: an MVTec-layout category folder, a plain folder of normal images, a dataset, or several of these:
            one detector for all of them (the unified setting, no category needed at test time; see ``unified``).
            A dataset root (category folders inside, :func:`~invert_ad.data.category_folders`) stands for all
            its categories.
        out_dir: the model folder to write (replaced atomically when done).
        backbone: a feature extractor name (:func:`invert_ad.features.list_feature_extractors`).
        denoiser: a denoiser preset (:func:`invert_ad.models.list_denoisers`).
        denoiser_overrides: constructor arguments for the preset.
        timesteps, scoring: the :class:`InversionScorer` settings (default grid :data:`~invert_ad.defaults.
            DEFAULT_TIMESTEPS`).
        training: the optimisation recipe (time or step budget).
        scheduler: a diffusers scheduler carrying the schedule (default :func:`default_scheduler`); a Gaussian
            denoiser's closed form uses its betas.
        holdout_fraction: share of the normal images kept out of a trained denoiser's training for calibration
            (a fitted-only denoiser uses every image, scored out of fold).
        folds: folds of the out-of-fold scores (see :meth:`AnomalyDetector.fit`).
        fpr: false-positive rate on normal images that sets the thresholds.
        image_size: images are resized to this square size.
        cache_dir: feature cache (default :func:`default_cache_dir`); ``None`` there means the default.
        device: where the backbone and the denoiser run.
        progress: progress bars.
        grid: side of the feature grid every backbone stage is resized to (16: stride 16 at 256 px; 32: stride 8).
        map_prior: form the anomaly maps from a :class:`~invert_ad.scoring.MahalanobisMap` with this prior
            (``shared``, the default, ``position`` or ``window``), fitted on the training features; ``None``: the
            latent's map.
        map_pool: local averaging window of that map statistic (1: none).
        unified: with several ``data``: ``routed`` trains one detector per category (each with its own
            standardisation, denoiser and thresholds) behind a router that picks one per image
            (:class:`~invert_ad.routing.RoutedDetector`); ``joint`` trains one denoiser on the union, standardised
            together, with thresholds pooled over every category (``gaussian-mixture`` then fits one Gaussian per
            category).

    Returns:
        A :class:`TrainSummary`.
    """
    out_dir = Path(out_dir)
    given = list(data) if isinstance(data, list | tuple) else [data]
    sources = [c for d in given for c in (category_folders(d) if isinstance(d, str | os.PathLike) else [d])]
    if not sources:
        raise ValueError("no training data given")
    check_replaceable(out_dir, CONFIG_NAME)  # before any work: never train for minutes to then refuse to save
    if unified not in ("routed", "joint"):
        raise ValueError(f"unified must be 'routed' or 'joint', got {unified!r}")
    if len(sources) > 1 and unified == "routed":
        settings = {
            "backbone": backbone,
            "denoiser": denoiser,
            "denoiser_overrides": denoiser_overrides,
            "timesteps": timesteps,
            "scoring": scoring,
            "training": training,
            "scheduler": scheduler,
            "holdout_fraction": holdout_fraction,
            "folds": folds,
            "fpr": fpr,
            "image_size": image_size,
            "cache_dir": cache_dir,
            "device": device,
            "progress": progress,
            "grid": grid,
            "map_prior": map_prior,
            "map_pool": map_pool,
        }
        return _train_routed(sources, out_dir, settings)
    training = training or TrainingConfig()
    scheduler = scheduler or default_scheduler()
    rank, world = init_distributed_from_env()  # under torchrun: every process trains its share of each batch
    if world > 1 and device == "cuda":
        device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"  # one GPU per process
    extractor = create_feature_extractor(backbone, image_size=image_size, grid=grid).to(device)
    datasets = [open_dataset(source, "train", extractor.image_size) for source in sources]
    cache = FeatureCache(cache_dir or default_cache_dir())
    logger.info("backbone features of %d images (cached in %s)", sum(map(len, datasets)), cache.directory)
    parts = [cached_features(extractor, dataset, cache, progress=progress) for dataset in datasets]
    raw = torch.cat([features for features, _ in parts])
    paths = [path for _, found in parts for path in found]
    category = torch.cat([torch.full((len(found),), i) for i, (_, found) in enumerate(parts)])
    if len(paths) < 4:
        raise ValueError(f"need at least 4 readable normal training images, found {len(paths)}")
    fitted_only = denoiser in FITTED_PRESETS
    if fitted_only:  # refittable: every image trains the denoiser and is scored out of fold
        train_idx = calibration_idx = torch.arange(len(paths))
    else:
        train_idx, calibration_idx = holdout_split(len(paths), holdout_fraction, training.seed)
    mean, std = channel_statistics(raw[train_idx])
    features = (raw - mean.reshape(1, -1, 1, 1)) / std.reshape(1, -1, 1, 1)
    train_features = features[train_idx]

    overrides = dict(denoiser_overrides or {})
    if denoiser.startswith("gaussian"):
        overrides.setdefault("features", train_features)
        overrides.update(_schedule_of(scheduler))
    if denoiser == "gaussian-mixture" and len(sources) > 1:
        overrides.setdefault("labels", category[train_idx])  # one component per category
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):  # initial weights follow training.seed; the global RNG is restored
        torch.manual_seed(training.seed)
        model = create_denoiser(
            denoiser, in_channels=features.shape[1], grid_size=tuple(features.shape[2:]), **overrides
        )
    model = model.to(device)
    steps, seconds, final_loss, autocast_used = 0, time.perf_counter() - start, None, None
    trains = any(p.requires_grad for p in model.parameters())
    if trains:
        logger.info("training %s (%s)", denoiser, _budget(training))
        checkpoint_dir = out_dir.with_name(out_dir.name + ".checkpoint")
        result = train_denoiser(
            model, train_features, alphas_cumprod_of(scheduler), training, checkpoint_dir, progress=progress
        )
        model, steps, seconds = result.model, result.steps, result.seconds
        autocast_used = result.autocast_dtype
        final_loss = sum(result.losses[-20:]) / max(1, len(result.losses[-20:])) if result.losses else None
    model = model.eval().requires_grad_(False)
    if world > 1:
        torch.distributed.barrier()

    diagnostics = diagnose_training(  # per-t eps-MSE, latents, scale ratio: the verdict of the card and the CLI
        model,
        train_features,
        features[calibration_idx].to(device),
        alphas_cumprod_of(scheduler),
        grid=timesteps,
        trained=steps > 0,
    )
    map_statistic = None
    if map_prior is not None:
        map_statistic = MahalanobisMap.fit(train_features, prior=map_prior, pool=map_pool).to(device)
    scorer = InversionScorer(model, scheduler, timesteps=timesteps, scoring=scoring, map_statistic=map_statistic)
    detector = AnomalyDetector(extractor, scorer, feature_mean=mean, feature_std=std)
    logger.info(
        "fitting the statistic and thresholds on %d normal images (%s)",
        len(calibration_idx),
        f"out of {folds} folds" if fitted_only and folds and folds > 1 else "held out",
    )
    detector.fit(normal_features=features[calibration_idx].to(device), fpr=fpr, folds=folds, progress=progress)
    calibration = detector.calibration
    names = [_name_of(source) for source in sources]
    info = {
        "data": names[0] if len(names) == 1 else names,
        "unified": None if len(names) == 1 else "joint",
        "categories": {name: int((category == i).sum()) for i, name in enumerate(names)},
        "backbone": backbone,
        "denoiser": denoiser,
        "grid": grid,
        "map_statistic": None if map_statistic is None else repr(map_statistic),
        "num_train": len(train_idx),
        "num_calibration": len(calibration_idx),
        "calibration": "out of fold" if calibration.folds else "held out",
        "steps": steps,
        "train_seconds": round(seconds, 1),
        "final_loss": final_loss,
        "training": {**training.to_dict(), "autocast_dtype_used": autocast_used}
        if trains
        else "none (fitted in closed form)",
        "verdict": diagnostics["verdict"],
        "diagnostics": diagnostics,
    }
    card_training = ", ".join(f"{k}: {v}" for k, v in info.items() if k not in ("training", "diagnostics"))
    if rank == 0:  # one writer; the other processes hold the same weights
        detector.save_pretrained(out_dir, model_card={"dataset": ", ".join(names), "training": card_training})
        if steps:
            shutil.rmtree(out_dir.with_name(out_dir.name + ".checkpoint"), ignore_errors=True)
        logger.info("saved detector to %s", out_dir)
    return TrainSummary(detector, out_dir, len(train_idx), len(calibration_idx), steps, seconds, final_loss, info)


def _train_routed(sources: list[Any], out_dir: Path, settings: dict[str, Any]) -> TrainSummary:
    """One detector per source (each trained as :func:`train_detector` trains one), saved as a RoutedDetector."""
    names: list[str] = []
    for source in sources:
        base = _folder_name(source)
        name, k = base, 2
        while name in names:  # two folders of the same name: keep both
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    staging = out_dir.with_name(f".{out_dir.name}.experts")
    summaries = {}
    try:
        for name, source in zip(names, sources, strict=True):
            logger.info("expert %s (%d of %d)", name, len(summaries) + 1, len(sources))
            summaries[name] = train_detector(source, staging / name, **settings)
        detector = RoutedDetector({name: summary.detector for name, summary in summaries.items()})
        cache = FeatureCache(settings["cache_dir"] or default_cache_dir())
        features, labels = [], []
        for k, source in enumerate(sources):  # the experts' training features, cached: the router's data
            dataset = open_dataset(source, "train", detector.image_size)
            raw, _ = cached_features(detector.feature_extractor, dataset, cache, progress=False)
            features.append(raw)
            labels.append(torch.full((len(raw),), k))
        detector.fit_router(torch.cat(features), torch.cat(labels))
        info = {
            "data": [_name_of(source) for source in sources],
            "unified": "routed",
            "experts": {name: summary.info for name, summary in summaries.items()},
        }
        detector.save_pretrained(out_dir, model_card={"training": f"routed: {', '.join(names)}"})
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("saved routed detector (%d experts) to %s", len(names), out_dir)
    parts = list(summaries.values())
    return TrainSummary(
        detector,
        out_dir,
        sum(p.num_train for p in parts),
        sum(p.num_calibration for p in parts),
        sum(p.steps for p in parts),
        sum(p.seconds for p in parts),
        None,
        info,
    )


def _folder_name(source: Any) -> str:
    """A folder-safe name for a category: its folder's name, or a slug of a dataset's description."""
    text = source.description if isinstance(source, ImageDataset) else Path(source).name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("._") or "category"


def _name_of(source: Any) -> str:
    return repr(source) if isinstance(source, ImageDataset) else str(source)


def _budget(training: TrainingConfig) -> str:
    parts = [
        f"{training.minutes:g} minutes" if training.minutes else "",
        f"{training.steps} steps" if training.steps else "",
    ]
    return " or ".join(p for p in parts if p)


def _schedule_of(scheduler: Any) -> dict[str, Any]:
    """The beta schedule of a diffusers scheduler, as the Gaussian denoiser's closed form needs it."""
    config = scheduler.config
    return {k: config[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")}
