"""The adapter contract: a trained diffusion anomaly detector seen as ``encode(images)`` plus ``eps(x_t, t)``.

An adapter owns everything that differs between detectors (input range, latent space, conditioning, what the
network predicts, how it is called) and exposes one interface that :class:`~invert_ad.InversionScorer`
understands. Calling an adapter returns eps, so it is itself a valid denoiser::

    adapter = DDADAdapter(unet)
    scorer = InversionScorer(adapter, adapter.scheduler, timesteps="paper", scoring="nll")
    with adapter.condition(images) as x0:           # images (B, 3, H, W) in [0, 1]
        out = scorer.score(x0)
    pixel_maps = adapter.to_pixel_map(out.raw_map, images.shape[-2:])

``condition`` is the uniform entry point: for unconditional models it only encodes, for image-conditioned
models (:class:`~invert_ad.adapters.DiADAdapter`) it also binds the batch's conditioning for the duration
of the block. :meth:`DiffusionAdapter.fit` and :meth:`DiffusionAdapter.score` do the same
chunk by chunk (``adapter.score(scorer, images, batch_size=8)``).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from ..denoiser import make_eps_fn
from ..schedule import BETA_SCHEDULES, PREDICTION_TYPES, schedule_alphas_cumprod
from ..scoring import ScoreOutput, upsample_maps

if TYPE_CHECKING:
    from ..scorer import InversionScorer

__all__ = ["DDPM_LINEAR", "SD_SCALED_LINEAR", "AdapterConfig", "DiffusionAdapter", "NoiseSchedule", "check_images"]


@dataclass(frozen=True)
class NoiseSchedule:
    """A DDPM beta schedule, computed in float64.

    Args:
        beta_schedule: ``linear`` (``beta_t`` evenly spaced from ``beta_start`` to ``beta_end``) or
            ``scaled_linear`` (``sqrt(beta_t)`` evenly spaced, Stable Diffusion's schedule).
        beta_start: ``beta_0``.
        beta_end: ``beta_{T-1}``.
        num_train_timesteps: T.
    """

    beta_schedule: Literal["linear", "scaled_linear"] = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    num_train_timesteps: int = 1000

    def alphas_cumprod(self) -> torch.Tensor:
        """``prod_{s<=t} (1 - beta_s)``, float64 of shape ``(T,)``.

        Raises:
            ValueError: an unknown ``beta_schedule`` or betas outside ``(0, 1)``.
        """
        n = self.num_train_timesteps
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"unknown beta_schedule {self.beta_schedule!r}; choose one of {BETA_SCHEDULES}")
        if n < 2 or not 0.0 < self.beta_start <= self.beta_end < 1.0:
            raise ValueError(f"need T >= 2 and 0 < beta_start <= beta_end < 1, got {self}")
        return schedule_alphas_cumprod(n, self.beta_start, self.beta_end, self.beta_schedule)


DDPM_LINEAR = NoiseSchedule("linear", 1e-4, 0.02, 1000)
"""DDPM's schedule (DDAD, DiffusionAD, InvAD): linear betas 1e-4 .. 0.02, T = 1000."""

SD_SCALED_LINEAR = NoiseSchedule("scaled_linear", 0.00085, 0.012, 1000)
"""Stable Diffusion 1.x's schedule (DiAD): scaled-linear betas 0.00085 .. 0.012, T = 1000."""


@dataclass(frozen=True)
class AdapterConfig:
    """What an adapter declares about its eps network (read by ``InversionScorer`` for channel checks).

    Attributes:
        in_channels: channels of ``x_t`` in the model's space (``None``: unknown, not checked).
        prediction_type: what the wrapped network predicts (the adapter always returns eps).
        num_train_timesteps: T of the schedule.
    """

    in_channels: int | None
    prediction_type: str
    num_train_timesteps: int


def check_images(images: Any, channels: int | None = None) -> torch.Tensor:
    """Validate a batch of images ``(B, C, H, W)`` with values in ``[0, 1]``; return it.

    Args:
        images: the batch.
        channels: the required ``C`` (``None``: any).

    Raises:
        TypeError: not a tensor.
        ValueError: wrong rank, empty batch, wrong channel count, non-finite values or values outside
            ``[0, 1]`` (e.g. images already normalised with ImageNet statistics or mapped to ``[-1, 1]``).
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor of shape (B, C, H, W), got {type(images).__name__}")
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"images must have shape (B, C, H, W) with B > 0, got {tuple(images.shape)}")
    if channels is not None and images.shape[1] != channels:
        raise ValueError(f"images have {images.shape[1]} channels, the model expects {channels}")
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or infinite values")
    lo, hi = float(images.min()), float(images.max())
    if lo < -1e-3 or hi > 1.0 + 1e-3:
        raise ValueError(
            f"images must hold values in [0, 1] (the adapter maps them to the model's range), got [{lo:.3g}, {hi:.3g}]"
        )
    return images


class DiffusionAdapter(nn.Module, ABC):
    """A trained diffusion model exposed as ``encode(images) -> x0`` and ``eps(x_t, t)`` in its own space.

    Subclasses implement :meth:`encode` and :meth:`network_output` (the network's native prediction). The base class
    validates timesteps, converts ``v_prediction`` / ``sample`` outputs to eps, and builds the diffusers
    scheduler carrying the schedule. An adapter is an ``nn.Module`` holding the wrapped networks, so ``.to``,
    ``.eval`` and ``.parameters`` reach them; ``adapter(x_t, t)`` returns eps.

    Args:
        schedule: the noise schedule the model was trained with.
        prediction_type: what :meth:`network_output` returns: ``epsilon``, ``v_prediction`` or ``sample`` (x0).
        in_channels: channels of ``x_t`` (declared in :attr:`config` for channel checks), ``None`` if unknown.

    Raises:
        ValueError: an unknown ``prediction_type``.
    """

    def __init__(
        self, *, schedule: NoiseSchedule, prediction_type: str = "epsilon", in_channels: int | None = None
    ) -> None:
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unsupported prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.in_channels = in_channels
        # A plain attribute, not a buffer: ``.to(torch.float16)`` must not round the schedule.
        self._alphas_cumprod = schedule.alphas_cumprod()

    # ------------------------------------------------------------------ schedule
    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """Alpha-bar of the schedule, float64 of shape ``(T,)`` on the CPU (a copy)."""
        return self._alphas_cumprod.clone()

    @property
    def num_train_timesteps(self) -> int:
        """T of the schedule."""
        return len(self._alphas_cumprod)

    @property
    def config(self) -> AdapterConfig:
        """The adapter's declared ``in_channels``, ``prediction_type`` and T."""
        return AdapterConfig(self.in_channels, self.prediction_type, self.num_train_timesteps)

    @property
    def scheduler(self) -> Any:
        """A fresh diffusers ``DDPMScheduler`` with this schedule, for ``InversionScorer(adapter, adapter.scheduler)``.

        Its ``config.prediction_type`` is ``epsilon`` whatever :attr:`prediction_type` is, because calling the
        adapter already returns eps (a second conversion would be wrong). ``clip_sample`` is off. Its
        ``alphas_cumprod`` is replaced by the adapter's float64 values, so the scorer integrates exactly
        :attr:`alphas_cumprod` rather than diffusers' float32 recomputation.
        """
        from diffusers import DDPMScheduler

        s = self.schedule
        scheduler = DDPMScheduler(
            num_train_timesteps=s.num_train_timesteps,
            beta_start=s.beta_start,
            beta_end=s.beta_end,
            beta_schedule=s.beta_schedule,
            prediction_type="epsilon",
            clip_sample=False,
        )
        scheduler.alphas_cumprod = self.alphas_cumprod
        return scheduler

    # ------------------------------------------------------------------ the contract
    @abstractmethod
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Map images ``(B, 3, H, W)`` in ``[0, 1]`` to the clean sample ``x0 (B, C, h, w)`` in the model's space."""

    @abstractmethod
    def network_output(self, x_t: torch.Tensor, t: torch.Tensor) -> Any:
        """The wrapped network's native output at ``x_t (B, C, h, w)`` and timesteps ``t (B,)`` long.

        Returns:
            A tensor of the shape of ``x_t`` (or ``2C`` channels for learned-sigma models, eps first), or an
            object with ``.sample``, or a tuple whose first item is that tensor.
        """

    @contextlib.contextmanager
    def condition(self, images: torch.Tensor) -> Iterator[torch.Tensor]:
        """Encode a batch and make the adapter ready to score it; yields ``x0 (B, C, h, w)``.

        Unconditional models need no state, so this only encodes. Image-conditioned adapters override it to
        bind the batch's conditioning for the duration of the ``with`` block; writing every scoring call as
        ``with adapter.condition(images) as x0: scorer.score(x0)`` works for all adapters.
        """
        yield self.encode(images)

    def _chunks(self, images: torch.Tensor, batch_size: int | None) -> list[torch.Tensor]:
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        return [images] if batch_size is None else list(images.split(batch_size))

    def fit(
        self, scorer: InversionScorer, normal_images: torch.Tensor, batch_size: int | None = None
    ) -> InversionScorer:
        """Calibrate ``scorer`` (built on this adapter) on defect-free images, each chunk under :meth:`condition`.

        Args:
            scorer: an :class:`~invert_ad.InversionScorer` whose denoiser is this adapter.
            normal_images: ``(N, 3, H, W)`` in ``[0, 1]``, never the test set.
            batch_size: images per conditioned chunk (``None``: one chunk).

        Returns:
            ``scorer``, fitted.
        """
        latents = []
        for chunk in self._chunks(normal_images, batch_size):
            with self.condition(chunk) as x0:
                latents.append(scorer.latents(x0))
        return scorer.fit_latents(torch.cat(latents))

    def score(self, scorer: InversionScorer, images: torch.Tensor, batch_size: int | None = None) -> ScoreOutput:
        """Score images with ``scorer``, each chunk encoded and scored under its own :meth:`condition` block.

        The safe way to score an image-conditioned model in chunks: every chunk's latents meet only that
        chunk's conditioning.

        Args:
            scorer: an :class:`~invert_ad.InversionScorer` whose denoiser is this adapter.
            images: ``(B, 3, H, W)`` in ``[0, 1]``.
            batch_size: images per conditioned chunk (``None``: one chunk).

        Returns:
            The concatenated :class:`~invert_ad.ScoreOutput`: ``raw_score (B,)`` and ``raw_map (B, h, w)`` on the
            model's grid (higher is more anomalous; see :meth:`to_pixel_map`), ``latent (B, C, h, w)``.
        """
        outputs = []
        for chunk in self._chunks(images, batch_size):
            with self.condition(chunk) as x0:
                outputs.append(scorer.score(x0))
        return ScoreOutput.cat(outputs)

    def _timesteps(self, t: Any, batch_size: int, device: torch.device) -> torch.Tensor:
        """Broadcast a scalar or ``(B,)`` integer timestep to ``(B,)`` long on ``device``, checked against T."""
        t = torch.as_tensor(t, device=device).reshape(-1)
        if t.numel() == 1:
            t = t.expand(batch_size)
        if t.shape != (batch_size,):
            raise ValueError(f"t must be a scalar or have shape ({batch_size},), got {tuple(t.shape)}")
        if t.is_floating_point() and not torch.equal(t, t.round()):
            raise ValueError("t must hold integer training timesteps")
        t = t.long()
        if (t < 0).any() or (t >= self.num_train_timesteps).any():
            raise ValueError(f"t must lie in [0, {self.num_train_timesteps - 1}], got {t.tolist()}")
        return t

    def eps(self, x_t: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """The predicted noise at ``x_t``.

        Args:
            x_t: noisy samples ``(B, C, h, w)`` in the model's space.
            t: integer training timesteps, a scalar or ``(B,)``.

        Returns:
            eps ``(B, C, h, w)``, dtype of the network's output.

        Raises:
            ValueError: timesteps of the wrong shape or out of range, or an output whose shape does not match.
        """
        return self._eps_of(self.network_output, x_t, t)

    def _eps_of(self, predict: Callable[[torch.Tensor, torch.Tensor], Any], x_t: torch.Tensor, t: Any) -> torch.Tensor:
        """Validate ``t``, call ``predict`` and convert its output to eps (learned sigma: first ``C`` channels)."""
        t = self._timesteps(t, x_t.shape[0], x_t.device)
        return make_eps_fn(predict, self._alphas_cumprod, self.prediction_type)(x_t, t)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """Same as :meth:`eps`, so an adapter is a denoiser for ``InversionScorer``."""
        return self.eps(x_t, t)

    def to_pixel_map(self, maps: torch.Tensor, image_size: int | tuple[int, int] | torch.Size) -> torch.Tensor:
        """Bring maps on the model's grid back to image resolution by bilinear upsampling.

        Args:
            maps: ``(B, h, w)`` anomaly maps on the latent grid (e.g. ``ScoreOutput.raw_map``).
            image_size: ``H`` (square) or ``(H, W)``.

        Returns:
            ``(B, H, W)`` in the dtype of ``maps`` (``align_corners=False``, no smoothing; identity when the
            sizes already match).
        """
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(int(s) for s in image_size)
        return upsample_maps(maps, size).to(maps.dtype)

    def extra_repr(self) -> str:
        return (
            f"prediction_type={self.prediction_type!r}, in_channels={self.in_channels}, "
            f"schedule={self.schedule.beta_schedule} {self.schedule.beta_start:g}..{self.schedule.beta_end:g} "
            f"T={self.num_train_timesteps}"
        )
