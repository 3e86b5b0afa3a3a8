"""Histogram binnings: uniform bins for streaming, and the two binnings of the official InvAD evaluation.

* :func:`uniform_bin_index`: ``num_bins`` equal bins over a fixed range; values outside are clipped into the end
  bins. Used by the bounded-memory histogram mode.
* :func:`invad_f1_bin_index`: the binning of ``f1_max_gpu_hist`` in the official InvAD ``src/evaluate.py``
  (image and pixel F1-max).
* :func:`adeval_strip_counts`: the strips of ADEval's CUDA accumulator (``EvalAccumulatorCuda``, ADEval 1.1.0),
  which the official code uses for pixel AUROC and AU-PRO.

The two official binnings are computed in the scores' own dtype (float32 maps stay float32), following the
order of operations of the torch code, so that scores fall into the same bins.
"""

from __future__ import annotations

import numpy as np

__all__ = ["adeval_strip_counts", "invad_f1_bin_index", "uniform_bin_index"]

_INVAD_EPS = 1e-8


def uniform_bin_index(scores: np.ndarray, low: float, high: float, num_bins: int) -> tuple[np.ndarray, int]:
    """Index of the uniform bin over ``[low, high]`` holding each score; bin ``k`` is
    ``[low + k w, low + (k + 1) w)`` with ``w = (high - low) / num_bins``, the last bin closed.

    Args:
        scores: any shape.
        low: lower end of the range.
        high: upper end, ``> low``.
        num_bins: number of bins.

    Returns:
        ``(index, outside)``: int64 bin indices in ``[0, num_bins - 1]`` with the shape of ``scores``, and how many
        scores lay outside ``[low, high]`` and were clipped into the end bins.
    """
    scores = np.asarray(scores, dtype=np.float64)
    outside = int(np.count_nonzero((scores < low) | (scores > high)))
    scaled = (scores - low) * (num_bins / (high - low))
    return np.clip(np.floor(scaled), 0, num_bins - 1).astype(np.int64), outside


def invad_f1_bin_index(scores: np.ndarray, num_bins: int) -> np.ndarray:
    """Bins of the official ``f1_max_gpu_hist``.

    ``s' = clamp((s - min) / (max - min + 1e-8), 0, 1 - 1e-8)`` then ``bin = floor(s' (num_bins - 1))``, in the
    scores' dtype. In float64 the top bin stays empty (the maximum lands in bin ``num_bins - 2``); in float32
    ``1 - 1e-8`` rounds to 1 and the maximum lands in the top bin.

    Args:
        scores: float32 or float64, shape ``(n,)``.
        num_bins: the official ``n_bins`` (1000).

    Returns:
        int64 bin indices, shape ``(n,)``, in ``[0, num_bins - 1]``.
    """
    dtype = scores.dtype.type
    low, high = scores.min(), scores.max()
    normalised = (scores - low) / (high - low + dtype(_INVAD_EPS))
    normalised = np.clip(normalised, dtype(0), dtype(1 - _INVAD_EPS))
    return (normalised * dtype(num_bins - 1)).astype(np.int64)


def adeval_strip_counts(
    scores: np.ndarray, positive: np.ndarray, weights: np.ndarray, num_strips: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-strip counts of ADEval's CUDA accumulator, with the range set to the scores' minimum and maximum.

    ``torch.histc`` puts score ``s`` in strip ``floor((s - min) num_strips / (max - min))`` (the maximum in the
    last strip), and ADEval appends an overflow bin counting ``s >= max``; pixels at the maximum are thus counted
    twice, as in the official evaluation. Cumulating from the top gives thresholds at the strip edges
    ``min + k (max - min) / num_strips``, ``k = num_strips, ..., 0``.

    Args:
        scores: float32 or float64, shape ``(n,)``, not all equal.
        positive: bool, shape ``(n,)``, True = anomalous.
        weights: region weights, shape ``(n,)``, zero for normal pixels.
        num_strips: ADEval's ``nstrips`` (1000 in the official evaluation).

    Returns:
        ``(positives, negatives, weights)`` per bin, each shape ``(num_strips + 1,)``, the overflow bin last.
    """
    dtype = scores.dtype.type
    low, high = scores.min(), scores.max()
    strip = ((scores - low) * dtype(num_strips) / (high - low)).astype(np.int64)
    strip = np.minimum(strip, num_strips - 1)
    at_max = scores >= high
    normal = ~positive

    def counts(select: np.ndarray, values: np.ndarray | None = None) -> np.ndarray:
        in_strips = np.bincount(strip[select], None if values is None else values[select], minlength=num_strips)
        overflow = np.count_nonzero(select & at_max) if values is None else values[select & at_max].sum()
        return np.append(in_strips.astype(np.float64), overflow)

    return counts(positive), counts(normal), counts(positive, weights)
