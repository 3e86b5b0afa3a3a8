"""One call for the seven metrics of InvAD's tables and their mean, mAD."""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

from . import _curves
from ._official import invad_f1_max
from ._validation import ArrayLike, check_image_inputs, check_pixel_inputs, require_both_classes
from .pixel import PIXEL_MODES, PixelMetricAccumulator

__all__ = ["METRIC_KEYS", "METRIC_NAMES", "evaluate_metrics"]

METRIC_KEYS: tuple[str, ...] = (
    "image_auroc",
    "image_ap",
    "image_f1max",
    "pixel_auroc",
    "pixel_ap",
    "pixel_f1max",
    "aupro",
    "mad",
)
"""Keys of the dictionary returned by :func:`evaluate_metrics`, in order."""

METRIC_NAMES: dict[str, str] = {
    "image_auroc": "I-AUROC",
    "image_ap": "I-AP",
    "image_f1max": "I-F1max",
    "pixel_auroc": "P-AUROC",
    "pixel_ap": "P-AP",
    "pixel_f1max": "P-F1max",
    "aupro": "AU-PRO",
    "mad": "mAD",
}
"""The papers' column names of the metric keys (InvAD and OSD-IRF tables), in their order."""


def _image_metrics(scores: np.ndarray, labels: np.ndarray, mode: str, num_bins: int) -> dict[str, float]:
    curve = _curves.curve_from_scores(scores, labels)
    return {
        "image_auroc": _curves.roc_area(curve),
        "image_ap": _curves.average_precision(curve),
        "image_f1max": invad_f1_max(scores, labels, num_bins) if mode == "invad" else _curves.f1_max(curve),
    }


def _histogram_range(maps: np.ndarray) -> tuple[float, float]:
    low, high = float(maps.min()), float(maps.max())
    return (low, high) if high > low else (low, low + 1.0)


def _pixel_entries(
    maps: ArrayLike | None, masks: ArrayLike | None, num_images: int, mode: str, num_bins: int, fpr_limit: float
) -> dict[str, float | None]:
    if maps is None or masks is None:
        return dict.fromkeys(METRIC_KEYS[3:7])
    maps, masks = check_pixel_inputs(maps, masks)
    if maps.shape[0] != num_images:
        raise ValueError(f"maps hold {maps.shape[0]} images but there are {num_images} image scores")
    score_range = _histogram_range(maps) if mode == "histogram" else None
    accumulator = PixelMetricAccumulator(mode, num_bins=num_bins, score_range=score_range, fpr_limit=fpr_limit)
    accumulator.update(maps, masks)
    pixel = accumulator.compute()
    return {"pixel_auroc": pixel.auroc, "pixel_ap": pixel.ap, "pixel_f1max": pixel.f1max, "aupro": pixel.aupro}


def _mean_of_available(results: dict[str, float | None]) -> float:
    available = [value for value in results.values() if value is not None]
    return math.fsum(available) / len(available)


def evaluate_metrics(
    image_scores: ArrayLike,
    image_labels: ArrayLike,
    maps: ArrayLike | None = None,
    masks: ArrayLike | None = None,
    mode: Literal["exact", "histogram", "invad"] = "exact",
    *,
    num_bins: int = 1000,
    fpr_limit: float = 0.3,
) -> dict[str, float | None]:
    """Image AUROC, AP and F1-max; pixel AUROC, AP, F1-max and AU-PRO; and mAD, their mean.

    Modes:

    * ``"exact"``: every metric exact (sort-based).
    * ``"histogram"``: image metrics exact; pixel metrics from ``num_bins`` uniform bins over the maps' range
      (see :class:`~invert_ad.metrics.PixelMetricAccumulator`, which also streams this mode).
    * ``"invad"``: the official InvAD evaluation: image AUROC and AP exact, image F1-max from the official
      1000-bin histogram, pixel metrics as in ``PixelMetricAccumulator(mode="invad")``.

    Args:
        image_scores: shape ``(N,)``, higher = more anomalous, finite.
        image_labels: shape ``(N,)``, in ``{0, 1}``; both classes must be present.
        maps: optional anomaly maps ``(N, H, W)`` (or ``(N, 1, H, W)``) at the masks' size (see
            :func:`~invert_ad.metrics.resize_maps`).
        masks: optional ground truth of the same shape; any value ``> 0`` is anomalous. Give both or neither.
        mode: ``"exact"``, ``"histogram"`` or ``"invad"``.
        num_bins: bins of the histogram and invad modes (officially 1000).
        fpr_limit: FPR limit of AU-PRO (0.3).

    Returns:
        A dict with the keys of :data:`METRIC_KEYS`, values python floats in ``[0, 1]``. The pixel keys are
        ``None`` when no maps and masks are given; they are NaN (with a ``RuntimeWarning``) when the masks hold
        no anomalous pixel. ``mad`` is the mean of the entries that are not ``None`` (seven with maps, three
        without), so a NaN pixel metric makes ``mad`` NaN.

    Raises:
        ValueError: on invalid or mismatched inputs, only one image class, maps without masks (or the reverse),
            maps for a different number of images than scores, or an unknown mode.

    Example:
        >>> evaluate_metrics([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])["image_auroc"]
        0.75
    """
    if mode not in PIXEL_MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {PIXEL_MODES}")
    if (maps is None) != (masks is None):
        raise ValueError("give both maps and masks for pixel metrics, or neither")
    scores, labels = check_image_inputs(image_scores, image_labels)
    require_both_classes(labels, "image metrics")
    results: dict[str, float | None] = _image_metrics(scores, labels, mode, num_bins)
    results |= _pixel_entries(maps, masks, scores.shape[0], mode, num_bins, fpr_limit)
    results["mad"] = _mean_of_available(results)
    return results
