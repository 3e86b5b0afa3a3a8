"""Gaussian priors that do not assume aligned parts: one Gaussian shared by all positions, or per position with
statistics pooled over a neighbourhood.

:class:`SharedGaussianDenoiser` fits a single ``N(mu, Sigma)`` to the features of every grid position of every
training image and returns its exact eps (the formula of :mod:`invert_ad.models.gaussian` with one mean and one
covariance for all positions). It is translation-equivariant, so it suits parts that move from image to image
(tires, screws); its buffers are ``C x C`` whatever the grid, so it scales to fine grids.

:func:`fit_neighbourhood_gaussian` fits a per-position :class:`~invert_ad.models.GaussianDenoiser` whose
statistics at position ``p`` are estimated from the features at every position within a ``k x k`` window around
``p`` (of every training image): a middle ground between per-position (``k = 1``) and shared statistics.

:func:`whiten` maps features to their whitened deviation ``Lambda^{-1/2} U^T (x - mu)`` under either kind of
Gaussian: the exact end point of the probability-flow ODE with terminal alpha-bar 0, whose channel norm is the
Mahalanobis distance (the PaDiM statistic when the Gaussian is per position).

Memory of the statistics, float32, ``C = 192`` channels (lite0 blocks 1..4):

===========  =================================  ================
grid         per-position full (``P C^2``)      shared (``C^2``)
===========  =================================  ================
16 x 16      37.7 MB                            147 kB
32 x 32      151 MB                             147 kB
64 x 64      604 MB                             147 kB
===========  =================================  ================
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from ._layers import DenoiserOutput, alpha_bars_at, check_sample, grid_hw
from .gaussian import GaussianDenoiser, ledoit_wolf, schedule_alphas_cumprod

__all__ = [
    "SharedGaussianDenoiser",
    "covariance_bytes",
    "fit_neighbourhood_gaussian",
    "streaming_ledoit_wolf",
    "whiten",
]

SHARED_COVARIANCES = ("full", "diagonal")


def covariance_bytes(channels: int, grid: tuple[int, int] | int, shared: bool = False, itemsize: int = 4) -> int:
    """Bytes of the eigenvector buffers of a full-covariance Gaussian prior.

    Args:
        channels: C.
        grid: ``(h, w)`` or one int.
        shared: one covariance for all positions (else one per position).
        itemsize: bytes per value (4 for float32).

    Returns:
        ``C^2 * itemsize`` when shared, else ``h * w * C^2 * itemsize``.
    """
    h, w = (grid, grid) if isinstance(grid, int) else grid
    return channels * channels * itemsize * (1 if shared else h * w)


def _samples(features: torch.Tensor, chunk_size: int) -> Iterator[torch.Tensor]:
    """Chunks of position vectors ``(n, C)`` float64 of features ``(N, C, h, w)``, images in chunks."""
    for chunk in features.split(chunk_size):
        yield chunk.detach().permute(0, 2, 3, 1).reshape(-1, chunk.shape[1]).to(torch.float64)


def streaming_ledoit_wolf(
    features: torch.Tensor, chunk_size: int = 16
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean and Ledoit-Wolf covariance of all position vectors of ``features``, two passes over image chunks.

    The same estimate as :func:`~invert_ad.models.ledoit_wolf` (and ``sklearn.covariance.LedoitWolf``) on the
    ``(N h w, C)`` matrix of position vectors, without holding that matrix in float64 at once.

    Args:
        features: ``(N, C, h, w)``.
        chunk_size: images per pass step.

    Returns:
        ``mean (C,)``, the shrunk ``covariance (C, C)``, the empirical (biased) covariance ``(C, C)`` and the
        ``shrinkage ()``, all float64.
    """
    c = features.shape[1]
    n = features.shape[0] * features.shape[2] * features.shape[3]
    total = torch.zeros(c, dtype=torch.float64)
    for x in _samples(features, chunk_size):
        total += x.sum(0)
    mean = total / n
    emp = torch.zeros(c, c, dtype=torch.float64)
    fourth = torch.zeros((), dtype=torch.float64)
    for x in _samples(features, chunk_size):
        x = x - mean
        emp += x.T @ x
        fourth += x.square().sum(1).square().sum()
    emp /= n
    mu = emp.diagonal().sum() / c
    emp_sq = emp.square().sum()
    # beta: variance of the entries of x x^T around S; delta: squared distance of S from mu I (both / C)
    beta = (fourth / n - emp_sq) / (c * n)
    delta = (emp_sq - c * mu.square()) / c
    beta = torch.minimum(beta, delta)
    shrinkage = torch.where(delta > 0, beta / delta.clamp_min(torch.finfo(delta.dtype).tiny), 0.0)
    covariance = (1 - shrinkage) * emp + shrinkage * mu * torch.eye(c, dtype=torch.float64)
    return mean, covariance, emp, shrinkage


class SharedGaussianDenoiser(ModelMixin, ConfigMixin):
    """Closed-form eps of one Gaussian prior shared by every grid position; nothing to train.

    If every position's features are ``N(mu, Sigma)`` with ``Sigma = U diag(l) U^T``, the optimal noise
    prediction at alpha-bar ``a`` is ``eps*(x_t, t) = sqrt(1 - a) U diag(1 / (a l + 1 - a)) U^T (x_t - sqrt(a) mu)``
    at every position. Build it with :meth:`fit`. Buffers (saved by ``save_pretrained``): ``mean`` ``(C,)``,
    ``eigenvalues`` ``(C,)`` and, for a full covariance, ``eigenvectors`` ``(C, C)`` (columns). Before fitting
    they describe ``N(0, I)``.

    Args:
        in_channels: feature channels C.
        sample_size: the feature grid an int (square) or ``(h, w)``; inputs must have it (so exported graphs
            keep a fixed shape), though the statistics themselves are grid-free.
        covariance: ``full`` or ``diagonal``.
        num_train_timesteps: T of the diffusion schedule the eps belongs to.
        beta_start: first beta of that schedule.
        beta_end: last beta.
        beta_schedule: ``linear`` or ``scaled_linear``.

    Raises:
        ValueError: an unknown ``covariance`` or ``beta_schedule``.

    Example:
        >>> model = SharedGaussianDenoiser.fit(torch.randn(16, 8, 4, 4))
        >>> model(torch.randn(2, 8, 4, 4), torch.tensor([0, 999])).sample.shape
        torch.Size([2, 8, 4, 4])
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
    ) -> None:
        super().__init__()
        if covariance not in SHARED_COVARIANCES:
            raise ValueError(f"unknown covariance {covariance!r}; choose one of {SHARED_COVARIANCES}")
        self.grid = grid_hw(sample_size)
        self.alphas_cumprod = schedule_alphas_cumprod(num_train_timesteps, beta_start, beta_end, beta_schedule)
        self.register_buffer("mean", torch.zeros(in_channels))
        self.register_buffer("eigenvalues", torch.ones(in_channels))
        if covariance == "full":
            self.register_buffer("eigenvectors", torch.eye(in_channels))

    @classmethod
    def fit(
        cls,
        features: torch.Tensor,
        *,
        shrinkage: Literal["ledoit_wolf", "diagonal"] = "ledoit_wolf",
        min_variance: float = 1e-6,
        chunk_size: int = 16,
        **schedule: int | float | str,
    ) -> SharedGaussianDenoiser:
        """Fit one mean and covariance to every position vector of the training features.

        Args:
            features: features of normal images ``(N, C, h, w)``, at least two position vectors in all.
            shrinkage: ``ledoit_wolf`` (full covariance) or ``diagonal`` (per-channel variances only).
            min_variance: floor for the eigenvalues (variances).
            chunk_size: images per step of the two passes (bounds the float64 working memory).
            **schedule: ``num_train_timesteps``, ``beta_start``, ``beta_end``, ``beta_schedule``.

        Returns:
            A fitted :class:`SharedGaussianDenoiser` on the CPU with float32 buffers.

        Raises:
            ValueError: features not ``(N, C, h, w)`` with ``N h w >= 2``, non-finite values, or an unknown
                ``shrinkage``.
        """
        _check_fit_features(features, shrinkage, min_positions=2)
        _, channels, h, w = features.shape
        model = cls(
            in_channels=channels,
            sample_size=h if h == w else (h, w),
            covariance="full" if shrinkage == "ledoit_wolf" else "diagonal",
            **schedule,
        )
        mean, covariance, empirical, _ = streaming_ledoit_wolf(features, chunk_size)
        model.mean.copy_(mean)
        if shrinkage == "diagonal":  # plain per-channel variances, as GaussianDenoiser's diagonal fit
            model.eigenvalues.copy_(empirical.diagonal().clamp_min(min_variance))
            return model
        values, vectors = torch.linalg.eigh(covariance)
        model.eigenvalues.copy_(values.clamp_min(min_variance))
        model.eigenvectors.copy_(vectors)
        return model

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor | int, return_dict: bool = True
    ) -> DenoiserOutput | tuple[torch.Tensor]:
        """The exact eps of the fitted shared Gaussian at noise level ``t``.

        Args:
            sample: noisy features ``(B, C, h, w)``.
            timestep: integer training timesteps in ``[0, T - 1]``, a scalar or ``(B,)``.
            return_dict: return a :class:`DenoiserOutput` (else a 1-tuple).

        Returns:
            eps ``(B, C, h, w)`` in the dtype of ``sample``.

        Raises:
            ValueError: a wrong input shape or a timestep outside ``[0, T - 1]``.
        """
        check_sample(sample, self.config.in_channels, self.grid)
        b = sample.shape[0]
        ab = alpha_bars_at(self.alphas_cumprod, timestep, b, sample.device)  # float64 (B,)
        dtype = self.mean.dtype
        with torch.autocast(device_type=sample.device.type, enabled=False):
            x = sample.to(dtype)
            root = ab.sqrt().to(dtype)[:, None, None, None]
            deviation = x - root * self.mean[None, :, None, None]
            # gain (B, C): sqrt(1 - a) / (a l + 1 - a) per eigen-direction
            gain = (1 - ab).sqrt().to(dtype)[:, None] / (
                ab.to(dtype)[:, None] * self.eigenvalues + (1 - ab).to(dtype)[:, None]
            )
            if self.config.covariance == "diagonal":
                eps = gain[:, :, None, None] * deviation
            else:
                vectors = self.eigenvectors
                rotated = torch.einsum("ij,bihw->bjhw", vectors, deviation)  # U^T d
                eps = torch.einsum("ij,bjhw->bihw", vectors, gain[:, :, None, None] * rotated)
        out = eps.to(sample.dtype)
        return DenoiserOutput(sample=out) if return_dict else (out,)


def _check_fit_features(features: torch.Tensor, shrinkage: str, min_positions: int) -> None:
    if shrinkage not in ("ledoit_wolf", "diagonal"):
        raise ValueError(f"unknown shrinkage {shrinkage!r}; choose one of ('ledoit_wolf', 'diagonal')")
    if features.dim() != 4:
        raise ValueError(f"features must have shape (N, C, h, w), got {tuple(features.shape)}")
    if features.shape[0] * features.shape[2] * features.shape[3] < min_positions:
        raise ValueError(f"features must hold at least {min_positions} position vectors, got {tuple(features.shape)}")
    if not torch.isfinite(features).all():
        raise ValueError("features contain NaN or infinite values")


def fit_neighbourhood_gaussian(
    features: torch.Tensor,
    window: int = 3,
    *,
    shrinkage: Literal["ledoit_wolf", "diagonal"] = "ledoit_wolf",
    min_variance: float = 1e-6,
    chunk_size: int = 8,
    **schedule: int | float | str,
) -> GaussianDenoiser:
    """A per-position :class:`~invert_ad.models.GaussianDenoiser` whose statistics pool a ``k x k`` window.

    The mean and the (Ledoit-Wolf) covariance at position ``p`` are those of the features at every position
    within ``window // 2`` rows and columns of ``p`` (clipped at the border) across all training images.
    ``window = 1`` is :meth:`GaussianDenoiser.fit`; a window covering the grid approaches
    :class:`SharedGaussianDenoiser` (away from the borders).

    Args:
        features: features of normal images ``(N, C, h, w)``.
        window: odd side ``k`` of the neighbourhood, in grid cells.
        shrinkage: ``ledoit_wolf`` (full covariance) or ``diagonal``.
        min_variance: floor for the eigenvalues.
        chunk_size: positions processed at once.
        **schedule: the diffusion schedule (see :meth:`GaussianDenoiser.fit`).

    Returns:
        A fitted :class:`~invert_ad.models.GaussianDenoiser` with float32 buffers, on the CPU.

    Raises:
        ValueError: an even or non-positive ``window``, features not ``(N, C, h, w)`` with ``N >= 2``,
            non-finite values, or an unknown ``shrinkage``.
    """
    if not isinstance(window, int) or window < 1 or window % 2 == 0:
        raise ValueError(f"window must be a positive odd int, got {window!r}")
    _check_fit_features(features, shrinkage, min_positions=2)
    if features.shape[0] < 2:
        raise ValueError(f"features must have shape (N, C, h, w) with N >= 2, got {tuple(features.shape)}")
    _, channels, h, w = features.shape
    model = GaussianDenoiser(
        in_channels=channels,
        sample_size=h if h == w else (h, w),
        covariance="full" if shrinkage == "ledoit_wolf" else "diagonal",
        **schedule,
    )
    r = window // 2
    rows = torch.arange(h)
    cols = torch.arange(w)
    positions = [(i, j) for i in range(h) for j in range(w)]
    for start in range(0, len(positions), chunk_size):
        block = positions[start : start + chunk_size]
        samples = []
        for i, j in block:
            near_rows = rows[max(0, i - r) : i + r + 1]
            near_cols = cols[max(0, j - r) : j + r + 1]
            patch = features[:, :, near_rows][:, :, :, near_cols]  # (N, C, kh, kw)
            samples.append(patch.permute(0, 2, 3, 1).reshape(-1, channels).to(torch.float64))
        for (i, j), x in zip(block, samples, strict=True):
            p = i * w + j
            model.mean[p] = x.mean(0).float()
            if shrinkage == "diagonal":
                model.eigenvalues[p] = x.var(0, correction=0).clamp_min(min_variance).float()
            else:
                values, vectors = torch.linalg.eigh(ledoit_wolf(x)[0])
                model.eigenvalues[p] = values.clamp_min(min_variance).float()
                model.eigenvectors[p] = vectors.float()
    return model


def whiten(model: GaussianDenoiser | SharedGaussianDenoiser, features: torch.Tensor) -> torch.Tensor:
    """The whitened deviation ``Lambda^{-1/2} U^T (x - mu)`` of features under a fitted Gaussian prior.

    Its channel norm is the Mahalanobis distance of each position's feature; it is the end point of the exact
    probability-flow ODE for the Gaussian (rotated into its eigenbasis, which leaves norms unchanged).

    Args:
        model: a fitted :class:`~invert_ad.models.GaussianDenoiser` (per position) or
            :class:`SharedGaussianDenoiser`.
        features: ``(B, C, h, w)`` on the model's grid.

    Returns:
        ``(B, C, h, w)`` float32 coordinates in the eigenbasis, each ``N(0, 1)`` under the prior.
    """
    check_sample(features, model.config.in_channels, model.grid)
    b, c, h, w = features.shape
    x = features.to(model.mean.dtype)
    scale = model.eigenvalues.rsqrt()
    if isinstance(model, SharedGaussianDenoiser):
        deviation = (x - model.mean[None, :, None, None]).flatten(2).transpose(1, 2)  # (B, P, C)
        rotated = deviation @ model.eigenvectors if model.config.covariance == "full" else deviation
        out = rotated * scale
    else:
        deviation = x.flatten(2).transpose(1, 2) - model.mean  # (B, P, C)
        if model.config.covariance == "full":
            rotated = torch.einsum("pij,bpi->bpj", model.eigenvectors, deviation)
        else:
            rotated = deviation
        out = rotated * scale
    return out.transpose(1, 2).reshape(b, c, h, w).float()
