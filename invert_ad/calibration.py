"""Thresholds and score normalisation fitted on normal images only (never on the test set).

The threshold is the ``1 - fpr`` quantile of held-out normal scores (image level, and pixel level for masks).
Normalised scores follow anomalib's convention that the threshold maps to 0.5: with ``m`` the median normal
score and ``thr`` the threshold, ``normalised = clip(0.5 + 0.5 * (s - thr) / (thr - m), 0, 1)``, so the
median normal image sits at 0 and a score as far above the threshold as the threshold is above the median
reaches 1. Heatmaps use the pixel-level version, a fixed colour scale for every image.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

__all__ = ["Calibration", "fit_calibration", "threshold_from_labels"]


@dataclass(frozen=True)
class Calibration:
    """Fitted thresholds (raw score units) and normalisation anchors.

    Attributes:
        image_threshold: raw image score above which an image is anomalous.
        image_median: median raw image score of the normal calibration images.
        pixel_threshold: raw map value above which a pixel is anomalous.
        pixel_median: median raw map value over normal calibration pixels.
        fpr: the false-positive rate the thresholds were set for (``None`` when set from labels).
        num_images: how many normal images were used.
    """

    image_threshold: float
    image_median: float
    pixel_threshold: float
    pixel_median: float
    fpr: float | None
    num_images: int

    @staticmethod
    def _normalize(values: torch.Tensor, threshold: float, median: float) -> torch.Tensor:
        spread = threshold - median if threshold > median else 1.0
        return (0.5 + 0.5 * (values.float() - threshold) / spread).clamp(0.0, 1.0)

    def normalize_image_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """Image scores ``(B,)`` to ``[0, 1]`` with the threshold at 0.5."""
        return self._normalize(scores, self.image_threshold, self.image_median)

    def normalize_maps(self, maps: torch.Tensor) -> torch.Tensor:
        """Anomaly maps (any shape) to ``[0, 1]`` with the pixel threshold at 0.5."""
        return self._normalize(maps, self.pixel_threshold, self.pixel_median)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Calibration:
        return cls(**data)


def fit_calibration(image_scores: torch.Tensor, maps: torch.Tensor, fpr: float = 0.01) -> Calibration:
    """Fit thresholds on normal images.

    Args:
        image_scores: ``(N,)`` raw scores of normal images not used for training.
        maps: ``(N, h, w)`` their anomaly maps (any resolution).
        fpr: the accepted false-positive rate on normal images, in ``(0, 1)``.

    Raises:
        ValueError: fewer than two images, non-finite scores or an ``fpr`` outside ``(0, 1)``.
    """
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"fpr must lie in (0, 1), got {fpr}")
    scores = torch.as_tensor(image_scores, dtype=torch.float64).flatten()
    if scores.numel() < 2:
        raise ValueError(f"calibration needs at least two normal images, got {scores.numel()}")
    pixels = torch.as_tensor(maps, dtype=torch.float64).flatten()
    if not (torch.isfinite(scores).all() and torch.isfinite(pixels).all()):
        raise ValueError("calibration scores contain NaN or infinite values")
    if pixels.numel() > 2_000_000:  # quantile of a strided subsample: same value to ~1e-3, bounded memory
        pixels = pixels[:: pixels.numel() // 2_000_000 + 1]
    return Calibration(
        image_threshold=torch.quantile(scores, 1.0 - fpr).item(),
        image_median=scores.median().item(),
        pixel_threshold=torch.quantile(pixels, 1.0 - fpr).item(),
        pixel_median=pixels.median().item(),
        fpr=fpr,
        num_images=int(scores.numel()),
    )


def threshold_from_labels(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """The threshold maximising F1 on labelled validation data (for users who have anomalous examples).

    Args:
        scores: ``(N,)`` raw scores.
        labels: ``(N,)`` 1 for anomalous, 0 for normal; both classes must be present.
    """
    scores = torch.as_tensor(scores, dtype=torch.float64).flatten()
    labels = torch.as_tensor(labels).flatten().to(torch.int64)
    if scores.shape != labels.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and labels {tuple(labels.shape)} differ in shape")
    if labels.unique().numel() != 2:
        raise ValueError("threshold_from_labels needs both normal (0) and anomalous (1) examples")
    order = torch.argsort(scores, descending=True)
    s, y = scores[order], labels[order].double()
    tp = torch.cumsum(y, 0)
    fp = torch.cumsum(1 - y, 0)
    f1 = 2 * tp / (tp + fp + y.sum())
    last = torch.cat([s[1:] != s[:-1], torch.tensor([True])])  # only cut between distinct scores
    f1 = torch.where(last, f1, torch.zeros_like(f1))
    return s[int(torch.argmax(f1))].item()
