"""Binned metrics as the official InvAD evaluation computes them (``src/evaluate.py`` of SkyShunsuke/InversionAD).

* :func:`invad_f1_max`: its ``f1_max_gpu_hist`` (image and pixel F1-max).
* :func:`adeval_auroc_aupro`: pixel AUROC and AU-PRO of ADEval's CUDA accumulator (``EvalAccumulatorCuda``).

See ``_binning`` for the bins and :mod:`invert_ad.metrics.pixel` for the full description of the mode.
"""

from __future__ import annotations

import numpy as np

from . import _binning, _curves

__all__ = ["adeval_auroc_aupro", "invad_f1_max"]


def invad_f1_max(scores: np.ndarray, positive: np.ndarray, num_bins: int) -> float:
    """F1-max over the thresholds "bin >= k" of the official ``f1_max_gpu_hist`` binning.

    Args:
        scores: float32 or float64, shape ``(n,)``.
        positive: bool, shape ``(n,)``, True = anomalous.
        num_bins: the official ``n_bins`` (1000).

    Returns:
        F1-max, without the official ``+ 1e-8`` in the F1 denominator.
    """
    bins = _binning.invad_f1_bin_index(scores, num_bins)
    curve = _curves.curve_from_bins(
        np.bincount(bins[positive], minlength=num_bins),
        np.bincount(bins[~positive], minlength=num_bins),
        prepend_origin=True,
    )
    return _curves.f1_max(curve)


def adeval_auroc_aupro(
    scores: np.ndarray, weights: np.ndarray, num_strips: int, fpr_limit: float
) -> tuple[float, float]:
    """Pixel AUROC and AU-PRO over ADEval's strips: ``num_strips + 1`` thresholds, no origin point.

    Args:
        scores: float32 or float64, shape ``(n,)``.
        weights: region weights (``1 / area``), shape ``(n,)``, zero for normal pixels.
        num_strips: ADEval's ``nstrips`` (1000).
        fpr_limit: AU-PRO's FPR limit (0.3).

    Returns:
        ``(auroc, aupro)``.

    Raises:
        ValueError: if all scores are equal (ADEval asserts ``min < max``).
    """
    if scores.min() == scores.max():
        raise ValueError("invad mode needs anomaly maps that are not constant (ADEval asserts min < max)")
    counts = _binning.adeval_strip_counts(scores, weights > 0, weights, num_strips)
    curve = _curves.curve_from_bins(*counts, prepend_origin=False)
    return _curves.roc_area(curve), _curves.partial_pro_area(curve, fpr_limit)
