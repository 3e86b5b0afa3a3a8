"""Evaluate a detector on a labelled test split with the field's metrics, timings and optional heatmaps."""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ._version import __version__
from .acceleration import autocast
from .data import FeatureCache, ImageDataset, cached_features, load_mask
from .io import atomic_write_json
from .metrics import evaluate_metrics
from .pipeline import AnomalyDetector
from .scorer import first_tensor
from .scoring import hybrid_from_components
from .training.recipe import default_cache_dir, open_dataset

__all__ = ["evaluate_detector", "time_detector"]


def time_detector(
    detector: AnomalyDetector, images: torch.Tensor, repeats: int = 5, batch_size: int = 32
) -> dict[str, Any]:
    """End-to-end timings (features, inversion, scoring) of :meth:`AnomalyDetector.score`.

    Each measurement follows an untimed call of the same shape, so compiling (``torch.compile`` compiles once per
    new batch size, see :meth:`AnomalyDetector.optimize`) and other first-call costs are not counted.

    Args:
        detector: the detector.
        images: ``(N, 3, S, S)`` sample images (the first ``repeats + 1`` are used at batch 1).
        repeats: timed single-image calls (after one warm-up call).
        batch_size: images per call for the throughput measurement (repeated from ``images`` if needed; timed
            after one warm-up call at the same batch size).

    Returns:
        ``latency_ms_batch1`` (median), ``throughput_images_per_s`` and its ``throughput_batch_size``.
    """
    singles = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        detector.score(images[i % len(images)].unsqueeze(0))
        singles.append(time.perf_counter() - start)
    batch = images[torch.arange(batch_size) % len(images)]
    detector.score(batch)  # warm-up at this shape: a compiled detector compiles here, untimed
    start = time.perf_counter()
    detector.score(batch)
    elapsed = time.perf_counter() - start
    return {
        "latency_ms_batch1": 1000 * statistics.median(singles[1:]),
        "throughput_images_per_s": batch_size / elapsed,
        "throughput_batch_size": batch_size,
    }


def _masks(dataset: ImageDataset, paths: list[str]) -> tuple[np.ndarray, np.ndarray, list[Any], bool]:
    by_path = {str(r.path): r for r in dataset.records}
    records = [by_path[p] for p in paths]
    size = dataset.image_size
    has_masks = any(r.mask_path is not None for r in records)
    masks = np.zeros((len(records), size, size), dtype=bool) if has_masks else np.zeros((0,), dtype=bool)
    if has_masks:
        for i, record in enumerate(records):
            if record.mask_path is not None:
                masks[i] = load_mask(record.mask_path, size)
    return np.array([r.label for r in records]), masks, records, has_masks


def evaluate_detector(
    detector: AnomalyDetector,
    data: str | os.PathLike | ImageDataset,
    out: str | os.PathLike | None = None,
    *,
    batch_size: int = 16,
    mode: str = "exact",
    transductive: bool = False,
    heatmaps: int = 0,
    timing: bool = True,
    plots: bool = False,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score a test split and compute image AUROC / AP / F1-max, pixel AUROC / AP / F1-max, AU-PRO and mAD.

    The detector's speed settings (:meth:`AnomalyDetector.optimize`) apply and are recorded under
    ``"inference"``. Backbone features come from the feature cache, computed in float32 (a compiled or
    channels-last backbone gives the same features up to rounding), except with a backbone autocast dtype: then
    they are computed under it, as the detector would, and not cached.

    Args:
        detector: a trained detector.
        data: an MVTec-layout category folder (its ``test`` split is read) or a dataset with labels.
        out: where to write the JSON report (heatmaps go beside it, in ``<stem>_heatmaps/``).
        batch_size: images per network call.
        mode: metric mode (``exact``, ``histogram`` or ``invad``, see :func:`invert_ad.metrics.evaluate_metrics`).
        transductive: re-normalise the hybrid score with min-max over this test set, as the official InvAD
            code does (for reproducing its tables only; deployment never sees the test set).
        heatmaps: how many overlays to save (spread over normal and anomalous images).
        timing: measure latency at batch 1 and throughput at batch ``batch_size`` (each after a warm-up call).
        plots: with ``out``, also save the score histogram and the ROC curve as PNG beside the report.
        cache_dir: feature cache (default :func:`~invert_ad.training.recipe.default_cache_dir`).
        progress: progress bars.

    Returns:
        The report: the metric keys (fractions in [0, 1], pixel keys ``None`` without masks), counts, NFE,
        timings, device and dtype, the speed settings, and per-image ``path`` / ``label`` / ``score``.
    """
    dataset = open_dataset(data, "test", detector.image_size)
    engine = getattr(detector, "engine", None)  # an invert_ad.engines.EngineDetector scores images end to end
    if engine is not None:
        if transductive:
            raise ValueError(
                f"transductive normalisation needs the score components, which the {engine.name} "
                "engine does not give: evaluate with the torch engine"
            )
        scores, maps, paths = detector.score_dataset(dataset, batch_size=batch_size, progress=progress)
        labels, masks, records, has_masks = _masks(dataset, paths)
    else:
        low_precision = detector.backbone_autocast_dtype
        cache = None if low_precision is not None else FeatureCache(cache_dir or default_cache_dir())
        with autocast(detector.device, low_precision):
            raw, paths = cached_features(
                detector.feature_extractor, dataset, cache, batch_size=batch_size, progress=progress
            )
        labels, masks, records, has_masks = _masks(dataset, paths)
        features = detector.standardize(raw.to(detector.device))
        parts = [
            detector.score_features(chunk)
            for chunk in tqdm(features.split(batch_size), desc="scoring", disable=not progress, unit="batch")
        ]
        scores = torch.cat([p.image_scores for p in parts])
        maps = torch.cat([p.anomaly_maps for p in parts])
    if transductive:
        if not {"nll", "maxmin"} <= set(parts[0].scores.components):
            raise ValueError("transductive normalisation needs a hybrid-style scorer (nll and maxmin components)")
        components = {k: torch.cat([p.scores.components[k].cpu() for p in parts]) for k in ("nll", "maxmin")}
        scores = hybrid_from_components(components["nll"], components["maxmin"]).float()
    metrics = evaluate_metrics(
        scores.numpy(), labels, maps.numpy() if has_masks else None, masks if has_masks else None, mode=mode
    )
    param = first_tensor(detector.scorer.denoiser)
    report: dict[str, Any] = {
        **metrics,
        "metric_mode": mode,
        "transductive": transductive,
        "num_images": len(paths),
        "num_anomalous": int(labels.sum()),
        "num_skipped": len(dataset) - len(paths),
        "nfe": detector.scorer.nfe,
        "grid": detector.scorer.grid.to_dict(),
        "scorer": repr(detector.scorer.scorer),
        "device": str(detector.device),
        "dtype": str(param.dtype if param is not None else torch.float32).replace("torch.", ""),
        "inference": detector.inference_settings(),
        "engine": {"name": engine.name, "threads": engine.threads, "check_max_rel_diff": engine.check}
        if engine is not None
        else {"name": "torch"},
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "invert_ad_version": __version__,
        "data": str(data) if not isinstance(data, ImageDataset) else repr(data),
        "per_image": [
            {"path": p, "label": int(y), "score": float(s), "defect_type": r.defect_type}
            for p, y, s, r in zip(paths, labels, scores.tolist(), records, strict=True)
        ],
    }
    if timing and len(paths):
        sample = torch.stack([dataset[i]["image"] for i in range(min(len(dataset), 8))])
        report.update(time_detector(detector, sample, batch_size=min(batch_size, 32)))
    if out is not None:
        out = Path(out)
        if heatmaps > 0 and detector.calibration is not None:
            from .viz import save_heatmaps

            chosen = np.unique(np.linspace(0, len(paths) - 1, num=min(heatmaps, len(paths))).round().astype(int))
            index_of = {str(r.path): i for i, r in enumerate(dataset.records)}
            samples = [dataset[index_of[paths[i]]] for i in chosen]
            report["heatmaps"] = [
                str(p) for p in save_heatmaps(detector, samples, out.with_name(out.stem + "_heatmaps"))
            ]
        if plots:
            from .viz import save_roc_curve, save_score_histogram

            threshold = detector.calibration.image_threshold if detector.calibration and not transductive else None
            report["plots"] = [
                str(save_score_histogram(scores.numpy(), labels, out.with_name(out.stem + "_scores.png"), threshold)),
                str(save_roc_curve(scores.numpy(), labels, out.with_name(out.stem + "_roc.png"))),
            ]
        atomic_write_json(out, report)
    return report
