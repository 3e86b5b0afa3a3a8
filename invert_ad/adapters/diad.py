"""DiAD-style latent diffusion with image-conditioned guidance (He et al., "A Diffusion-Based Framework for
Multi-Class Anomaly Detection", AAAI 2024).

DiAD runs Stable Diffusion 1.5 in the latent space of its VAE (f8: 4 x 32 x 32 latents at 256 px, scaled by
0.18215; scaled-linear betas 0.00085 .. 0.012) and adds a ControlNet-like semantic-guidance network whose
hint is the test image itself, with a fixed empty-prompt text context. Here the components are diffusers
models: ``AutoencoderKL``, ``UNet2DConditionModel`` and ``ControlNetModel`` (standing in for DiAD's SG network:
the same kind of residual injection into the UNet).

Because eps depends on the input image, scoring must run inside :meth:`DiADAdapter.condition`, which binds
one batch's hint for the duration of a ``with`` block and yields that batch's latents; every eps call checks
its batch against the bound one.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from torch import nn

from ._registry import register_adapter
from .base import SD_SCALED_LINEAR, DiffusionAdapter, NoiseSchedule, check_images

__all__ = ["DiADAdapter"]


@register_adapter("diad")
class DiADAdapter(DiffusionAdapter):
    """Latent diffusion conditioned on the input image: eps = UNet(x_t, t, context, ControlNet(x_t, t, image)).

    ``x0`` is ``scaling_factor * vae.encode(2 * image - 1).latent_dist.mode()`` (the posterior mean, so
    encoding is deterministic). The hint fed to the ControlNet is the image in ``[0, 1]`` (ControlNet's
    convention), at image resolution.

    The hint is bound per batch: use ``with adapter.condition(images) as x0: scorer.score(x0)`` and score
    only the yielded ``x0`` inside the block. Every eps call checks its batch against the bound images:
    scoring in ``batch_size`` chunks or a batch of another size, nesting blocks, and calling eps outside a
    block raise errors instead of pairing latents with another image's hint. What no check can see is a
    different batch of the same size scored inside the block: the block yields the latents for that reason.
    To score in chunks, use :meth:`score_images` / :meth:`fit_scorer`, which condition each chunk on its own
    images. :meth:`eps` also takes an explicit ``hint=`` for functional use.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (eps-prediction).
        controlnet: a diffusers ``ControlNetModel`` whose conditioning embedding downsamples the hint to the
            latent grid.
        vae: a diffusers ``AutoencoderKL``.
        context: the fixed text context (``encoder_hidden_states``), ``(L, D)`` or ``(1, L, D)``, e.g. the CLIP
            embedding of the empty prompt; broadcast to every batch.
        schedule: the training schedule (Stable Diffusion's scaled-linear one by default).
        prediction_type: what ``unet`` predicts.
        scaling_factor: latent scale; default ``vae.config.scaling_factor`` (0.18215 for SD 1.x).
        conditioning_scale: weight of the ControlNet residuals.

    Raises:
        ValueError: a context of the wrong rank or width.
    """

    def __init__(
        self,
        unet: nn.Module,
        controlnet: nn.Module,
        vae: nn.Module,
        context: torch.Tensor,
        *,
        schedule: NoiseSchedule = SD_SCALED_LINEAR,
        prediction_type: str = "epsilon",
        scaling_factor: float | None = None,
        conditioning_scale: float = 1.0,
    ) -> None:
        super().__init__(schedule=schedule, prediction_type=prediction_type, in_channels=unet.config.in_channels)
        context = context[None] if context.dim() == 2 else context
        if context.dim() != 3 or context.shape[0] != 1:
            raise ValueError(f"context must have shape (L, D) or (1, L, D), got {tuple(context.shape)}")
        width = unet.config.cross_attention_dim
        if context.shape[-1] != width:
            raise ValueError(f"context width {context.shape[-1]} differs from the UNet's cross_attention_dim {width}")
        self.unet = unet
        self.controlnet = controlnet
        self.vae = vae
        self.register_buffer("context", context.detach().clone(), persistent=False)
        self.scaling_factor = float(vae.config.scaling_factor if scaling_factor is None else scaling_factor)
        self.conditioning_scale = float(conditioning_scale)
        self._hint: torch.Tensor | None = None

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent position along each side (8 for SD's VAE)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` in ``[0, 1]`` -> scaled VAE latents ``(B, 4, H / f, W / f)``.

        Pure: binds nothing. To score, use :meth:`condition`, which also binds the hint.
        """
        images = check_images(images, self.vae.config.in_channels)
        param = next(self.vae.parameters())
        images = images.to(device=param.device, dtype=param.dtype)
        return self.vae.encode(images * 2.0 - 1.0).latent_dist.mode() * self.scaling_factor

    @contextlib.contextmanager
    def condition(self, images: torch.Tensor) -> Iterator[torch.Tensor]:
        """Bind ``images`` as the ControlNet hint for the block and yield their latents ``x0``.

        Args:
            images: ``(B, 3, H, W)`` in ``[0, 1]``; ``H`` and ``W`` multiples of :attr:`vae_scale_factor`.

        Yields:
            ``x0 (B, 4, H / f, W / f)``; score exactly this batch inside the block.

        Raises:
            RuntimeError: a block is already open on this adapter (one batch at a time).
        """
        if self._hint is not None:
            raise RuntimeError(
                "DiADAdapter is already conditioned on a batch: close that `with adapter.condition(...)` block "
                "before opening another"
            )
        x0 = self.encode(images)
        self._hint = images
        try:
            yield x0
        finally:
            self._hint = None

    def _check_hint(self, hint: torch.Tensor | None, x_t: torch.Tensor) -> torch.Tensor:
        if hint is None:
            hint = self._hint
            if hint is None:
                raise RuntimeError(
                    "DiADAdapter's eps depends on the input image: score inside "
                    "`with adapter.condition(images) as x0: ...`, or pass hint= to eps"
                )
        else:
            hint = check_images(hint, self.vae.config.in_channels)
        if hint.shape[0] != x_t.shape[0]:
            raise ValueError(
                f"eps got a batch of {x_t.shape[0]} latents but the hint holds {hint.shape[0]} images: score the "
                "conditioned batch whole, or in chunks with adapter.score_images(scorer, images, batch_size=...)"
            )
        expected = tuple(s * self.vae_scale_factor for s in x_t.shape[2:])
        if tuple(hint.shape[2:]) != expected:
            raise ValueError(
                f"hint size {tuple(hint.shape[2:])} does not match latents {tuple(x_t.shape[2:])} "
                f"x {self.vae_scale_factor} = {expected}"
            )
        return hint.to(device=x_t.device, dtype=x_t.dtype)

    def eps(self, x_t: torch.Tensor, t: torch.Tensor | int, hint: torch.Tensor | None = None) -> torch.Tensor:
        """The predicted noise at latents ``x_t (B, 4, h, w)`` given the hint images.

        Args:
            x_t: noisy latents.
            t: integer timesteps, a scalar or ``(B,)``.
            hint: images ``(B, 3, f h, f w)`` in ``[0, 1]``; default: the batch bound by :meth:`condition`.

        Returns:
            eps ``(B, 4, h, w)``.

        Raises:
            RuntimeError: no hint given and no batch bound.
            ValueError: the hint's batch or size does not match ``x_t``.
        """
        return self._eps_of(functools.partial(self.predict, hint=hint), x_t, t)

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, hint: torch.Tensor | None = None) -> torch.Tensor:
        """UNet eps with the ControlNet residuals of ``hint`` (default: the bound batch)."""
        hint = self._check_hint(hint, x_t)
        context = self.context.to(dtype=x_t.dtype).expand(x_t.shape[0], -1, -1)
        down, mid = self.controlnet(
            x_t,
            t,
            encoder_hidden_states=context,
            controlnet_cond=hint,
            conditioning_scale=self.conditioning_scale,
            return_dict=False,
        )
        return self.unet(
            x_t,
            t,
            encoder_hidden_states=context,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        ).sample

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scaling_factor={self.scaling_factor:g}, f={self.vae_scale_factor}"
