"""The scorers of InvAD and OSD-IRF: NLL, max-min, their calibrated hybrid, and the reconstruction residual."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch

from .base import LatentKind, ScoreOutput, Scorer
from .functional import gaussian_nll, max_min, norm_map, standardize

__all__ = ["HybridScorer", "MaxMinScorer", "MaxNormScorer", "NLLScorer", "hybrid_from_components"]


class NLLScorer(Scorer):
    """Image score = NLL of the latent under N(0, I); map = channel-norm map."""

    name: ClassVar[str] = "nll"

    def score(self, latents: torch.Tensor) -> ScoreOutput:
        maps = norm_map(latents)
        nll = gaussian_nll(latents)
        return ScoreOutput(nll.float(), maps, {"nll": nll})


class MaxMinScorer(Scorer):
    """Image score = ``max(A) - min(A)`` of the channel-norm map ``A`` (InvAD's "Diff")."""

    name: ClassVar[str] = "maxmin"

    def score(self, latents: torch.Tensor) -> ScoreOutput:
        maps = norm_map(latents)
        spread = max_min(maps)
        return ScoreOutput(spread, maps, {"maxmin": spread})


class MaxNormScorer(Scorer):
    """Image score = ``max(A)`` of the channel-norm map; the usual score of reconstruction residuals."""

    name: ClassVar[str] = "max"

    def score(self, latents: torch.Tensor) -> ScoreOutput:
        maps = norm_map(latents)
        peak = maps.flatten(1).amax(dim=1)
        return ScoreOutput(peak, maps, {"max": peak})


Normalization = Literal["standardize", "minmax", "test-minmax"]


def hybrid_from_components(nll: torch.Tensor, spread: torch.Tensor) -> torch.Tensor:
    """The official InvAD hybrid over a whole set: min-max normalise each term over the set, then add.

    This is transductive (it needs the whole test set at once); it reproduces the paper's tables.

    Args:
        nll: ``(N,)`` NLL values of the set.
        spread: ``(N,)`` max-min values of the set.

    Returns:
        ``(N,)`` hybrid scores in ``[0, 2]``.
    """
    terms = torch.stack([nll.to(torch.float64), spread.to(torch.float64)], dim=1)
    low, high = terms.amin(dim=0), terms.amax(dim=0)
    return standardize(terms, low, high - low).sum(dim=1)


class HybridScorer(Scorer):
    """InvAD's default: normalised NLL plus normalised max-min.

    Args:
        latent: which latent to read (``irf`` gives OSD-IRF's hybrid).
        normalization: ``standardize`` (default: z-score each term with the mean and standard deviation of
            normal samples seen in :meth:`fit`), ``minmax`` (min-max of the normal samples), or
            ``test-minmax`` (the official code's transductive min-max over the scored batch itself: scores
            are comparable only within one call, so score the whole test set at once; needs no fit).
    """

    name: ClassVar[str] = "hybrid"

    def __init__(self, latent: LatentKind = "inversion", normalization: Normalization = "standardize") -> None:
        super().__init__(latent)
        if normalization not in ("standardize", "minmax", "test-minmax"):
            raise ValueError(f"normalization must be standardize, minmax or test-minmax, got {normalization!r}")
        self.normalization = normalization

    @property
    def requires_fit(self) -> bool:  # type: ignore[override]
        return self.normalization != "test-minmax"

    @staticmethod
    def _terms(latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        maps = norm_map(latents)
        return gaussian_nll(latents), max_min(maps).to(torch.float64), maps

    def fit(self, latents: torch.Tensor) -> HybridScorer:
        if self.normalization == "test-minmax":
            return self
        nll, spread, _ = self._terms(latents)
        terms = torch.stack([nll, spread], dim=1)
        if terms.shape[0] < 2:
            raise ValueError("fitting the hybrid normalisation needs at least two normal samples")
        if self.normalization == "standardize":
            self.location_, self.scale_ = terms.mean(dim=0), terms.std(dim=0)
        else:
            self.location_ = terms.amin(dim=0)
            self.scale_ = terms.amax(dim=0) - self.location_
        return self

    def score(self, latents: torch.Tensor) -> ScoreOutput:
        nll, spread, maps = self._terms(latents)
        if self.normalization == "test-minmax":
            scores = hybrid_from_components(nll, spread)
        else:
            self.check_is_fitted()
            terms = torch.stack([nll, spread], dim=1)
            scores = standardize(terms, self.location_.to(terms.device), self.scale_.to(terms.device)).sum(dim=1)
        return ScoreOutput(scores.float(), maps, {"nll": nll, "maxmin": spread})

    def get_config(self) -> dict[str, Any]:
        return {"latent": self.latent, "normalization": self.normalization}

    def state_dict(self) -> dict[str, torch.Tensor]:
        if not hasattr(self, "location_"):
            return {}
        return {"location": self.location_.clone(), "scale": self.scale_.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if not state:
            return
        if set(state) != {"location", "scale"} or any(v.shape != (2,) for v in state.values()):
            raise ValueError(f"hybrid calibration needs tensors 'location' and 'scale' of shape (2,), got {state!r}")
        self.location_ = state["location"].to(torch.float64)
        self.scale_ = state["scale"].to(torch.float64)
