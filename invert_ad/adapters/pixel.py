"""Pixel-space detectors: DDAD and DiffusionAD (an unconditional UNet denoising the image itself).

- DDAD (Mousakhan et al., "Anomaly Detection with Conditioned Denoising Diffusion Models"): images in
  ``[-1, 1]``, the UNet is called as ``unet(x, t.float())``, linear betas 1e-4 .. 0.02, T = 1000; its
  checkpoints are ``DataParallel`` state dicts (``module.`` prefix).
- DiffusionAD (Zhang et al., "DiffusionAD: Norm-guided One-step Denoising Diffusion for Anomaly Detection"):
  images in ``[0, 1]``, the same schedule, integer timesteps; checkpoints are dicts whose
  ``unet_model_state_dict`` entry holds the denoiser (the segmentation net is not needed for inversion).

Both train the same UNet, written here as :class:`~invert_ad.adapters.pixel_unet.PixelUNet`. From the file
the peer wrote and its configuration: ``DDADAdapter.from_checkpoint("2000", "config.json")`` (DDAD's
checkpoints hold only weights, so the configuration is needed) or ``DiffusionADAdapter.from_checkpoint(
"params-best.pt")`` (DiffusionAD stores its ``args`` in the checkpoint). Any other architecture with the same
call signature (e.g. a diffusers ``UNet2DModel``) can be passed as the model instead.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from ..denoiser import denoiser_in_channels
from ._registry import register_adapter
from .base import DDPM_LINEAR, DiffusionAdapter, NoiseSchedule, check_images
from .keys import load_weights, read_checkpoint
from .peer_config import read_peer_config, schedule_from_config
from .pixel_unet import PixelUNet

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
        in_channels: image channels; read from ``model.config.in_channels`` when omitted, else from the input
            channels of the model's first 4-D (convolution) weight.

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
            in_channels=in_channels if in_channels is not None else _declared_in_channels(model),
        )
        self.model = model
        self.value_range = (lo, hi)
        self.float_timesteps = float_timesteps

    @classmethod
    def from_checkpoint(
        cls,
        source: str | os.PathLike[str] | Mapping[str, Any],
        model: nn.Module | str | os.PathLike[str] | Mapping[str, Any] | None = None,
        *,
        key: str | None = None,
        prefix: str | None = None,
        allow_unsafe_pickle: bool = False,
        **kwargs: Any,
    ) -> PixelAdapter:
        """Load a checkpoint (see :func:`~invert_ad.adapters.load_weights`) into a network and wrap it (eval mode).

        Args:
            source: a ``.safetensors`` / ``.pt`` path (any name, e.g. DDAD's ``2000``) or a loaded checkpoint.
            model: the network to load into; or the peer's configuration (a ``config.json`` path or its
                mapping, whose ``constructor_arguments`` build a :class:`~invert_ad.adapters.pixel_unet.PixelUNet`
                and whose ``schedule`` sets the noise schedule); or ``None`` when the checkpoint records its
                own configuration (DiffusionAD's ``args``).
            key: the checkpoint entry holding the weights (default: the class's ``checkpoint_key``).
            prefix: the key prefix of the denoiser (default: found automatically).
            allow_unsafe_pickle: unpickle a file that needs arbitrary Python objects (only for trusted files).
            **kwargs: forwarded to the constructor (``schedule``, ``prediction_type``, ``in_channels``).

        Raises:
            StateDictMismatchError: the weights do not fit the network.
            UnsafeCheckpointError: a pickle that needs arbitrary Python objects.
            ValueError: no network and no configuration to build one from.
        """
        checkpoint = read_checkpoint(source, allow_unsafe_pickle)
        if model is None:
            model = cls.network_from_checkpoint(checkpoint)
        elif not isinstance(model, nn.Module):
            config = read_peer_config(model)
            model = PixelUNet.from_arguments(_constructor_arguments(config))
            kwargs.setdefault("schedule", schedule_from_config(config, DDPM_LINEAR))
        load_weights(model, checkpoint, key=key if key is not None else cls.checkpoint_key, prefix=prefix)
        return cls(model, **kwargs).eval()

    @classmethod
    def network_from_checkpoint(cls, checkpoint: Mapping[str, Any]) -> nn.Module:
        """The untrained network that a checkpoint's own recorded configuration describes.

        Raises:
            ValueError: the checkpoint records no configuration (pass the network or the peer's config).
        """
        raise ValueError(
            f"{cls.__name__}: this checkpoint holds only weights; pass the network or the peer's configuration "
            "(its config.json, or a mapping with 'constructor_arguments') as the second argument"
        )

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``(B, C, H, W)`` in ``[0, 1]`` -> ``x0 (B, C, H, W)`` in ``value_range``."""
        images = check_images(images, self.in_channels)
        lo, hi = self.value_range
        return images * (hi - lo) + lo

    def network_output(self, x_t: torch.Tensor, t: torch.Tensor) -> Any:
        """``model(x_t, t)`` with ``t`` as float32 or int64 (see ``float_timesteps``)."""
        return self.model(x_t, t.float() if self.float_timesteps else t)


@register_adapter("ddad")
class DDADAdapter(PixelAdapter):
    """DDAD: a pixel UNet on images in ``[-1, 1]``, called with float timesteps, DDPM's linear schedule.

    Args:
        model: the UNet (DDAD's own, or a diffusers ``UNet2DModel`` standing in for it).
        **kwargs: ``schedule``, ``prediction_type``, ``in_channels`` (see :class:`PixelAdapter`).

    Example:
        >>> adapter = DDADAdapter.from_checkpoint("2000", "config.json")   # strips DataParallel's `module.`
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

    ARGS_TO_ARGUMENTS: ClassVar[dict[str, str]] = {
        "base_channels": "base_channels",
        "channel_mults": "channel_mults",
        "dropout": "dropout",
        "num_heads": "n_heads",
        "num_head_channels": "n_head_channels",
        "channels": "in_channels",
    }
    """DiffusionAD's ``args`` names -> :class:`PixelUNet` arguments, as its ``train.py`` passes them (it passes
    ``img_size[0]`` and no ``attention_resolutions``, so the class default ``"32,16,8"`` applies)."""

    def __init__(self, model: nn.Module, **kwargs: Any) -> None:
        super().__init__(model, value_range=(0.0, 1.0), float_timesteps=False, **kwargs)

    @classmethod
    def network_from_checkpoint(cls, checkpoint: Mapping[str, Any]) -> nn.Module:
        """The UNet that DiffusionAD's ``train.py`` builds from the ``args`` stored in its checkpoint.

        Raises:
            ValueError: the checkpoint has no ``args`` entry or it lacks a needed value.
        """
        args = checkpoint.get("args") if isinstance(checkpoint, Mapping) else None
        if not isinstance(args, Mapping):
            return super().network_from_checkpoint(checkpoint)
        needed = ["img_size", *cls.ARGS_TO_ARGUMENTS]
        absent = [name for name in needed if name not in args]
        if absent:
            raise ValueError(f"DiffusionAD checkpoint args lack {absent}; pass the network or its config instead")
        size = args["img_size"]
        arguments = {"img_size": int(size[0] if isinstance(size, (list, tuple)) else size)}
        arguments.update({ours: args[theirs] for theirs, ours in cls.ARGS_TO_ARGUMENTS.items()})
        return PixelUNet(**arguments)


def _constructor_arguments(config: Mapping[str, Any]) -> dict[str, Any]:
    """The network's constructor arguments in a peer config (``constructor_arguments``, else the mapping).

    Arguments recorded as not passed (a text starting ``not passed``) are left out, so the class default
    applies as it did for the peer.
    """
    arguments = config.get("constructor_arguments", config)
    return {
        name: value
        for name, value in arguments.items()
        if not (isinstance(value, str) and value.startswith("not passed"))
    }


def _declared_in_channels(model: nn.Module) -> int | None:
    """``model.config.in_channels``, else the input channels of the first 4-D weight (a convolution)."""
    declared = denoiser_in_channels(model)
    if declared is not None:
        return declared
    first = next((p for p in model.parameters() if p.dim() == 4), None) if isinstance(model, nn.Module) else None
    return int(first.shape[1]) if first is not None else None
