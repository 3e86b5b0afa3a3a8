"""Ground-truth regions for AU-PRO: 8-connected components of each mask.

Regions are the connected components of each image's mask under 8-connectivity (pixels touching by an edge or
a corner belong together), as in the MVTec AD reference evaluation (``scipy.ndimage.label`` with a 3x3 structure
of ones), anomalib and ADEval (OpenCV, ``connectivity=8``). Components never span two images.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["inverse_region_areas"]

_EIGHT_CONNECTED_WITHIN_IMAGE = np.zeros((3, 3, 3), dtype=bool)
_EIGHT_CONNECTED_WITHIN_IMAGE[1] = True


def inverse_region_areas(masks: np.ndarray) -> np.ndarray:
    """Per-pixel weight ``1 / area`` of the region the pixel belongs to; 0 for normal pixels.

    Summing these weights over the pixels above a threshold and dividing by the number of regions gives the
    per-region overlap (PRO) at that threshold: the mean over regions of the fraction of the region above it.
    The number of regions equals the sum of all weights.

    Args:
        masks: bool, shape ``(N, H, W)``, True = anomalous.

    Returns:
        float64 weights, shape ``(N, H, W)``.
    """
    labels, num_regions = ndimage.label(masks, structure=_EIGHT_CONNECTED_WITHIN_IMAGE)
    areas = np.bincount(labels.ravel(), minlength=num_regions + 1)
    weight_of_label = np.zeros(num_regions + 1)
    weight_of_label[1:] = 1.0 / areas[1:]
    return weight_of_label[labels]
