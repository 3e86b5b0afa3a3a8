"""The scorer interface: what a latent statistic must provide to plug into :class:`InversionScorer`."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

__all__ = ["LATENT_KINDS", "NotFittedError", "ScoreOutput", "Scorer"]

LatentKind = Literal["inversion", "irf", "reconstruction"]
LATENT_KINDS: tuple[str, ...] = ("inversion", "irf", "reconstruction")


class NotFittedError(ValueError, AttributeError):
    """Raised when a scorer that needs calibration is used before ``fit``."""


@dataclass(frozen=True)
class ScoreOutput:
    """Raw scores of a batch: what a :class:`Scorer`, :meth:`InversionScorer.score <invert_ad.InversionScorer.score>`
    and :meth:`AnomalyDetector.score <invert_ad.AnomalyDetector.score>` return. Higher is more anomalous.

    Attributes:
        raw_score: ``(B,)`` float32 image scores in the statistic's own units.
        raw_map: ``(B, h, w)`` float32 anomaly maps in the same units: on the latent grid from a scorer, at the
            image size ``S x S`` from a detector.
        components: raw per-image statistics by name, each ``(B,)`` (for transductive normalisation and reports).
        latent: ``(B, C, h, w)``, the latent the statistic read (final inverted latent, IRF field or
            reconstruction residual ``x0 - x0hat``); ``None`` from a bare scorer.
    """

    raw_score: torch.Tensor
    raw_map: torch.Tensor
    components: dict[str, torch.Tensor] = field(default_factory=dict)
    latent: torch.Tensor | None = None

    @classmethod
    def cat(cls, outputs: list[ScoreOutput]) -> ScoreOutput:
        """Concatenate batches along the batch axis (latents kept only when every batch has one)."""
        if not outputs:
            raise ValueError("nothing to concatenate: no outputs")
        latents = [o.latent for o in outputs]
        return cls(
            torch.cat([o.raw_score for o in outputs]),
            torch.cat([o.raw_map for o in outputs]),
            {k: torch.cat([o.components[k] for o in outputs]) for k in outputs[0].components},
            None if any(z is None for z in latents) else torch.cat(latents),
        )


class Scorer(ABC):
    """A statistic of a latent ``(B, C, h, w)`` giving image scores and anomaly maps.

    Subclasses set ``name`` and implement :meth:`score`. Scorers that need calibration on normal data set
    ``requires_fit = True`` and implement :meth:`fit`, :meth:`state_dict` and :meth:`load_state_dict`;
    fitted state lives in attributes ending with ``_``. ``latent`` names which latent the scorer reads:
    ``inversion`` (the DDIM-inverted final latent), ``irf`` (OSD-IRF's one-step residual field) or
    ``reconstruction`` (the residual ``x0 - x0hat`` of the reconstruction baseline).
    """

    name: ClassVar[str] = "scorer"
    requires_fit: ClassVar[bool] = False

    def __init__(self, latent: LatentKind = "inversion") -> None:
        if latent not in LATENT_KINDS:
            raise ValueError(f"latent must be one of {LATENT_KINDS}, got {latent!r}")
        self.latent = latent

    @abstractmethod
    def score(self, latents: torch.Tensor) -> ScoreOutput:
        """Score latents ``(B, C, h, w)``: raw scores ``(B,)`` and maps ``(B, h, w)``, higher is more anomalous."""

    def fit(self, latents: torch.Tensor) -> Scorer:
        """Calibrate on latents of normal samples, ``(N, C, h, w)``; return ``self``."""
        return self

    @property
    def is_fitted(self) -> bool:
        return not self.requires_fit or bool(self.state_dict())

    def check_is_fitted(self) -> None:
        if not self.is_fitted:
            raise NotFittedError(
                f"scorer {self.name!r} must be calibrated on normal samples first: call fit(normal_features)"
            )

    def get_config(self) -> dict[str, Any]:
        """Constructor arguments, JSON-serialisable (saved with the model)."""
        return {"latent": self.latent}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Fitted state as tensors (saved as safetensors); empty when unfitted or stateless."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore fitted state from :meth:`state_dict`."""
        if state:
            raise ValueError(f"scorer {self.name!r} has no fitted state, got keys {sorted(state)}")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"
