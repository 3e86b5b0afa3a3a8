"""Gaussian-residual denoiser: ``eps(x_t, t) = eps*_Gaussian(x_t, t) + c_out(t) r_theta(x_t, t)``.

A Gaussian prior (:class:`~invert_ad.models.GaussianDenoiser`, fixed buffers) supplies the closed-form eps; a
network learns only what that Gaussian cannot capture. The prior is either fitted per position on training
features or, with ``covariance="identity"``, the standard normal ``N(0, I)`` whose eps is the trivial predictor
``sqrt(1 - ab_t) x_t`` (exact for standardised ``N(0, I)`` features; nothing to fit). Every residual network
here starts with a zero output layer, so an untrained model equals its Gaussian exactly.

``output_scaling="edm"`` multiplies the residual by ``c_out(t) = sqrt(ab_t)``. With the identity prior this is
the preconditioning of Karras et al. (2022, "Elucidating the Design Space of Diffusion-Based Generative
Models", EDM) for ``sigma_data = 1`` written in eps form: EDM's ``D = c_skip x + c_out F(c_in x)`` with
``sigma = sqrt((1 - ab) / ab)`` and ``x = x_t / sqrt(ab)`` gives ``c_in x = x_t`` (a variance-preserving input
needs no input scaling) and ``eps = (x - D) / sigma = sqrt(1 - ab) x_t - sqrt(ab) F``. The network's target
then has unit variance at every t, and its share of eps vanishes as ``t -> T`` where the prior is exact.
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

__all__ = ["OUTPUT_SCALINGS", "RESIDUAL_KINDS", "GaussianResidualDenoiser"]

OUTPUT_SCALINGS = ("none", "edm")
"""``c_out(t)`` of the residual: ``none`` (1) or ``edm`` (``sqrt(ab_t)``)."""

RESIDUAL_KINDS: dict[str, type[ModelMixin]] = {"dit": FeatureDiT, "mlp": MLPDenoiser, "conv": ConvDenoiser}
"""Residual network classes by ``residual_kind``."""

_SHARED_KEYS = ("in_channels", "sample_size")


class GaussianResidualDenoiser(ModelMixin, ConfigMixin):
    """A fixed Gaussian prior's eps plus a trainable residual network (scaled by ``c_out(t)``).

    Submodules: ``gaussian`` (buffers only, not trained) and ``residual``; ``parameters()`` are the
    residual's alone. Build one around a fitted Gaussian with :meth:`from_gaussian`; with
    ``covariance="identity"`` the constructor alone gives the trivial-predictor skip ``sqrt(1 - ab_t) x_t``.

    Args:
        in_channels: feature channels C.
        sample_size: feature grid, an int (square) or ``(h, w)``.
        covariance: the Gaussian's ``full`` or ``diagonal`` covariance (fitted), or ``identity`` (the fixed
            ``N(0, I)`` prior: the trivial predictor).
        num_train_timesteps: T of the diffusion schedule.
        beta_start: first beta.
        beta_end: last beta.
        beta_schedule: ``linear`` or ``scaled_linear``.
        residual_kind: ``dit`` (:class:`FeatureDiT`), ``mlp`` (:class:`MLPDenoiser`) or ``conv``
            (:class:`ConvDenoiser`).
        residual_config: the residual's constructor arguments other than ``in_channels`` and ``sample_size``
            (default: the class defaults; ``FeatureDiT``'s are ``dit-s``). The saved config holds the
            residual's full resolved arguments.
        output_scaling: ``none`` (``eps = eps_G + r``) or ``edm`` (``eps = eps_G + sqrt(ab_t) r``, see the
            module docstring).

    Raises:
        ValueError: an unknown ``residual_kind`` or ``output_scaling``, a ``residual_config`` that sets
            ``in_channels``, ``sample_size`` or ``learn_sigma``, or an invalid Gaussian argument.
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
        output_scaling: Literal["none", "edm"] = "none",
    ) -> None:
        super().__init__()
        if residual_kind not in RESIDUAL_KINDS:
            raise ValueError(f"unknown residual_kind {residual_kind!r}; choose one of {sorted(RESIDUAL_KINDS)}")
        if output_scaling not in OUTPUT_SCALINGS:
            raise ValueError(f"unknown output_scaling {output_scaling!r}; choose one of {OUTPUT_SCALINGS}")
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
        output_scaling: Literal["none", "edm"] = "none",
    ) -> GaussianResidualDenoiser:
        """A residual denoiser around a fitted Gaussian (its statistics are copied).

        Args:
            gaussian: a fitted :class:`GaussianDenoiser`.
            residual_kind: ``dit``, ``mlp`` or ``conv``.
            residual_config: the residual's arguments other than ``in_channels`` and ``sample_size``.
            output_scaling: ``none`` or ``edm``.

        Returns:
            An untrained :class:`GaussianResidualDenoiser` whose output equals ``gaussian``'s.
        """
        config = {k: v for k, v in gaussian.config.items() if not k.startswith("_")}
        model = cls(
            **config, residual_kind=residual_kind, residual_config=residual_config, output_scaling=output_scaling
        )
        model.gaussian.load_state_dict(gaussian.state_dict())
        return model

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor | int, return_dict: bool = True
    ) -> DenoiserOutput | tuple[torch.Tensor]:
        """``eps*_Gaussian(sample, t) + c_out(t) residual(sample, t)``.

        Args:
            sample: noisy features ``(B, C, h, w)``.
            timestep: integer training timesteps in ``[0, T - 1]``, a scalar or ``(B,)``.
            return_dict: return a :class:`DenoiserOutput` (else a 1-tuple).

        Returns:
            eps ``(B, C, h, w)``.
        """
        residual = self.residual(sample, timestep).sample
        if self.config.output_scaling == "edm":
            ab = self.gaussian.alphas_cumprod_at(timestep, sample.shape[0], sample.device)
            residual = ab.sqrt().to(residual.dtype)[:, None, None, None] * residual
        out = self.gaussian(sample, timestep).sample + residual
        return DenoiserOutput(sample=out) if return_dict else (out,)
