"""Exact, sort-based metrics on 1-D scores, and AU-PRO on maps.

Higher scores mean more anomalous; label 1 is anomalous. Each function sorts once (``O(n log n)``) and handles
ties as scikit-learn does. They work on image scores ``(N,)`` as well as on flattened pixels.
"""

from __future__ import annotations

from . import _curves
from ._validation import ArrayLike, check_image_inputs, require_both_classes
from .pixel import PixelMetricAccumulator

__all__ = ["aupro", "auroc", "average_precision", "f1_max"]


def _curve(scores: ArrayLike, labels: ArrayLike, what: str) -> _curves.Curve:
    scores, labels = check_image_inputs(scores, labels)
    require_both_classes(labels, what)
    return _curves.curve_from_scores(scores, labels)


def auroc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Area under the ROC curve; equals ``sklearn.metrics.roc_auc_score``.

    Args:
        scores: shape ``(n,)``, higher = more anomalous, finite.
        labels: shape ``(n,)``, in ``{0, 1}``.

    Returns:
        AUROC in ``[0, 1]``; tied scores across classes count one half.

    Raises:
        ValueError: on invalid inputs or when only one class is present.
    """
    return _curves.roc_area(_curve(scores, labels, "AUROC"))


def average_precision(scores: ArrayLike, labels: ArrayLike) -> float:
    """Average precision, sklearn's step definition ``sum_n (R_n - R_{n-1}) P_n`` over distinct thresholds.

    Equals ``sklearn.metrics.average_precision_score``.

    Args:
        scores: shape ``(n,)``, higher = more anomalous, finite.
        labels: shape ``(n,)``, in ``{0, 1}``.

    Returns:
        AP in ``[0, 1]``.

    Raises:
        ValueError: on invalid inputs or when only one class is present.
    """
    return _curves.average_precision(_curve(scores, labels, "average precision"))


def f1_max(scores: ArrayLike, labels: ArrayLike) -> float:
    """Maximum over thresholds of ``F1 = 2 P R / (P + R)`` on the precision-recall curve.

    The thresholds are the distinct scores (predict anomalous when ``score >= threshold``).

    Args:
        scores: shape ``(n,)``, higher = more anomalous, finite.
        labels: shape ``(n,)``, in ``{0, 1}``.

    Returns:
        F1-max in ``(0, 1]``.

    Raises:
        ValueError: on invalid inputs or when only one class is present.
    """
    return _curves.f1_max(_curve(scores, labels, "F1-max"))


def aupro(maps: ArrayLike, masks: ArrayLike, *, fpr_limit: float = 0.3) -> float:
    """Exact normalised area under the per-region-overlap curve up to ``fpr_limit``.

    Regions are the 8-connected components of each image's mask. At each threshold (every distinct map value),
    PRO is the mean over all regions of all images of the fraction of the region's pixels scoring at or above the
    threshold, and FPR is the fraction of normal pixels doing so. The PRO-versus-FPR polyline from ``(0, 0)`` is
    integrated up to ``fpr_limit`` (interpolated linearly there) and divided by ``fpr_limit``.

    Args:
        maps: anomaly maps, ``(N, H, W)`` or ``(N, 1, H, W)``.
        masks: ground truth of the same shape; any value ``> 0`` is anomalous.
        fpr_limit: integration limit, in ``(0, 1]``.

    Returns:
        AU-PRO in ``[0, 1]``, or NaN (with a ``RuntimeWarning``) when the masks hold no anomalous pixel.

    Raises:
        ValueError: on invalid inputs.
    """
    accumulator = PixelMetricAccumulator("exact", fpr_limit=fpr_limit)
    accumulator.update(maps, masks)
    return accumulator.compute().aupro
