"""Pixel-space detectors: DDAD and DiffusionAD (an unconditional UNet denoising the image itself).

- DDAD (Mousakhan et al., "Anomaly Detection with Conditioned Denoising Diffusion Models"): images in
  ``[-1, 1]``, the UNet is called as ``unet(x, t.float())``, linear betas 1e-4 .. 0.02, T = 1000; its
  checkpoints are ``DataParallel`` state dicts (``module.`` prefix).
- DiffusionAD (Zhang et al., "DiffusionAD: Norm-guided One-step Denoising Diffusion for Anomaly Detection"):
  images in ``[0, 1]``, the same schedule, integer timesteps; checkpoints are dicts whose
  ``unet_model_state_dict`` entry holds the denoiser (the segmentation net is not needed for inversion).

Their own UNet classes are not reimplemented: build the architecture (or a diffusers ``UNet2DModel`` with the
same call signature and key layout) and load the weights with :meth:`PixelAdapter.from_checkpoint`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ._registry import register_adapter
from .base import DDPM_LINEAR, DiffusionAdapter, NoiseSchedule, check_images
from .diffusers import denoiser_in_channels
from .keys import load_weights

__all__ = ["DDADAdapter", "DiffusionADAdapter", "PixelAdapter"]


@register_adapter("pixel")
class PixelAdapter(DiffusionAdapter):
    """A pixel-space eps network: ``x0`` is the image mapped to the model's value range.

    Args:
        model: the denoiser, called as ``model(x_t, t)``; returns a tensor, an object with ``.sample``
            (diffusers) or a tuple.
        value_range: ``(lo, hi)`` the model was trained on; ``[0, 1]`` images become ``lo + (hi - lo) x``.
        float_timesteps: pass ``t`` as float32 (DDAD's ``t.float()``) instead of int64.
        schedule: the training schedule.
        prediction_type: what ``model`` predicts (``epsilon``, ``v_prediction`` or ``sample``).
        in_channels: image channels; read from ``model.config.in_channels`` when omitted.

    Example:
        >>> adapter = PixelAdapter(unet, value_range=(-1.0, 1.0))
        >>> with adapter.condition(images) as x0:   # images (B, 3, H, W) in [0, 1]
        ...     out = InversionScorer(adapter, adapter.scheduler, scoring="nll").score(x0)
    """

    checkpoint_key: str | None = None
    """The checkpoint entry holding the denoiser's weights (``None``: found automatically)."""

    def __init__(
        self,
        model: nn.Module,
        *,
        value_range: tuple[float, float] = (-1.0, 1.0),
        float_timesteps: bool = False,
        schedule: NoiseSchedule = DDPM_LINEAR,
        prediction_type: str = "epsilon",
        in_channels: int | None = None,
    ) -> None:
        lo, hi = (float(v) for v in value_range)
        if not hi > lo:
            raise ValueError(f"value_range must be (lo, hi) with hi > lo, got {value_range}")
        super().__init__(
            schedule=schedule,
            prediction_type=prediction_type,
            in_channels=in_channels if in_channels is not None else denoiser_in_channels(model),
        )
        self.model = model
        self.value_range = (lo, hi)
        self.float_timesteps = float_timesteps

    @classmethod
    def from_checkpoint(
        cls,
        source: str | os.PathLike[str] | Mapping[str, Any],
        model: nn.Module,
        *,
        key: str | None = None,
        prefix: str | None = None,
        allow_unsafe_pickle: bool = False,
        **kwargs: Any,
    ) -> PixelAdapter:
        """Load a checkpoint into ``model`` (see :func:`~invert_ad.adapters.load_weights`) and wrap it.

        Args:
            source: a ``.safetensors`` / ``.pt`` path or a loaded checkpoint.
            model: the denoiser architecture with the checkpoint's hyper-parameters.
            key: the checkpoint entry holding the weights (default: the class's ``checkpoint_key``).
            prefix: the key prefix of the denoiser (default: found automatically).
            allow_unsafe_pickle: unpickle a file that needs arbitrary Python objects (only for trusted files).
            **kwargs: forwarded to the constructor.

        Raises:
            StateDictMismatchError: the weights do not fit ``model``.
            UnsafeCheckpointError: a pickle that needs arbitrary Python objects.
        """
        load_weights(
            model,
            source,
            key=key if key is not None else cls.checkpoint_key,
            prefix=prefix,
            allow_unsafe_pickle=allow_unsafe_pickle,
        )
        return cls(model, **kwargs)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``(B, C, H, W)`` in ``[0, 1]`` -> ``x0 (B, C, H, W)`` in ``value_range``."""
        images = check_images(images, self.in_channels)
        lo, hi = self.value_range
        return images * (hi - lo) + lo

    def predict(self, x_t: torch.Tensor, t: torch.Tensor) -> Any:
        """``model(x_t, t)`` with ``t`` as float32 or int64 (see ``float_timesteps``)."""
        return self.model(x_t, t.float() if self.float_timesteps else t)


@register_adapter("ddad")
class DDADAdapter(PixelAdapter):
    """DDAD: a pixel UNet on images in ``[-1, 1]``, called with float timesteps, DDPM's linear schedule.

    Args:
        model: the UNet (DDAD's own, or a diffusers ``UNet2DModel`` standing in for it).
        **kwargs: ``schedule``, ``prediction_type``, ``in_channels`` (see :class:`PixelAdapter`).

    Example:
        >>> adapter = DDADAdapter.from_checkpoint("ddad_unet.pt", unet)   # strips DataParallel's `module.`
    """

    def __init__(self, model: nn.Module, **kwargs: Any) -> None:
        super().__init__(model, value_range=(-1.0, 1.0), float_timesteps=True, **kwargs)


@register_adapter("diffusionad")
class DiffusionADAdapter(PixelAdapter):
    """DiffusionAD: a pixel UNet on images in ``[0, 1]``, integer timesteps, DDPM's linear schedule.

    :meth:`from_checkpoint` reads the ``unet_model_state_dict`` entry of DiffusionAD's checkpoint dicts.

    Args:
        model: the denoising UNet (a diffusers ``UNet2DModel`` can stand in for DiffusionAD's own).
        **kwargs: ``schedule``, ``prediction_type``, ``in_channels`` (see :class:`PixelAdapter`).
    """

    checkpoint_key = "unet_model_state_dict"

    def __init__(self, model: nn.Module, **kwargs: Any) -> None:
        super().__init__(model, value_range=(0.0, 1.0), float_timesteps=False, **kwargs)
