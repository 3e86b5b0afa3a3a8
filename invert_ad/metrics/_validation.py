"""Input conversion and validation shared by every metric.

All public metric functions accept numpy arrays or torch tensors (any device; bfloat16 and float16 are upcast to
float32). Scores must be finite; labels must lie in ``{0, 1}``; masks count any value ``> 0`` as anomalous.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = [
    "ArrayLike",
    "as_labels",
    "as_masks",
    "as_scores",
    "check_image_inputs",
    "check_pixel_inputs",
    "require_both_classes",
]

ArrayLike = Any
"""A numpy array, a torch tensor, or anything ``np.asarray`` accepts."""


def _to_numpy(values: ArrayLike) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
        if values.dtype in (torch.bfloat16, torch.float16):
            values = values.float()
        return values.numpy()
    return np.asarray(values)


def as_scores(values: ArrayLike, name: str) -> np.ndarray:
    """Real, finite scores as a float32 or float64 array (float16 and integers are upcast).

    Raises:
        ValueError: if the values are not real numbers or contain NaN or infinity.
    """
    array = _to_numpy(values)
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_) or np.iscomplexobj(array):
        raise ValueError(f"{name} must be real numbers, got dtype {array.dtype}")
    array = array.astype(np.result_type(array.dtype, np.float32), copy=False)
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contain {np.count_nonzero(~np.isfinite(array))} NaN or infinite values")
    return array


def as_labels(values: ArrayLike, name: str) -> np.ndarray:
    """Binary labels as a bool array.

    Raises:
        ValueError: if any value is not 0 or 1 (``True``/``False`` and ``0.0``/``1.0`` are accepted).
    """
    array = _to_numpy(values)
    valid = np.isin(array, (0, 1))
    if not valid.all():
        bad = np.unique(array[~valid])[:5]
        raise ValueError(f"{name} must be binary (0 or 1), found values such as {bad.tolist()}")
    return array.astype(bool)


def as_masks(values: ArrayLike, name: str) -> np.ndarray:
    """Ground-truth masks as a bool array: any value ``> 0`` is anomalous.

    Raises:
        ValueError: if the masks contain NaN.
    """
    array = _to_numpy(values)
    if np.issubdtype(array.dtype, np.floating) and np.isnan(array).any():
        raise ValueError(f"{name} contain NaN")
    return array > 0


def check_image_inputs(scores: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validate image-level inputs.

    Args:
        scores: image scores, shape ``(N,)``; higher means more anomalous.
        labels: image labels, shape ``(N,)``, in ``{0, 1}`` (1 = anomalous).

    Returns:
        ``(scores, labels)`` as float and bool arrays of shape ``(N,)``.

    Raises:
        ValueError: on a shape other than ``(N,)``, mismatched lengths, non-binary labels or non-finite scores.
    """
    scores, labels = as_scores(scores, "image scores"), as_labels(labels, "image labels")
    if scores.ndim != 1 or labels.ndim != 1:
        raise ValueError(f"image scores and labels must be 1-D (N,), got {scores.shape} and {labels.shape}")
    if scores.shape != labels.shape:
        raise ValueError(f"image scores {scores.shape} and labels {labels.shape} differ in length")
    return scores, labels


def _squeeze_channel(array: np.ndarray, name: str) -> np.ndarray:
    if array.ndim == 4 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 3:
        raise ValueError(f"{name} must have shape (N, H, W) or (N, 1, H, W), got {array.shape}")
    return array


def check_pixel_inputs(maps: ArrayLike, masks: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validate pixel-level inputs.

    Args:
        maps: anomaly maps, shape ``(N, H, W)`` or ``(N, 1, H, W)``; higher means more anomalous.
        masks: ground-truth masks of the same shape; any value ``> 0`` is anomalous.

    Returns:
        ``(maps, masks)`` as a float array and a bool array, both ``(N, H, W)``.

    Raises:
        ValueError: on other shapes, maps and masks of different shapes (resize the maps first with
            :func:`invert_ad.metrics.resize_maps`), NaN in the masks or non-finite map values.
    """
    maps = _squeeze_channel(as_scores(maps, "anomaly maps"), "anomaly maps")
    masks = _squeeze_channel(as_masks(masks, "masks"), "masks")
    if maps.shape != masks.shape:
        raise ValueError(
            f"anomaly maps {maps.shape} and masks {masks.shape} differ in shape; "
            "resize the maps to the masks with invert_ad.metrics.resize_maps"
        )
    return maps, masks


def require_both_classes(labels: np.ndarray, what: str) -> None:
    """Raise unless ``labels`` holds both classes.

    Raises:
        ValueError: if all labels are 0 or all are 1 (the metrics are undefined).
    """
    positives = int(np.count_nonzero(labels))
    if positives == 0 or positives == labels.size:
        only = "anomalous" if positives else "normal"
        raise ValueError(f"{what}: only {only} samples present ({labels.size} in all); the metric is undefined")
