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

from .functional import norm_map

__all__ = ["MAP_PRIORS", "MAP_STATISTICS", "MahalanobisMap", "load_map_statistic"]

MAP_PRIORS: dict[str, str] = {
    "shared": "gaussian-shared",
    "position": "gaussian",
    "window": "gaussian-window",
}
"""Prior kinds of :meth:`MahalanobisMap.fit` and the denoiser presets that fit them."""


class MahalanobisMap:
    """Map = Mahalanobis distance of each position's feature under a Gaussian prior fitted on normal features.

    No network call: the map is the channel norm of :func:`~invert_ad.models.whiten` of the (standardised)
    features, ``A[b, i, j] = sqrt((x - mu)^T Sigma^{-1} (x - mu))`` with ``x = features[b, :, i, j]``. Higher is
    more anomalous.

    Args:
        prior: a fitted :class:`~invert_ad.models.SharedGaussianDenoiser` (one Gaussian for all positions) or
            :class:`~invert_ad.models.GaussianDenoiser` (per position, possibly neighbourhood-pooled).

    Example:
        >>> statistic = MahalanobisMap.fit(torch.randn(16, 8, 4, 4), prior="shared")
        >>> statistic(torch.randn(2, 8, 4, 4)).shape
        torch.Size([2, 4, 4])
    """

    name: ClassVar[str] = "mahalanobis"

    def __init__(self, prior: torch.nn.Module) -> None:
        from ..models import GaussianDenoiser, SharedGaussianDenoiser

        if not isinstance(prior, (GaussianDenoiser, SharedGaussianDenoiser)):
            raise TypeError(
                f"prior must be a fitted GaussianDenoiser or SharedGaussianDenoiser, got {type(prior).__name__}"
            )
        self.prior = prior.eval().requires_grad_(False)

    @classmethod
    def fit(
        cls, features: torch.Tensor, prior: Literal["shared", "position", "window"] = "shared", **fit_kwargs: Any
    ) -> MahalanobisMap:
        """Fit the prior on features of normal training images.

        Args:
            features: ``(N, C, h, w)`` standardised training features (the denoiser's, not the held-out ones).
            prior: ``shared`` (one Gaussian for all positions), ``position`` (one per position) or ``window``
                (per position, pooled over a neighbourhood: pass ``window=k``).
            **fit_kwargs: the prior's fit arguments (``shrinkage``, ``min_variance``, ``window``, ...).

        Raises:
            ValueError: an unknown ``prior`` (the message lists the kinds), or what the prior's fit raises.
        """
        from ..models import create_denoiser

        if prior not in MAP_PRIORS:
            raise ValueError(f"unknown map prior {prior!r}; choose one of {sorted(MAP_PRIORS)}")
        if features.dim() != 4:
            raise ValueError(f"features must have shape (N, C, h, w), got {tuple(features.shape)}")
        model = create_denoiser(
            MAP_PRIORS[prior], features.shape[1], tuple(features.shape[2:]), features=features, **fit_kwargs
        )
        return cls(model)

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        """The map of features ``(B, C, h, w)`` on the prior's grid: ``(B, h, w)`` float32 on their device."""
        from ..models import whiten

        device = self.prior.mean.device
        return norm_map(whiten(self.prior, features.to(device))).to(features.device)

    def to(self, device: str | torch.device) -> MahalanobisMap:
        """Move the prior's buffers to ``device``; returns ``self``."""
        self.prior.to(device)
        return self

    def get_config(self) -> dict[str, Any]:
        """What :meth:`from_pretrained` needs besides the saved prior: the statistic's name and the prior class."""
        return {"name": self.name, "prior": type(self.prior).__name__}

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write the prior (config.json + safetensors) into ``save_directory``."""
        folder = Path(save_directory)
        self.prior.save_pretrained(folder, safe_serialization=True)
        return folder

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> MahalanobisMap:
        """Load a map statistic saved with :meth:`save_pretrained`."""
        from ..models import load_denoiser

        return cls(load_denoiser(str(directory)))

    def __repr__(self) -> str:
        grid = "x".join(map(str, self.prior.grid))
        return f"MahalanobisMap(prior={type(self.prior).__name__}, grid={grid})"


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
    statistic = MAP_STATISTICS[name].from_pretrained(directory)
    return statistic if device is None else statistic.to(device)
