"""Anomaly maps from a statistic of the features themselves, apart from the latent that gives the image score.

Localisation and detection can want different statistics: on parts that are not aligned from image to image
(tires), one Gaussian shared by all positions localises defects at PatchCore's level while the per-position
inversion hybrid detects them best (``benchmarks/results/maps_*.md``). :class:`MahalanobisMap` supplies such a
map; :class:`~invert_ad.scorer.InversionScorer` uses it in place of the latent's channel-norm map when given
``map_statistic=``, and saves it with the model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from .functional import norm_map

__all__ = ["MAP_PRIORS", "MAP_STATISTICS", "MahalanobisMap", "load_map_statistic", "local_average"]

MAP_PRIORS: dict[str, str] = {
    "shared": "gaussian-shared",
    "position": "gaussian",
    "window": "gaussian-window",
}
"""Prior kinds of :meth:`MahalanobisMap.fit` and the denoiser presets that fit them."""


def _check_pool(kernel: object) -> None:
    if not isinstance(kernel, int) or isinstance(kernel, bool) or kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"pool must be a positive odd int, got {kernel!r}")


def local_average(features: torch.Tensor, kernel: int) -> torch.Tensor:
    """Each feature averaged over its ``kernel x kernel`` neighbourhood: ``(B, C, h, w) -> (B, C, h, w)``.

    Stride 1, windows clipped at the border (only cells inside the grid are averaged); ``kernel = 1`` returns
    ``features`` unchanged.

    Raises:
        ValueError: ``kernel`` is not a positive odd int (an even window would shift the grid).
    """
    _check_pool(kernel)
    if kernel == 1:
        return features
    return F.avg_pool2d(features, kernel, stride=1, padding=kernel // 2, count_include_pad=False)


class MahalanobisMap:
    """Map = Mahalanobis distance of each position's feature under a Gaussian prior fitted on normal features.

    No network call: the map is the channel norm of :func:`~invert_ad.models.whiten` of the (standardised)
    features, ``A[b, i, j] = sqrt((x - mu)^T Sigma^{-1} (x - mu))`` with ``x = features[b, :, i, j]``. Higher is
    more anomalous. With ``pool = k > 1`` every feature is first averaged over its ``k x k`` neighbourhood
    (stride 1, windows clipped at the border: PatchCore's local aggregation), for fitting and scoring alike.

    Args:
        prior: a fitted :class:`~invert_ad.models.SharedGaussianDenoiser` (one Gaussian for all positions) or
            :class:`~invert_ad.models.GaussianDenoiser` (per position, possibly neighbourhood-pooled), fitted on
            features pooled with the same ``pool``.
        pool: odd side of the local averaging window, in grid cells (1: none).
        fit_options: how :meth:`fit` made the prior (``{"prior": kind, **fit_kwargs}``; set by :meth:`fit` and
            saved), so that :meth:`refit` can make another on other features; ``None`` for a prior given as is.

    Raises:
        TypeError: ``prior`` is not one of those classes.
        ValueError: ``pool`` is not a positive odd int.

    Example:
        >>> statistic = MahalanobisMap.fit(torch.randn(16, 8, 4, 4), prior="shared")
        >>> statistic(torch.randn(2, 8, 4, 4)).shape
        torch.Size([2, 4, 4])
    """

    name: ClassVar[str] = "mahalanobis"

    def __init__(self, prior: torch.nn.Module, pool: int = 1, fit_options: dict[str, Any] | None = None) -> None:
        from ..models import GaussianDenoiser, SharedGaussianDenoiser

        if not isinstance(prior, (GaussianDenoiser, SharedGaussianDenoiser)):
            raise TypeError(
                f"prior must be a fitted GaussianDenoiser or SharedGaussianDenoiser, got {type(prior).__name__}"
            )
        _check_pool(pool)
        self.prior = prior.eval().requires_grad_(False)
        self.pool = pool
        self.fit_options = None if fit_options is None else dict(fit_options)

    @classmethod
    def fit(
        cls,
        features: torch.Tensor,
        prior: Literal["shared", "position", "window"] = "shared",
        pool: int = 1,
        **fit_kwargs: Any,
    ) -> MahalanobisMap:
        """Fit the prior on features of normal training images.

        Args:
            features: ``(N, C, h, w)`` standardised training features (the denoiser's, not the held-out ones).
            prior: ``shared`` (one Gaussian for all positions), ``position`` (one per position) or ``window``
                (per position, pooled over a neighbourhood: pass ``window=k``).
            pool: local averaging window applied to the features first (see the class).
            **fit_kwargs: the prior's fit arguments (``shrinkage``, ``min_variance``, ``window``, ...).

        Raises:
            ValueError: an unknown ``prior`` (the message lists the kinds), or what the prior's fit raises.
        """
        from ..models import create_denoiser

        if prior not in MAP_PRIORS:
            raise ValueError(f"unknown map prior {prior!r}; choose one of {sorted(MAP_PRIORS)}")
        if features.dim() != 4:
            raise ValueError(f"features must have shape (N, C, h, w), got {tuple(features.shape)}")
        pooled = local_average(features, pool)
        model = create_denoiser(
            MAP_PRIORS[prior], features.shape[1], tuple(features.shape[2:]), features=pooled, **fit_kwargs
        )
        return cls(model, pool, {"prior": prior, **fit_kwargs})

    @property
    def can_refit(self) -> bool:
        """Whether :meth:`refit` knows how the prior was made (it was made by :meth:`fit`)."""
        return self.fit_options is not None

    def refit(self, features: torch.Tensor) -> MahalanobisMap:
        """A new statistic of this one's kind (prior, its fit options, ``pool``) fitted on other features.

        :meth:`AnomalyDetector.fit <invert_ad.AnomalyDetector.fit>` uses it to calibrate the maps out of fold:
        in sample, a per-position prior fitted on a few hundred images makes the training images' distances far
        smaller than a new image's.

        Args:
            features: ``(N, C, h, w)`` standardised features of normal images.

        Raises:
            ValueError: the statistic was built from a prior directly (no fit options to repeat).
        """
        if self.fit_options is None:
            raise ValueError("this MahalanobisMap was built from a prior directly; refit needs MahalanobisMap.fit")
        device = self.prior.mean.device
        return type(self).fit(features.to(device), pool=self.pool, **self.fit_options).to(device)

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        """The map of features ``(B, C, h, w)`` on the prior's grid: ``(B, h, w)`` float32 on their device."""
        from ..models import whiten

        device = self.prior.mean.device
        return norm_map(whiten(self.prior, local_average(features.to(device), self.pool))).to(features.device)

    def to(self, device: str | torch.device) -> MahalanobisMap:
        """Move the prior's buffers to ``device``; returns ``self``."""
        self.prior.to(device)
        return self

    def get_config(self) -> dict[str, Any]:
        """What :func:`load_map_statistic` needs besides the saved prior: name, prior class and ``pool``."""
        config = {"name": self.name, "prior": type(self.prior).__name__, "pool": self.pool}
        return config if self.fit_options is None else {**config, "fit_options": self.fit_options}

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write the prior (config.json + safetensors) into ``save_directory``."""
        folder = Path(save_directory)
        self.prior.save_pretrained(folder, safe_serialization=True)
        return folder

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, pool: int = 1, fit_options: dict[str, Any] | None = None
    ) -> MahalanobisMap:
        """Load the prior saved with :meth:`save_pretrained`; ``pool`` and ``fit_options`` come from the saved
        config (folders saved before ``fit_options`` existed load without them: no :meth:`refit`)."""
        from ..models import load_denoiser

        return cls(load_denoiser(str(directory)), pool, fit_options)

    def __repr__(self) -> str:
        grid = "x".join(map(str, self.prior.grid))
        return f"MahalanobisMap(prior={type(self.prior).__name__}, grid={grid}, pool={self.pool})"


MAP_STATISTICS: dict[str, type[MahalanobisMap]] = {MahalanobisMap.name: MahalanobisMap}
"""Map statistics by the ``name`` their :meth:`get_config` records (a saved config names nothing else)."""


def load_map_statistic(
    config: dict[str, Any], directory: str | os.PathLike, device: str | torch.device | None = None
) -> MahalanobisMap:
    """Rebuild a saved map statistic from its ``get_config()`` and the folder it saved itself into.

    Raises:
        ValueError: the config names no known statistic (the message lists them).
    """
    name = config.get("name")
    if name not in MAP_STATISTICS:
        raise ValueError(f"unknown map statistic {name!r} in the saved config; known: {sorted(MAP_STATISTICS)}")
    options = {k: v for k, v in config.items() if k not in ("name", "prior")}
    statistic = MAP_STATISTICS[name].from_pretrained(directory, **options)
    return statistic if device is None else statistic.to(device)
