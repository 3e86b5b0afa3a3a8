"""Anomaly-detection metrics: image and pixel AUROC, AP, F1-max, AU-PRO and mAD (InvAD supplement, sec. 8.4).

Exact (sort-based) by default; :class:`PixelMetricAccumulator` streams pixel metrics exactly, in bounded memory
(``"histogram"``), or as the official InvAD evaluation does (``"invad"``). Inputs are numpy arrays or torch
tensors; higher scores mean more anomalous.
"""

from .functional import aupro, auroc, average_precision, f1_max
from .pixel import PIXEL_MODES, PixelMetricAccumulator, PixelMetrics
from .resize import resize_maps, resize_masks
from .suite import METRIC_KEYS, METRIC_NAMES, evaluate_metrics

__all__ = [
    "METRIC_KEYS",
    "METRIC_NAMES",
    "PIXEL_MODES",
    "PixelMetricAccumulator",
    "PixelMetrics",
    "aupro",
    "auroc",
    "average_precision",
    "evaluate_metrics",
    "f1_max",
    "resize_maps",
    "resize_masks",
]
