"""Thresholds, score normalisation and a domain check, fitted on normal images only (never on the test set).

- Image threshold: the ``1 - fpr`` quantile of the raw scores of normal images that the denoiser did not see
  (out-of-fold scores of every training image, or a held-out share; see :meth:`AnomalyDetector.fit
  <invert_ad.AnomalyDetector.fit>`).
- Pixel threshold: the ``1 - fpr`` quantile of the normal images' map *maxima*, so that a normal image's mask
  is non-empty as rarely as a normal image is flagged: the map and the label follow the same rate.
- Normalised values ``pred_score`` / ``anomaly_map``: a logistic function of the raw value, strictly increasing
  (the ranking of the raw scores is kept), never saturated, 0.5 at the threshold and 0.25 at the normal median:
  ``1 / (1 + exp(-log(3) (s - thr) / (thr - median)))``.
- Domain check: the mean squared standardised feature of an image (about 1 for the training domain); an image
  above ``domain_threshold`` (``DOMAIN_MARGIN`` times the largest value among the normal calibration images) is flagged
  ``in_domain = False``, e.g. a part from another product.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import torch

__all__ = ["DOMAIN_MARGIN", "MIN_EXCEEDANCES", "Calibration", "domain_scores", "fit_calibration"]

MIN_EXCEEDANCES = 5
"""Fewer expected normal images above the threshold (``N * fpr``) than this: the fit warns."""

DOMAIN_MARGIN = 1.5
"""The domain limit is this factor times the largest domain score of the normal calibration images."""

_LOG3 = math.log(3.0)


def domain_scores(features: torch.Tensor) -> torch.Tensor:
    """Mean squared standardised feature per image: ``(B, C, h, w) -> (B,)`` float64 (about 1 in the domain)."""
    return features.to(torch.float64).square().mean(dim=(1, 2, 3))


@dataclass(frozen=True)
class Calibration:
    """Fitted thresholds (raw score units) and normalisation anchors.

    Attributes:
        image_threshold: raw image score above which an image is anomalous.
        image_median: median raw image score of the normal calibration images.
        pixel_threshold: raw map value above which a pixel is anomalous.
        pixel_median: median raw map value over normal calibration pixels.
        fpr: the false-positive rate on normal images the thresholds were set for.
        num_images: how many normal images gave the scores.
        folds: ``k`` when the scores were out of fold (k-fold refits of the denoiser), ``None`` for held-out images.
        domain_threshold: :func:`domain_scores` above this are out of the training domain (``None``: no check).
    """

    image_threshold: float
    image_median: float
    pixel_threshold: float
    pixel_median: float
    fpr: float
    num_images: int
    folds: int | None = None
    domain_threshold: float | None = None

    @staticmethod
    def _normalize(values: torch.Tensor, threshold: float, median: float) -> torch.Tensor:
        spread = threshold - median if threshold > median else 1.0
        return torch.sigmoid(_LOG3 * (values.to(torch.float64) - threshold) / spread)

    def normalize_scores(self, raw_score: torch.Tensor) -> torch.Tensor:
        """Raw image scores (any shape) to ``pred_score`` in ``(0, 1)``, float64, 0.5 at the threshold."""
        return self._normalize(raw_score, self.image_threshold, self.image_median)

    def normalize_maps(self, raw_map: torch.Tensor) -> torch.Tensor:
        """Raw anomaly maps (any shape) to ``anomaly_map`` in ``(0, 1)``, float32, 0.5 at the pixel threshold."""
        return self._normalize(raw_map, self.pixel_threshold, self.pixel_median).float()

    def in_domain(self, domain_score: torch.Tensor) -> torch.Tensor:
        """``(B,)`` bool: whether each image's :func:`domain_scores` value is within the training domain."""
        if self.domain_threshold is None:
            return torch.ones_like(domain_score, dtype=torch.bool)
        return domain_score <= self.domain_threshold

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Calibration:
        return cls(**data)


def fit_calibration(
    raw_score: torch.Tensor,
    raw_map: torch.Tensor,
    fpr: float = 0.01,
    *,
    folds: int | None = None,
    domain_score: torch.Tensor | None = None,
) -> Calibration:
    """Fit thresholds on scores of normal images the denoiser did not see.

    Args:
        raw_score: ``(N,)`` raw scores of normal images (out of fold or held out).
        raw_map: ``(N, h, w)`` their raw anomaly maps (any resolution).
        fpr: the accepted false-positive rate on normal images, in ``(0, 1)``.
        folds: record that the scores were out of fold over this many folds.
        domain_score: ``(N,)`` :func:`domain_scores` of the same images (``None``: no domain check).

    Raises:
        ValueError: fewer than two images, non-finite scores or an ``fpr`` outside ``(0, 1)``.

    Warns:
        UserWarning: ``N * fpr < MIN_EXCEEDANCES``: too few normal images to support the requested rate.
    """
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"fpr must lie in (0, 1), got {fpr}")
    scores = torch.as_tensor(raw_score, dtype=torch.float64).flatten()
    n = scores.numel()
    if n < 2:
        raise ValueError(f"calibration needs at least two normal images, got {n}")
    maps = torch.as_tensor(raw_map, dtype=torch.float64)
    if maps.shape[0] != n:
        raise ValueError(f"got {n} scores but {maps.shape[0]} maps")
    pixels = maps.flatten()
    if not (torch.isfinite(scores).all() and torch.isfinite(pixels).all()):
        raise ValueError("calibration scores contain NaN or infinite values")
    if n * fpr < MIN_EXCEEDANCES:
        warnings.warn(
            f"{n} normal images cannot support fpr={fpr}: about {n * fpr:.1f} of them lie above the threshold, so "
            f"the realised false-positive rate is uncertain; use more normal images or fpr >= "
            f"{MIN_EXCEEDANCES / n:.3f}",
            UserWarning,
            stacklevel=2,
        )
    if pixels.numel() > 2_000_000:  # median of a strided subsample: same value to ~1e-3, bounded memory
        pixels = pixels[:: pixels.numel() // 2_000_000 + 1]
    domain = None
    if domain_score is not None:
        domain = DOMAIN_MARGIN * torch.as_tensor(domain_score, dtype=torch.float64).max().item()
    return Calibration(
        image_threshold=torch.quantile(scores, 1.0 - fpr).item(),
        image_median=scores.median().item(),
        pixel_threshold=torch.quantile(maps.flatten(1).amax(dim=1), 1.0 - fpr).item(),
        pixel_median=pixels.median().item(),
        fpr=fpr,
        num_images=n,
        folds=folds,
        domain_threshold=domain,
    )
