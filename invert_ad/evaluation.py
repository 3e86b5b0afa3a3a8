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
from .data import FeatureCache, ImageDataset, cached_features, default_cache_dir, load_mask, open_dataset
from .denoiser import first_tensor
from .detector import AnomalyDetector
from .io import atomic_write_json, atomic_write_text, replace_directory
from .metrics import METRIC_KEYS, METRIC_NAMES, evaluate_metrics
from .routing import RoutedDetector
from .scoring import ScoreOutput, hybrid_from_components

__all__ = ["evaluate_categories", "evaluate_detector", "metrics_table", "time_detector"]


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
        heatmaps: how many overlays to save (spread over normal and anomalous images); the folder is replaced.
        timing: measure latency at batch 1 and throughput at batch ``batch_size`` (each after a warm-up call).
        plots: with ``out``, also save the score histogram and the ROC curve as PNG beside the report.
        cache_dir: feature cache (default :func:`~invert_ad.data.default_cache_dir`).
        progress: progress bars.

    Returns:
        The report: the metric keys (fractions in [0, 1], pixel keys ``None`` without masks), counts, NFE,
        timings, device and dtype, the speed settings, and per-image ``path`` / ``label`` / ``raw_score`` /
        ``defect_type``.
    """
    dataset = open_dataset(data, "test", detector.image_size)
    routed_to = None
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
        if isinstance(detector, RoutedDetector):  # which expert each image went to: the router's accuracy
            routed = detector.route(features)
            routed_to = {name: int((routed == k).sum()) for k, name in enumerate(detector.experts)}
        scored = ScoreOutput.cat(
            [
                detector.score_features(chunk, batch_size)
                for chunk in tqdm(features.split(batch_size), desc="scoring", disable=not progress, unit="batch")
            ]
        )
        scores, maps = scored.raw_score, scored.raw_map
    if transductive:
        if not {"nll", "maxmin"} <= set(scored.components):
            raise ValueError("transductive normalisation needs a hybrid-style scorer (nll and maxmin components)")
        scores = hybrid_from_components(scored.components["nll"].cpu(), scored.components["maxmin"].cpu()).float()
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
        "scorer": repr(detector.scorer),
        "device": str(detector.device),
        "dtype": str(param.dtype if param is not None else torch.float32).replace("torch.", ""),
        "inference": detector.inference_settings(),
        "engine": {"name": engine.name, "threads": engine.threads, "check_max_rel_diff": engine.check}
        if engine is not None
        else {"name": "torch"},
        "routed_to": routed_to,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "invert_ad_version": __version__,
        "data": str(data) if not isinstance(data, ImageDataset) else repr(data),
        "per_image": [
            {"path": p, "label": int(y), "raw_score": float(s), "defect_type": r.defect_type}
            for p, y, s, r in zip(paths, labels, scores.tolist(), records, strict=True)
        ],
    }
    if timing and len(paths):
        sample = torch.stack([dataset[i]["image"] for i in range(min(len(dataset), 8))])
        report.update(time_detector(detector, sample, batch_size=min(batch_size, 32)))
    if out is not None:
        out = Path(out)
        if heatmaps > 0 and detector.is_fitted:
            from .viz import save_heatmaps

            chosen = np.unique(np.linspace(0, len(paths) - 1, num=min(heatmaps, len(paths))).round().astype(int))
            index_of = {str(r.path): i for i, r in enumerate(dataset.records)}
            samples = [dataset[index_of[paths[i]]] for i in chosen]
            folder = out.with_name(out.stem + "_heatmaps")
            with replace_directory(folder) as tmp:  # this run's pictures only: no stale ones from an earlier run
                names = [p.name for p in save_heatmaps(detector, samples, tmp)]
            report["heatmaps"] = [str(folder / name) for name in names]
        if plots:
            from .viz import save_roc_curve, save_score_histogram

            calibration = getattr(detector, "calibration", None) if detector.is_fitted else None  # routed: none
            threshold = calibration.image_threshold if calibration is not None and not transductive else None
            report["plots"] = [
                str(save_score_histogram(scores.numpy(), labels, out.with_name(out.stem + "_scores.png"), threshold)),
                str(save_roc_curve(scores.numpy(), labels, out.with_name(out.stem + "_roc.png"))),
            ]
        atomic_write_json(out, report)
    return report


def evaluate_categories(
    detector: AnomalyDetector, data: list[str | os.PathLike], out: str | os.PathLike, **kwargs: Any
) -> dict[str, Any]:
    """Evaluate one detector on several categories (the unified setting) and report each and their mean.

    The detector is not told which category an image comes from. Each category's full report (with its
    heatmaps, when asked) goes to ``<out without suffix>/<category>.json``; ``out`` gets the summary and
    ``<out>.md`` the table in the papers' column order (I-AUROC, I-AP, I-F1max, P-AUROC, P-AP, P-F1max,
    AU-PRO, mAD), in percent.

    Args:
        detector: a trained detector.
        data: MVTec-layout category folders (their ``test`` splits are read).
        out: the summary JSON to write.
        **kwargs: passed to :func:`evaluate_detector` (``batch_size``, ``mode``, ``heatmaps``, ...).

    Returns:
        ``{"categories": {name: {metric: value, ...}}, "mean": {metric: mean over categories}, ...}``; a metric
        that is ``None`` for some category (no masks) is averaged over the others.

    Raises:
        ValueError: two categories with the same folder name.
    """
    out = Path(out)
    names = [Path(d).name for d in data]
    if len(set(names)) != len(names):
        raise ValueError(f"categories must have distinct folder names, got {names}")
    folder = out.with_suffix("")
    categories = {}
    for name, root in zip(names, data, strict=True):
        report = evaluate_detector(detector, root, folder / f"{name}.json", **kwargs)
        categories[name] = {k: report[k] for k in (*METRIC_KEYS, "num_images", "num_anomalous")}
    mean = {}
    for key in METRIC_KEYS:
        values = [c[key] for c in categories.values() if c[key] is not None]
        mean[key] = float(np.mean(values)) if values else None
    summary = {
        "categories": categories,
        "mean": mean,
        "metric_mode": kwargs.get("mode", "exact"),
        "reports": {name: str(folder / f"{name}.json") for name in names},
        "invert_ad_version": __version__,
    }
    atomic_write_json(out, summary)
    atomic_write_text(out.with_suffix(".md"), metrics_table(summary) + "\n")
    return summary


def metrics_table(summary: dict[str, Any]) -> str:
    """A Markdown table of :func:`evaluate_categories`' summary: one row per category and the mean, in percent."""
    header = "| category | " + " | ".join(METRIC_NAMES[k] for k in METRIC_KEYS) + " |"
    lines = [header, "|---" * (len(METRIC_KEYS) + 1) + "|"]
    rows = [*summary["categories"].items(), ("mean", summary["mean"])]
    for name, metrics in rows:
        cells = ["—" if metrics[k] is None else f"{100 * metrics[k]:.1f}" for k in METRIC_KEYS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
