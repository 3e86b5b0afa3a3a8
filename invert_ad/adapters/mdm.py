"""Masked diffusion teachers (MDM / OmiAD-style) and x0- or v-predicting models.

OmiAD distils a masked diffusion model (MDM) into a one-step generator. Neither has public code, so this
module fixes a call contract rather than wrapping a specific class:

- the teacher is a :class:`MaskedDenoiser`: ``model(x_t, t, mask_ratio=0.0)``; with ``mask_ratio = 0`` no
  token is masked and the model is a plain denoiser (the only setting in which inversion is deterministic),
  so the adapter always passes ``0.0``;
- the distilled generator predicts ``x0`` (``prediction_type="sample"``) and takes no mask ratio
  (``masked=False``).

Outputs of type ``sample`` or ``v_prediction`` are converted to eps by
:func:`~invert_ad.adapters.prediction_to_eps`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch

from ..denoiser import denoiser_in_channels
from ._registry import register_adapter
from .base import DDPM_LINEAR, DiffusionAdapter, NoiseSchedule, check_images

__all__ = ["MDMAdapter", "MaskedDenoiser"]


@runtime_checkable
class MaskedDenoiser(Protocol):
    """The call contract of a masked diffusion teacher.

    ``model(x_t, t, mask_ratio)`` takes noisy samples ``(B, C, h, w)``, integer timesteps ``(B,)`` and the
    fraction of tokens to mask, and returns its prediction ``(B, C, h, w)`` (or an object with ``.sample``).
    """

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, mask_ratio: float = 0.0) -> Any: ...


@register_adapter("mdm")
class MDMAdapter(DiffusionAdapter):
    """A masked diffusion teacher run with no masking, or its x0-predicting generator.

    Args:
        model: a :class:`MaskedDenoiser` (``masked=True``) or a plain ``model(x_t, t)`` (``masked=False``).
        encoder: maps images ``(B, C, H, W)`` in ``[0, 1]`` to ``x0`` in the model's space (a VAE encoder,
            a feature extractor, or e.g. ``lambda x: 2 * x - 1`` for pixel models). An ``nn.Module`` becomes a
            submodule (moved by ``.to``).
        masked: call ``model(x_t, t, mask_ratio=0.0)``; ``False`` calls ``model(x_t, t)``.
        prediction_type: ``epsilon`` (the teacher), ``sample`` (the generator's x0) or ``v_prediction``.
        schedule: the training schedule.
        in_channels: channels of ``x0``; read from ``model.config.in_channels`` when omitted.

    Example:
        >>> adapter = MDMAdapter(teacher, encoder=lambda x: 2 * x - 1)
        >>> generator = MDMAdapter(student, encoder=lambda x: 2 * x - 1, masked=False, prediction_type="sample")
    """

    MASK_RATIO = 0.0
    """The mask ratio passed to the teacher: no masking, so the eps it predicts is deterministic."""

    def __init__(
        self,
        model: Callable[..., Any],
        *,
        encoder: Callable[[torch.Tensor], torch.Tensor],
        masked: bool = True,
        prediction_type: str = "epsilon",
        schedule: NoiseSchedule = DDPM_LINEAR,
        in_channels: int | None = None,
    ) -> None:
        if not callable(model) or not callable(encoder):
            raise TypeError("model and encoder must be callables (nn.Modules or functions)")
        super().__init__(
            schedule=schedule,
            prediction_type=prediction_type,
            in_channels=in_channels if in_channels is not None else denoiser_in_channels(model),
        )
        self.model = model
        self.encoder = encoder
        self.masked = masked

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``(B, C, H, W)`` in ``[0, 1]`` -> ``encoder(images)`` ``(B, in_channels, h, w)``."""
        x0 = self.encoder(check_images(images))
        if self.in_channels is not None and x0.shape[1] != self.in_channels:
            raise ValueError(f"the encoder gave {x0.shape[1]} channels, the model expects {self.in_channels}")
        return x0

    def network_output(self, x_t: torch.Tensor, t: torch.Tensor) -> Any:
        """``model(x_t, t, mask_ratio=0.0)`` (teacher) or ``model(x_t, t)`` (``masked=False``)."""
        if self.masked:
            return self.model(x_t, t, mask_ratio=self.MASK_RATIO)
        return self.model(x_t, t)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, masked={self.masked}"
