"""Pixel-level metrics (AUROC, AP, F1-max, AU-PRO) with a streaming accumulator.

Three modes:

* ``"exact"`` (default): keeps every pixel's score and region weight; :meth:`PixelMetricAccumulator.compute`
  sorts them once and reads all four metrics from the exact curve (one point per distinct score, ties handled
  as sklearn does). Memory: 12 bytes per pixel kept for float32 maps, a few times that while computing.
* ``"histogram"``: bounded memory, ``O(num_bins)``. Each update adds the pixels to ``num_bins`` uniform bins over
  a fixed ``score_range`` (values outside are clipped into the end bins, with a warning). The metrics are then
  exactly those of the quantised scores ``floor((s - low) / (high - low) * num_bins)``: thresholds at the lower
  bin edges, ties within a bin. Error versus exact shrinks with the bin width.
* ``"invad"``: reproduces the official InvAD evaluation (``src/evaluate.py`` of SkyShunsuke/InversionAD), which
  keeps all pixels too:

  - pixel AUROC and AU-PRO from ADEval's CUDA accumulator with ``nstrips = num_bins`` (1000) over the maps'
    minimum and maximum: thresholds at the ``num_bins + 1`` strip edges only, the curve starting at the edge
    equal to the maximum (no origin point), pixels at the maximum counted twice below the top edge (ADEval appends
    an overflow bin ``>= max`` to ``torch.histc``, which already counts them), AUROC by the
    trapezoidal rule over those points, AU-PRO integrated from the first point to FPR 0.3 with linear
    interpolation at 0.3, divided by 0.3;
  - pixel AP exact (the official code calls sklearn's ``average_precision_score``);
  - pixel F1-max from ``f1_max_gpu_hist`` with ``n_bins = num_bins``: scores min-max normalised with ``1e-8``
    added to the range, clamped to ``[0, 1 - 1e-8]``, binned by ``floor(s' (num_bins - 1))``, F1 maximised over
    the thresholds "bin >= k" (the official ``+ 1e-8`` in the F1 denominator is left out).

  Binning runs in the maps' dtype, as the torch code does. Differences left: ADEval weights regions in float32
  (here float64), and the official F1 denominator's ``1e-8``; both move results by about 1e-7 or less.

Regions for AU-PRO are the 8-connected components of each image's mask (see ``_regions``). AU-PRO is the area
under the per-region-overlap curve versus the FPR over normal pixels, up to ``fpr_limit`` (0.3) with linear
interpolation at the limit, divided by ``fpr_limit``, so that 1 is perfect.

When the masks hold no anomalous pixel, or no normal pixel, every pixel metric is NaN and a ``RuntimeWarning``
is issued.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np

from . import _binning, _curves
from ._official import adeval_auroc_aupro, invad_f1_max
from ._regions import inverse_region_areas
from ._validation import ArrayLike, check_pixel_inputs

__all__ = ["PIXEL_MODES", "PixelMetricAccumulator", "PixelMetrics"]

PixelMode = Literal["exact", "histogram", "invad"]
PIXEL_MODES: tuple[str, ...] = ("exact", "histogram", "invad")


@dataclass(frozen=True)
class PixelMetrics:
    """Pixel-level metrics, each in ``[0, 1]`` (NaN when undefined).

    Args:
        auroc: area under the ROC curve over all pixels.
        ap: average precision over all pixels.
        f1max: maximum F1 over thresholds.
        aupro: normalised area under the per-region-overlap curve up to the FPR limit.
    """

    auroc: float
    ap: float
    f1max: float
    aupro: float


_UNDEFINED = PixelMetrics(auroc=float("nan"), ap=float("nan"), f1max=float("nan"), aupro=float("nan"))


class _PixelStore:
    """Every pixel's score and region weight (exact and invad modes)."""

    def __init__(self) -> None:
        self._scores: list[np.ndarray] = []
        self._weights: list[np.ndarray] = []

    def add(self, scores: np.ndarray, weights: np.ndarray) -> None:
        self._scores.append(scores.ravel().copy())  # the caller may reuse its buffer (or tensor) for the next batch
        self._weights.append(weights.ravel())

    def class_counts(self) -> tuple[int, int]:
        """Numbers of anomalous and normal pixels so far."""
        positives = sum(int(np.count_nonzero(weights)) for weights in self._weights)
        return positives, sum(weights.size for weights in self._weights) - positives

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """All scores and region weights so far, each shape ``(n,)``."""
        return np.concatenate(self._scores), np.concatenate(self._weights)


class _PixelHistogram:
    """Per-bin normal counts, anomalous counts and summed region weights (histogram mode)."""

    def __init__(self, num_bins: int, score_range: tuple[float, float]) -> None:
        self.num_bins = num_bins
        self.low, self.high = score_range
        self.positives = np.zeros(num_bins, dtype=np.int64)
        self.negatives = np.zeros(num_bins, dtype=np.int64)
        self.weights = np.zeros(num_bins, dtype=np.float64)
        self.outside = 0

    def add(self, scores: np.ndarray, weights: np.ndarray) -> None:
        index, outside = _binning.uniform_bin_index(scores.ravel(), self.low, self.high, self.num_bins)
        weights = weights.ravel()
        positive = weights > 0
        self.positives += np.bincount(index[positive], minlength=self.num_bins)
        self.negatives += np.bincount(index[~positive], minlength=self.num_bins)
        self.weights += np.bincount(index[positive], weights[positive], minlength=self.num_bins)
        self.outside += outside

    def class_counts(self) -> tuple[int, int]:
        """Numbers of anomalous and normal pixels so far."""
        return int(self.positives.sum()), int(self.negatives.sum())

    def curve(self) -> _curves.Curve:
        """Curve with thresholds at the lower bin edges, plus the origin."""
        return _curves.curve_from_bins(self.positives, self.negatives, self.weights, prepend_origin=True)


def _metrics_from_curve(curve: _curves.Curve, fpr_limit: float) -> PixelMetrics:
    return PixelMetrics(
        auroc=_curves.roc_area(curve),
        ap=_curves.average_precision(curve),
        f1max=_curves.f1_max(curve),
        aupro=_curves.partial_pro_area(curve, fpr_limit),
    )


def _invad_metrics(scores: np.ndarray, weights: np.ndarray, num_bins: int, fpr_limit: float) -> PixelMetrics:
    positive = weights > 0
    auroc, aupro = adeval_auroc_aupro(scores, weights, num_bins, fpr_limit)
    return PixelMetrics(
        auroc=auroc,
        ap=_curves.average_precision(_curves.curve_from_scores(scores, positive)),
        f1max=invad_f1_max(scores, positive, num_bins),
        aupro=aupro,
    )


class PixelMetricAccumulator:
    """Streaming pixel-level AUROC, AP, F1-max and AU-PRO.

    Feed batches of whole images with :meth:`update`, read the metrics with :meth:`compute`, start over with
    :meth:`reset`. Streaming gives the same result as one update with everything (regions never span images).

    Args:
        mode: ``"exact"`` (default), ``"histogram"`` (bounded memory) or ``"invad"`` (the official InvAD
            evaluation); see the module docstring for precisely what each computes.
        num_bins: bins of the histogram mode, and ``nstrips`` / ``n_bins`` of the invad mode (officially 1000).
        score_range: ``(low, high)`` of the histogram bins; required for ``mode="histogram"``, unused otherwise.
        fpr_limit: upper FPR limit of AU-PRO, in ``(0, 1]``.

    Raises:
        ValueError: on an unknown mode, ``num_bins < 2``, ``fpr_limit`` outside ``(0, 1]``, or a missing or empty
            ``score_range`` in histogram mode.

    Example:
        >>> import numpy as np
        >>> acc = PixelMetricAccumulator()
        >>> masks = np.zeros((2, 4, 4)); masks[1, :2, :2] = 1
        >>> acc.update(masks * 2.0 + 0.5, masks)
        >>> acc.compute().aupro
        1.0
    """

    def __init__(
        self,
        mode: PixelMode = "exact",
        *,
        num_bins: int = 1000,
        score_range: tuple[float, float] | None = None,
        fpr_limit: float = 0.3,
    ) -> None:
        if mode not in PIXEL_MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {PIXEL_MODES}")
        if num_bins < 2:
            raise ValueError(f"num_bins must be at least 2, got {num_bins}")
        if not 0.0 < fpr_limit <= 1.0:
            raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
        if mode == "histogram" and (score_range is None or not score_range[0] < score_range[1]):
            raise ValueError(f"histogram mode needs score_range=(low, high) with low < high, got {score_range}")
        self.mode = mode
        self.num_bins = num_bins
        self.score_range = None if score_range is None else (float(score_range[0]), float(score_range[1]))
        self.fpr_limit = fpr_limit
        self.reset()

    def reset(self) -> None:
        """Forget every pixel seen so far."""
        self._state: _PixelStore | _PixelHistogram = (
            _PixelHistogram(self.num_bins, self.score_range) if self.mode == "histogram" else _PixelStore()
        )

    def update(self, maps: ArrayLike, masks: ArrayLike) -> None:
        """Add a batch of whole images.

        Args:
            maps: anomaly maps, ``(B, H, W)`` or ``(B, 1, H, W)``, numpy or torch; higher = more anomalous.
            masks: ground truth of the same shape; any value ``> 0`` is anomalous.

        Raises:
            ValueError: on mismatched shapes, non-finite map values or NaN in the masks.
        """
        maps, masks = check_pixel_inputs(maps, masks)
        self._state.add(maps, inverse_region_areas(masks))

    def compute(self) -> PixelMetrics:
        """Metrics over every pixel added since the last reset.

        Returns:
            :class:`PixelMetrics`; all NaN, with a ``RuntimeWarning``, when no pixel is anomalous or none is normal.

        Raises:
            ValueError: if nothing was added, or in invad mode when every map value is equal.
        """
        positives, negatives = self._state.class_counts()
        if positives + negatives == 0:
            raise ValueError("compute() called before any update()")
        self._warn_if_clipped()
        if positives == 0 or negatives == 0:
            missing = "anomalous" if positives == 0 else "normal"
            warnings.warn(
                f"pixel metrics are undefined: the masks hold no {missing} pixel; returning NaN",
                RuntimeWarning,
                stacklevel=2,
            )
            return _UNDEFINED
        return self._defined_metrics()

    def _warn_if_clipped(self) -> None:
        if isinstance(self._state, _PixelHistogram) and self._state.outside:
            warnings.warn(
                f"{self._state.outside} pixel scores fell outside score_range {self.score_range} and were clipped",
                RuntimeWarning,
                stacklevel=3,
            )

    def _defined_metrics(self) -> PixelMetrics:
        if isinstance(self._state, _PixelHistogram):
            return _metrics_from_curve(self._state.curve(), self.fpr_limit)
        scores, weights = self._state.arrays()
        if self.mode == "invad":
            return _invad_metrics(scores, weights, self.num_bins, self.fpr_limit)
        return _metrics_from_curve(_curves.curve_from_scores(scores, weights > 0, weights), self.fpr_limit)
