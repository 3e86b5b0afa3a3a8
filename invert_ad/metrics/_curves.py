"""Threshold curves and the areas and maxima read from them.

A :class:`Curve` lists, for a decreasing sequence of thresholds ``t_0 > t_1 > ... > t_{T-1}``, how much of each
class is predicted anomalous (``score >= t_i``): true positives, false positives and, for AU-PRO, the summed
region weights of the anomalous pixels above the threshold. The last threshold is at or below every score, so
the last point holds the class totals. Curves come either from sorting the scores (exact: one point per
distinct score) or from histogram counts (one point per bin edge).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "Curve",
    "average_precision",
    "curve_from_bins",
    "curve_from_scores",
    "f1_max",
    "partial_pro_area",
    "roc_area",
]


@dataclass(frozen=True)
class Curve:
    """Cumulative counts at decreasing thresholds.

    Args:
        tp: anomalous samples with ``score >= t_i``, shape ``(T,)``, float64, non-decreasing.
        fp: normal samples with ``score >= t_i``, shape ``(T,)``, float64, non-decreasing.
        overlap: summed region weights of the anomalous pixels with ``score >= t_i``, shape ``(T,)``, or
            ``None`` when no region weights were given.
    """

    tp: np.ndarray
    fp: np.ndarray
    overlap: np.ndarray | None = None

    @property
    def tpr(self) -> np.ndarray:
        """True-positive rate (recall) per point, shape ``(T,)``."""
        return self.tp / self.tp[-1]

    @property
    def fpr(self) -> np.ndarray:
        """False-positive rate per point, shape ``(T,)``."""
        return self.fp / self.fp[-1]

    @property
    def pro(self) -> np.ndarray:
        """Per-region overlap per point, shape ``(T,)``: the overlap normalised by the total region weight."""
        if self.overlap is None:
            raise ValueError("this curve was built without region weights")
        return self.overlap / self.overlap[-1]


def _prepend_zero(values: np.ndarray) -> np.ndarray:
    return np.concatenate([np.zeros(1), values])


def curve_from_scores(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None) -> Curve:
    """Exact curve: one point per distinct score, preceded by the point above every score (all zeros).

    Sort-based, ``O(n log n)``: tied scores enter together, so ties are handled as sklearn does.

    Args:
        scores: shape ``(n,)``, higher means more anomalous.
        labels: shape ``(n,)``, bool, True = anomalous.
        weights: optional region weights, shape ``(n,)``, zero for normal samples.

    Returns:
        A curve with ``T = 1 + number of distinct scores`` points.
    """
    order = np.argsort(scores)[::-1]
    sorted_scores = scores[order]
    last_of_tie = np.flatnonzero(np.append(sorted_scores[1:] != sorted_scores[:-1], True))
    tp = np.cumsum(labels[order], dtype=np.float64)[last_of_tie]
    fp = (last_of_tie + 1.0) - tp
    overlap = None if weights is None else _prepend_zero(np.cumsum(weights[order], dtype=np.float64)[last_of_tie])
    return Curve(tp=_prepend_zero(tp), fp=_prepend_zero(fp), overlap=overlap)


def _cumulate_from_top(counts: np.ndarray) -> np.ndarray:
    return np.cumsum(np.asarray(counts, dtype=np.float64)[::-1])


def curve_from_bins(
    positives: np.ndarray,
    negatives: np.ndarray,
    weights: np.ndarray | None = None,
    *,
    prepend_origin: bool,
) -> Curve:
    """Curve from per-bin counts, thresholds at the lower edge of each bin, from the top bin down.

    Point ``i`` predicts anomalous every sample in bins ``B - 1 - i`` and above. Empty bins give repeated points,
    which change none of the areas or maxima computed here.

    Args:
        positives: anomalous samples per bin, shape ``(B,)``, bins in increasing score order.
        negatives: normal samples per bin, shape ``(B,)``.
        weights: optional summed region weights per bin, shape ``(B,)``.
        prepend_origin: if True, start with the all-zero point of a threshold above the top bin.

    Returns:
        A curve with ``B`` points, or ``B + 1`` with the origin.
    """
    tp, fp = _cumulate_from_top(positives), _cumulate_from_top(negatives)
    overlap = None if weights is None else _cumulate_from_top(weights)
    if prepend_origin:
        tp, fp = _prepend_zero(tp), _prepend_zero(fp)
        overlap = None if overlap is None else _prepend_zero(overlap)
    return Curve(tp=tp, fp=fp, overlap=overlap)


def _trapezoid(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1])) / 2.0)


def roc_area(curve: Curve) -> float:
    """Area under the ROC curve by the trapezoidal rule over the curve's points (ties count one half)."""
    return _trapezoid(curve.fpr, curve.tpr)


def average_precision(curve: Curve) -> float:
    """sklearn's step-wise average precision ``sum_i (R_i - R_{i-1}) P_i`` with ``R_0 = 0``.

    Points where nothing is predicted anomalous (precision undefined) are skipped; they add no recall.
    """
    predicted = curve.tp + curve.fp
    keep = predicted > 0
    recall = curve.tpr[keep]
    precision = curve.tp[keep] / predicted[keep]
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def f1_max(curve: Curve) -> float:
    """Largest F1 over the curve's thresholds, ``F1 = 2 TP / (2 TP + FP + FN) = 2 TP / (TP + FP + P)``."""
    return float(np.max(2.0 * curve.tp / (curve.tp + curve.fp + curve.tp[-1])))


def partial_pro_area(curve: Curve, fpr_limit: float) -> float:
    """Area under the PRO-versus-FPR polyline from its first point up to ``fpr_limit``, divided by ``fpr_limit``.

    The polyline is interpolated linearly at exactly ``fpr_limit``. The area starts at the curve's first point:
    ``(0, 0)`` for curves built with an origin.
    """
    fpr, pro = curve.fpr, curve.pro
    inside = int(np.searchsorted(fpr, fpr_limit, side="right"))
    area = _trapezoid(fpr[:inside], pro[:inside])
    if 0 < inside < fpr.size:
        x0, x1, y0, y1 = fpr[inside - 1], fpr[inside], pro[inside - 1], pro[inside]
        y_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        area += (fpr_limit - x0) * (y0 + y_limit) / 2.0
    return float(area / fpr_limit)
