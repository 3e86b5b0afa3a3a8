"""DiAD: latent diffusion guided by the input image (He et al., "A Diffusion-Based Framework for Multi-Class
Anomaly Detection", AAAI 2024; code: lewandofskee/DiAD).

DiAD runs Stable Diffusion 1.5 in the latent space of its VAE (f8: 4 x 32 x 32 latents at 256 px, scaled by
0.18215; scaled-linear betas 0.00085 .. 0.012) and adds the Semantic-Guided Network
(:class:`~invert_ad.adapters.sgn.SemanticGuidedNetwork`, a ControlNet-like encoder with an SFF block) whose
hint is the test image itself, with a fixed empty-prompt text context. DiAD normalises images with ImageNet
statistics for both the VAE and the hint, and runs with ``only_mid_control=True``: the UNet receives the
SGN's middle residual and its residuals 9-11 (on the first three decoder skips) only.

:meth:`DiADAdapter.from_checkpoint` builds all of it from DiAD's Lightning checkpoint and its YAML's
``model.params`` (as ``config.json`` records them): the LDM-named UNet and VAE are converted into diffusers
modules (:mod:`~invert_ad.adapters.ldm`), the SGN into a diffusers ``ControlNetModel`` plus SFF.

Because eps depends on the input image, scoring must run inside :meth:`DiADAdapter.condition`, which binds
one batch's hint for the duration of a ``with`` block and yields that batch's latents; every eps call checks
its batch against the bound one.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ._registry import register_adapter
from .base import SD_SCALED_LINEAR, DiffusionAdapter, NoiseSchedule, check_images
from .keys import extract_state_dict, read_checkpoint
from .peer_config import read_peer_config, schedule_from_config

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "NORMALISATIONS", "DiADAdapter", "normalise_images"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

NORMALISATIONS = ("imagenet", "symmetric", "unit")
"""How ``[0, 1]`` images are fed to a network: ``(x - mean) / std`` with ImageNet's statistics (DiAD),
``2 x - 1`` (Stable Diffusion's VAE convention) or unchanged (ControlNet's hint convention)."""


def normalise_images(images: torch.Tensor, kind: str) -> torch.Tensor:
    """Map ``[0, 1]`` images ``(B, 3, H, W)`` as :data:`NORMALISATIONS` ``kind`` says.

    Raises:
        ValueError: an unknown ``kind``.
    """
    if kind == "imagenet":
        mean = images.new_tensor(IMAGENET_MEAN)[:, None, None]
        std = images.new_tensor(IMAGENET_STD)[:, None, None]
        return (images - mean) / std
    if kind == "symmetric":
        return images * 2.0 - 1.0
    if kind == "unit":
        return images
    raise ValueError(f"unknown normalisation {kind!r}; choose one of {NORMALISATIONS}")


@register_adapter("diad")
class DiADAdapter(DiffusionAdapter):
    """Latent diffusion conditioned on the input image: eps = UNet(x_t, t, context, SGN(x_t, t, image)).

    ``x0`` is ``scaling_factor * vae.encode(normalised image).latent_dist.mode()`` (the posterior mean, so
    encoding is deterministic; DiAD itself draws a sample). By default images are normalised as DiAD does,
    with ImageNet statistics for both the VAE and the hint, and only the middle residual and residuals 9-11
    of the guidance network reach the UNet (DiAD's ``only_mid_control=True``).

    The hint is bound per batch: use ``with adapter.condition(images) as x0: scorer.score(x0)`` and score
    only the yielded ``x0`` inside the block. Every eps call checks its batch against the bound images:
    scoring in ``batch_size`` chunks or a batch of another size, nesting blocks, and calling eps outside a
    block raise errors instead of pairing latents with another image's hint. What no check can see is a
    different batch of the same size scored inside the block: the block yields the latents for that reason.
    To score in chunks, use :meth:`score` / :meth:`fit`, which condition each chunk on its own
    images. :meth:`eps` also takes an explicit ``hint=`` (and ``context=``) for functional use.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (eps-prediction).
        controlnet: the guidance network, called like a diffusers ``ControlNetModel`` and returning
            ``(down residuals, mid residual)``: DiAD's :class:`~invert_ad.adapters.sgn.SemanticGuidedNetwork`
            or a plain ``ControlNetModel``.
        vae: a diffusers ``AutoencoderKL``.
        context: the fixed text context (``encoder_hidden_states``), ``(L, D)`` or ``(1, L, D)``, e.g. the CLIP
            embedding of the empty prompt; broadcast to every batch.
        schedule: the training schedule (Stable Diffusion's scaled-linear one by default).
        prediction_type: what ``unet`` predicts.
        scaling_factor: latent scale; default ``vae.config.scaling_factor`` (0.18215 for SD 1.x).
        conditioning_scale: weight of the guidance residuals.
        image_normalisation: how images enter the VAE (:data:`NORMALISATIONS`; DiAD: ``imagenet``).
        hint_normalisation: how images enter the guidance network as the hint (DiAD: ``imagenet``).
        only_mid_control: pass only the middle residual and the last three down residuals to the UNet
            (DiAD: true); false passes all of them (ControlNet).

    Raises:
        ValueError: a context of the wrong rank or width, or an unknown normalisation.
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
        image_normalisation: str = "imagenet",
        hint_normalisation: str = "imagenet",
        only_mid_control: bool = True,
    ) -> None:
        super().__init__(schedule=schedule, prediction_type=prediction_type, in_channels=unet.config.in_channels)
        for name, kind in (("image_normalisation", image_normalisation), ("hint_normalisation", hint_normalisation)):
            if kind not in NORMALISATIONS:
                raise ValueError(f"unknown {name} {kind!r}; choose one of {NORMALISATIONS}")
        self.unet = unet
        self.controlnet = controlnet
        self.vae = vae
        self.register_buffer("context", self._check_context(context, 1), persistent=False)
        self.scaling_factor = float(vae.config.scaling_factor if scaling_factor is None else scaling_factor)
        self.conditioning_scale = float(conditioning_scale)
        self.image_normalisation = image_normalisation
        self.hint_normalisation = hint_normalisation
        self.only_mid_control = bool(only_mid_control)
        self._hint: torch.Tensor | None = None

    def _check_context(self, context: torch.Tensor, batch: int | None) -> torch.Tensor:
        """``(L, D)`` / ``(1, L, D)`` (or ``(batch, L, D)``) -> a detached ``(n, L, D)`` copy."""
        context = context[None] if context.dim() == 2 else context
        if context.dim() != 3 or context.shape[0] not in {1, batch}:
            allowed = "(L, D) or (1, L, D)" + (f" or ({batch}, L, D)" if batch not in (None, 1) else "")
            raise ValueError(f"context must have shape {allowed}, got {tuple(context.shape)}")
        width = self.unet.config.cross_attention_dim
        if context.shape[-1] != width:
            raise ValueError(f"context width {context.shape[-1]} differs from the UNet's cross_attention_dim {width}")
        return context.detach().clone()

    @classmethod
    def from_checkpoint(
        cls,
        source: str | os.PathLike[str] | Mapping[str, Any],
        config: str | os.PathLike[str] | Mapping[str, Any],
        *,
        context: torch.Tensor,
        allow_unsafe_pickle: bool = False,
        **kwargs: Any,
    ) -> DiADAdapter:
        """Build DiAD from the checkpoint its ``train.py`` wrote and the ``model.params`` of its YAML.

        The UNet (``model.diffusion_model.*``) and the VAE (``first_stage_model.*``) are converted into
        diffusers modules, the SGN (``control_model.*``) into a
        :class:`~invert_ad.adapters.sgn.SemanticGuidedNetwork`; each conversion is checked complete. Widths,
        heads, latent size, schedule and scale factor are read from ``config``; nothing assumes DiAD's shipped
        sizes. DiAD's normalisation and ``only_mid_control`` setting are the defaults.

        Args:
            source: DiAD's Lightning ``.ckpt`` (its ``state_dict`` entry is used) or a loaded checkpoint.
            config: a ``config.json`` whose ``full_model_params`` (or ``model.params``) is DiAD's YAML
                ``model.params`` block, or that block itself as a mapping (with ``unet_config``,
                ``control_stage_config``, ``first_stage_config``, ``image_size``, ``scale_factor``,
                ``linear_start``, ``linear_end``, ``timesteps``).
            context: the text context ``(L, D)``: DiAD's CLIP embedding of the empty prompt (the checkpoint's
                ``cond_stage_model`` is a CLIP text encoder, which this library does not run).
            allow_unsafe_pickle: unpickle a file that needs arbitrary Python objects (only for trusted files).
            **kwargs: constructor overrides (e.g. ``only_mid_control``).

        Raises:
            StateDictMismatchError: a part whose converted weights do not fit, or with unconverted weights.
            ValueError: a configuration without the blocks named above.
        """
        from diffusers import AutoencoderKL, UNet2DConditionModel

        from .ldm import LDM_PREFIXES, convert_ldm_weights, unet_config_from_ldm, vae_config_from_ldm
        from .sgn import SemanticGuidedNetwork

        params = _model_params(read_peer_config(config))
        state_dict = extract_state_dict(read_checkpoint(source, allow_unsafe_pickle))
        unet = UNet2DConditionModel(**unet_config_from_ldm(params["unet_config"]["params"], params["image_size"]))
        convert_ldm_weights(state_dict, "unet", unet)
        first_stage = params["first_stage_config"]["params"]
        vae = AutoencoderKL(
            **vae_config_from_ldm(first_stage["ddconfig"], first_stage["embed_dim"], params.get("scale_factor", 1.0))
        )
        convert_ldm_weights(state_dict, "vae", vae)
        prefix = LDM_PREFIXES["controlnet"]
        sgn = SemanticGuidedNetwork.from_ldm_params(
            params["control_stage_config"]["params"],
            {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)},
        )
        kwargs.setdefault("schedule", _ldm_schedule(params))
        kwargs.setdefault("only_mid_control", bool(params.get("only_mid_control", True)))
        return cls(unet, sgn, vae, context, **kwargs).eval()

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
        images = normalise_images(images.to(device=param.device, dtype=param.dtype), self.image_normalisation)
        return self.vae.encode(images).latent_dist.mode() * self.scaling_factor

    @contextlib.contextmanager
    def condition(self, images: torch.Tensor) -> Iterator[torch.Tensor]:
        """Bind ``images`` as the guidance hint for the block and yield their latents ``x0``.

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
                "conditioned batch whole, or in chunks with adapter.score(scorer, images, batch_size=...)"
            )
        expected = tuple(s * self.vae_scale_factor for s in x_t.shape[2:])
        if tuple(hint.shape[2:]) != expected:
            raise ValueError(
                f"hint size {tuple(hint.shape[2:])} does not match latents {tuple(x_t.shape[2:])} "
                f"x {self.vae_scale_factor} = {expected}"
            )
        return normalise_images(hint.to(device=x_t.device, dtype=x_t.dtype), self.hint_normalisation)

    def eps(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor | int,
        hint: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The predicted noise at latents ``x_t (B, 4, h, w)`` given the hint images.

        Args:
            x_t: noisy latents.
            t: integer timesteps, a scalar or ``(B,)``.
            hint: images ``(B, 3, f h, f w)`` in ``[0, 1]``; default: the batch bound by :meth:`condition`.
            context: a text context ``(L, D)``, ``(1, L, D)`` or one per sample ``(B, L, D)``; default: the
                adapter's.

        Returns:
            eps ``(B, 4, h, w)``.

        Raises:
            RuntimeError: no hint given and no batch bound.
            ValueError: the hint's batch or size does not match ``x_t``.
        """
        return self._eps_of(functools.partial(self.network_output, hint=hint, context=context), x_t, t)

    def network_output(
        self, x_t: torch.Tensor, t: torch.Tensor, hint: torch.Tensor | None = None, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        """UNet eps with the guidance residuals of ``hint`` (default: the bound batch)."""
        hint = self._check_hint(hint, x_t)
        context = self.context if context is None else self._check_context(context, x_t.shape[0])
        context = context.to(device=x_t.device, dtype=x_t.dtype).expand(x_t.shape[0], -1, -1)
        down, mid = self.controlnet(
            x_t,
            t,
            encoder_hidden_states=context,
            controlnet_cond=hint,
            conditioning_scale=self.conditioning_scale,
            return_dict=False,
        )
        if self.only_mid_control:  # DiAD: the first three decoder skips get residuals 9-11, the rest nothing
            down = [torch.zeros_like(r) for r in down[:-3]] + list(down[-3:])
        return self.unet(
            x_t,
            t,
            encoder_hidden_states=context,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        ).sample

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, scaling_factor={self.scaling_factor:g}, f={self.vae_scale_factor}, "
            f"image_normalisation={self.image_normalisation!r}, hint_normalisation={self.hint_normalisation!r}, "
            f"only_mid_control={self.only_mid_control}"
        )


def _model_params(config: Mapping[str, Any]) -> dict[str, Any]:
    """DiAD's YAML ``model.params`` inside a peer config (``full_model_params``), a YAML dict or the block itself."""
    for candidate in (config.get("full_model_params"), (config.get("model") or {}).get("params"), config):
        if isinstance(candidate, Mapping) and "unet_config" in candidate:
            needed = ("control_stage_config", "first_stage_config", "image_size")
            absent = [k for k in needed if k not in candidate]
            if absent:
                raise ValueError(f"DiAD model params lack {absent}")
            return dict(candidate)
    raise ValueError(
        "not a DiAD configuration: expected its YAML's model.params (with unet_config, control_stage_config and "
        "first_stage_config), under 'full_model_params' or 'model.params', or as the mapping itself"
    )


def _ldm_schedule(params: Mapping[str, Any]) -> NoiseSchedule:
    """LDM's ``linear`` schedule (``sqrt(beta)`` evenly spaced: scaled-linear) from ``linear_start/end``."""
    if "linear_start" not in params:
        return schedule_from_config(params, SD_SCALED_LINEAR)
    if params.get("beta_schedule", "linear") != "linear":
        raise ValueError(f"LDM beta_schedule {params['beta_schedule']!r} is not supported (only 'linear')")
    return NoiseSchedule(
        "scaled_linear", float(params["linear_start"]), float(params["linear_end"]), int(params.get("timesteps", 1000))
    )
