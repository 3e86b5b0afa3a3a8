"""Denoisers by preset name: ``register_denoiser``, ``create_denoiser``, ``list_denoisers``, ``load_denoiser``.

Built-in presets:

- ``dit-s``, ``dit-b``, ``dit-g``: :class:`FeatureDiT` (small CPU model, InvAD's DiT-base and DiT-gigant);
- ``mlp``: :class:`MLPDenoiser`; ``conv``: :class:`ConvDenoiser`;
- ``gaussian``: :class:`GaussianDenoiser` fitted on training features;
- ``gaussian-mixture``: :class:`GaussianMixtureDenoiser`, one Gaussian per product or k-means cluster;
- ``gaussian-shared``: :class:`SharedGaussianDenoiser`, one Gaussian for all positions (parts not aligned);
- ``gaussian-window``: :class:`GaussianDenoiser` with statistics pooled over a ``window x window``
  neighbourhood of each position (:func:`~invert_ad.models.shared_gaussian.fit_neighbourhood_gaussian`);
- ``gaussian-residual-dit``, ``gaussian-residual-mlp``, ``gaussian-residual-conv``:
  :class:`GaussianResidualDenoiser` around a fitted Gaussian (small residual networks, :data:`RESIDUAL_PRESETS`);
  ``gaussian-residual-{dit,mlp,conv}-edm``: the same with the residual scaled by ``sqrt(ab_t)``;
  ``gaussian-residual-dit-s``: the residual DiT at DiT-S size (hidden 256, depth 4), the learned denoiser that
  beats the Gaussian's maps in 10 CPU minutes (``benchmarks/results/accuracy_residual_dit_s.md``);
- ``dit-s-skip``, ``mlp-skip``, ``conv-skip``: the plain preset's network learning the residual of the trivial
  predictor, ``eps = sqrt(1 - ab_t) x_t + net(x_t, t)`` (:class:`GaussianResidualDenoiser` with the fixed
  ``N(0, I)`` prior, ``covariance="identity"``); ``dit-s-edm``, ``mlp-edm``, ``conv-edm``: EDM preconditioning,
  ``eps = sqrt(1 - ab_t) x_t + sqrt(ab_t) net(x_t, t)``. Both equal the trivial predictor before training.

The Gaussian presets are fitted, not trained: they need ``features=train_features`` ``(N, C, h, w)``. The skip
and EDM presets take the network's arguments as overrides, like the plain presets.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from diffusers import ModelMixin

from ..registry import Registry
from ._layers import grid_hw
from .conv import ConvDenoiser
from .dit import DIT_PRESETS, FeatureDiT
from .gaussian import GaussianDenoiser
from .mixture import GaussianMixtureDenoiser
from .mlp import MLPDenoiser
from .residual import RESIDUAL_KINDS, GaussianResidualDenoiser
from .shared_gaussian import SharedGaussianDenoiser, fit_neighbourhood_gaussian

__all__ = ["create_denoiser", "list_denoisers", "load_denoiser", "register_denoiser"]

DenoiserFactory = Callable[..., ModelMixin]
"""``factory(in_channels, grid_size, **overrides) -> model``."""

_DENOISERS = Registry("denoiser preset")

_CLASSES: dict[str, type[ModelMixin]] = {
    cls.__name__: cls
    for cls in (
        FeatureDiT,
        MLPDenoiser,
        ConvDenoiser,
        GaussianDenoiser,
        GaussianMixtureDenoiser,
        GaussianResidualDenoiser,
        SharedGaussianDenoiser,
    )
}


def register_denoiser(name: str, factory: DenoiserFactory | None = None) -> Any:
    """Register ``factory(in_channels, grid_size, **overrides) -> model`` under ``name``.

    Usable as ``register_denoiser("mine", build)`` or as a decorator ``@register_denoiser("mine")``.
    Re-registering a name warns and replaces it.
    """

    return _DENOISERS.register(name, factory)


def list_denoisers(pattern: str = "*") -> list[str]:
    """Registered denoiser presets matching a glob ``pattern``, sorted."""
    return _DENOISERS.names(pattern)


def create_denoiser(
    preset: str, in_channels: int, grid_size: int | tuple[int, int] = 16, **overrides: Any
) -> ModelMixin:
    """Build the denoiser registered as ``preset`` for features ``(B, in_channels, *grid_size)``.

    Args:
        preset: a name from :func:`list_denoisers`.
        in_channels: feature channels C.
        grid_size: feature grid, an int (square) or ``(h, w)``.
        **overrides: constructor arguments replacing the preset's (e.g. ``depth=2``). The Gaussian presets
            take ``features`` (required, ``(N, C, h, w)`` training features) and
            :meth:`GaussianDenoiser.fit`'s keywords; the residual ones also ``residual_config``.

    Returns:
        The model (randomly initialised networks, fitted Gaussians), on the CPU.

    Raises:
        ValueError: an unknown preset (the message lists the registered ones), or a Gaussian preset without
            matching ``features``.

    Example:
        >>> dit = create_denoiser("dit-s", in_channels=192, grid_size=16)
        >>> padim_like = create_denoiser("gaussian", 8, 4, features=torch.randn(32, 8, 4, 4))
    """
    return _DENOISERS.create(preset, in_channels, grid_size, **overrides)


def load_denoiser(pretrained_model_name_or_path: str, **kwargs: Any) -> ModelMixin:
    """Load any ``invert_ad.models`` denoiser saved with ``save_pretrained``, by the class named in its config.

    Args:
        pretrained_model_name_or_path: a local folder (or a Hub id) holding ``config.json`` and the weights.
        **kwargs: passed to ``from_pretrained`` (``subfolder``, ``torch_dtype``, ...).

    Raises:
        ValueError: the config names a class that is not an ``invert_ad.models`` denoiser.
    """
    # load_config reads the model's config.json whatever class is named in it
    config = FeatureDiT.load_config(pretrained_model_name_or_path, subfolder=kwargs.get("subfolder"))
    name = config.get("_class_name")
    if name not in _CLASSES:
        raise ValueError(f"{pretrained_model_name_or_path} holds a {name!r}, not one of {sorted(_CLASSES)}")
    return _CLASSES[name].from_pretrained(pretrained_model_name_or_path, **kwargs)


def _build_network(
    cls: type[ModelMixin], defaults: dict[str, Any], in_channels: int, grid_size: int | tuple[int, int], **overrides
) -> ModelMixin:
    return cls(in_channels=in_channels, sample_size=grid_size, **{**defaults, **overrides})


def _fit_gaussian(
    in_channels: int,
    grid_size: int | tuple[int, int],
    features: torch.Tensor | None = None,
    *,
    fit: Callable[..., ModelMixin] = GaussianDenoiser.fit,
    **fit_kwargs: Any,
) -> ModelMixin:
    if features is None:
        raise ValueError("Gaussian presets are fitted on training features: pass features=train_features (N, C, h, w)")
    expected = (in_channels, *grid_hw(grid_size))
    if features.dim() != 4 or tuple(features.shape[1:]) != expected:
        raise ValueError(
            f"features must have shape (N, {expected[0]}, {expected[1]}, {expected[2]}), got {tuple(features.shape)}"
        )
    return fit(features, **fit_kwargs)


RESIDUAL_PRESETS: dict[str, dict[str, Any]] = {
    "conv": {"width": 128, "depth": 2, "num_groups": 32},
    "mlp": {"hidden_size": 256, "depth": 2},
    "dit": {"hidden_size": 128, "depth": 2, "num_heads": 4},
}
"""CPU-sized residual networks of the Gaussian-residual presets (a residual only has to learn what a
per-position Gaussian misses); ``residual_config`` entries override them."""


def _fit_gaussian_residual(
    residual_kind: str,
    output_scaling: str,
    in_channels: int,
    grid_size: int | tuple[int, int],
    features: torch.Tensor | None = None,
    residual_config: dict[str, Any] | None = None,
    **fit_kwargs: Any,
) -> GaussianResidualDenoiser:
    gaussian = _fit_gaussian(in_channels, grid_size, features, **fit_kwargs)
    config = {**RESIDUAL_PRESETS[residual_kind], **(residual_config or {})}
    return GaussianResidualDenoiser.from_gaussian(gaussian, residual_kind, config, output_scaling)


_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")


def _build_skip(
    residual_kind: str,
    defaults: dict[str, Any],
    output_scaling: str,
    in_channels: int,
    grid_size: int | tuple[int, int],
    **overrides: Any,
) -> GaussianResidualDenoiser:
    schedule = {k: overrides.pop(k) for k in _SCHEDULE_KEYS if k in overrides}
    return GaussianResidualDenoiser(
        in_channels,
        grid_size,
        covariance="identity",
        residual_kind=residual_kind,
        residual_config={**defaults, **overrides},
        output_scaling=output_scaling,
        **schedule,
    )


for _name, _preset in DIT_PRESETS.items():
    register_denoiser(_name, functools.partial(_build_network, FeatureDiT, _preset))
register_denoiser("mlp", functools.partial(_build_network, MLPDenoiser, {}))
register_denoiser("conv", functools.partial(_build_network, ConvDenoiser, {}))
register_denoiser("gaussian", _fit_gaussian)
register_denoiser("gaussian-mixture", functools.partial(_fit_gaussian, fit=GaussianMixtureDenoiser.fit))
register_denoiser("gaussian-shared", functools.partial(_fit_gaussian, fit=SharedGaussianDenoiser.fit))
register_denoiser("gaussian-window", functools.partial(_fit_gaussian, fit=fit_neighbourhood_gaussian))
for _kind in RESIDUAL_KINDS:
    register_denoiser(f"gaussian-residual-{_kind}", functools.partial(_fit_gaussian_residual, _kind, "none"))
    register_denoiser(f"gaussian-residual-{_kind}-edm", functools.partial(_fit_gaussian_residual, _kind, "edm"))
register_denoiser(  # the measured CPU-budget learner: the Gaussian plus a DiT-S-sized residual
    "gaussian-residual-dit-s",
    functools.partial(_fit_gaussian_residual, "dit", "none", residual_config=dict(DIT_PRESETS["dit-s"])),
)
for _name, _kind, _preset in (("dit-s", "dit", DIT_PRESETS["dit-s"]), ("mlp", "mlp", {}), ("conv", "conv", {})):
    register_denoiser(f"{_name}-skip", functools.partial(_build_skip, _kind, _preset, "none"))
    register_denoiser(f"{_name}-edm", functools.partial(_build_skip, _kind, _preset, "edm"))
