"""Gaussian-residual denoiser: ``eps(x_t, t) = eps*_Gaussian(x_t, t) + r_theta(x_t, t)``.

The per-position Gaussian (:class:`~invert_ad.models.GaussianDenoiser`, fixed buffers) supplies the
closed-form eps; a network learns only what a Gaussian cannot capture. Every residual network here starts
with a zero output layer, so an untrained model equals the Gaussian detector exactly.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from ._layers import DenoiserOutput
from .conv import ConvDenoiser
from .dit import FeatureDiT
from .gaussian import GaussianDenoiser
from .mlp import MLPDenoiser

__all__ = ["RESIDUAL_KINDS", "GaussianResidualDenoiser"]

RESIDUAL_KINDS: dict[str, type[ModelMixin]] = {"dit": FeatureDiT, "mlp": MLPDenoiser, "conv": ConvDenoiser}
"""Residual network classes by ``residual_kind``."""

_SHARED_KEYS = ("in_channels", "sample_size")


class GaussianResidualDenoiser(ModelMixin, ConfigMixin):
    """A fixed per-position Gaussian eps plus a trainable residual network.

    Submodules: ``gaussian`` (buffers only, not trained) and ``residual``; ``parameters()`` are the
    residual's alone. Build one around a fitted Gaussian with :meth:`from_gaussian`.

    Args:
        in_channels: feature channels C.
        sample_size: feature grid, an int (square) or ``(h, w)``.
        covariance: the Gaussian's ``full`` or ``diagonal`` covariance.
        num_train_timesteps: T of the diffusion schedule.
        beta_start: first beta.
        beta_end: last beta.
        beta_schedule: ``linear`` or ``scaled_linear``.
        residual_kind: ``dit`` (:class:`FeatureDiT`), ``mlp`` (:class:`MLPDenoiser`) or ``conv``
            (:class:`ConvDenoiser`).
        residual_config: the residual's constructor arguments other than ``in_channels`` and ``sample_size``
            (default: the class defaults; ``FeatureDiT``'s are ``dit-s``). The saved config holds the
            residual's full resolved arguments.

    Raises:
        ValueError: an unknown ``residual_kind``, a ``residual_config`` that sets ``in_channels``,
            ``sample_size`` or ``learn_sigma``, or an invalid Gaussian argument.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 192,
        sample_size: int | tuple[int, int] = 16,
        covariance: Literal["full", "diagonal"] = "full",
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        residual_kind: Literal["dit", "mlp", "conv"] = "dit",
        residual_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if residual_kind not in RESIDUAL_KINDS:
            raise ValueError(f"unknown residual_kind {residual_kind!r}; choose one of {sorted(RESIDUAL_KINDS)}")
        residual_config = dict(residual_config or {})
        if any(key in residual_config for key in _SHARED_KEYS) or residual_config.get("learn_sigma"):
            raise ValueError(
                f"residual_config must not set {_SHARED_KEYS} (they follow the Gaussian) nor learn_sigma (the "
                f"residual predicts eps only), got {residual_config}"
            )
        self.gaussian = GaussianDenoiser(
            in_channels, sample_size, covariance, num_train_timesteps, beta_start, beta_end, beta_schedule
        )
        self.residual = RESIDUAL_KINDS[residual_kind](
            in_channels=in_channels, sample_size=sample_size, **residual_config
        )
        resolved = {k: v for k, v in self.residual.config.items() if not k.startswith("_") and k not in _SHARED_KEYS}
        self.register_to_config(residual_config=resolved)

    @classmethod
    def from_gaussian(
        cls,
        gaussian: GaussianDenoiser,
        residual_kind: Literal["dit", "mlp", "conv"] = "dit",
        residual_config: dict[str, Any] | None = None,
    ) -> GaussianResidualDenoiser:
        """A residual denoiser around a fitted Gaussian (its statistics are copied).

        Args:
            gaussian: a fitted :class:`GaussianDenoiser`.
            residual_kind: ``dit``, ``mlp`` or ``conv``.
            residual_config: the residual's arguments other than ``in_channels`` and ``sample_size``.

        Returns:
            An untrained :class:`GaussianResidualDenoiser` whose output equals ``gaussian``'s.
        """
        config = {k: v for k, v in gaussian.config.items() if not k.startswith("_")}
        model = cls(**config, residual_kind=residual_kind, residual_config=residual_config)
        model.gaussian.load_state_dict(gaussian.state_dict())
        return model

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor | int, return_dict: bool = True
    ) -> DenoiserOutput | tuple[torch.Tensor]:
        """``eps*_Gaussian(sample, t) + residual(sample, t)``.

        Args:
            sample: noisy features ``(B, C, h, w)``.
            timestep: integer training timesteps in ``[0, T - 1]``, a scalar or ``(B,)``.
            return_dict: return a :class:`DenoiserOutput` (else a 1-tuple).

        Returns:
            eps ``(B, C, h, w)``.
        """
        out = self.gaussian(sample, timestep).sample + self.residual(sample, timestep).sample
        return DenoiserOutput(sample=out) if return_dict else (out,)
