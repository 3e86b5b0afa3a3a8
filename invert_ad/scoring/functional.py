"""Pure statistics of latents: Gaussian NLL, channel-norm maps and their spread.

Shapes: latents ``z`` are ``(B, C, h, w)``; maps are ``(B, h, w)``; image statistics are ``(B,)``.
Higher always means more anomalous.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["gaussian_nll", "max_min", "norm_map", "standardize", "upsample_maps"]


def gaussian_nll(z: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood under N(0, I) in nats: ``0.5 * sum z^2 + (D / 2) log(2 pi)``, shape ``(B,)``.

    Computed in float64 (a 49k-dimensional sum loses digits in float32), returned as float64.
    """
    z = z.to(torch.float64).flatten(1)
    return 0.5 * z.square().sum(dim=1) + 0.5 * z.shape[1] * math.log(2.0 * math.pi)


def norm_map(z: torch.Tensor) -> torch.Tensor:
    """Per-position L2 norm over channels, ``A[b, i, j] = ||z[b, :, i, j]||_2``: ``(B, C, h, w) -> (B, h, w)``.

    Computed in at least float32 (half-precision latents are upcast).
    """
    if z.dim() != 4:
        raise ValueError(f"expected latents of shape (B, C, h, w), got {tuple(z.shape)}")
    return torch.linalg.vector_norm(z.to(torch.promote_types(z.dtype, torch.float32)), dim=1)


def max_min(maps: torch.Tensor) -> torch.Tensor:
    """InvAD's "Diff" statistic ``max(A) - min(A)`` per map: ``(B, h, w) -> (B,)``."""
    flat = maps.flatten(1)
    return flat.amax(dim=1) - flat.amin(dim=1)


def standardize(values: torch.Tensor, location: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``(values - location) / scale``, with a zero scale treated as one."""
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (values - location) / scale


def upsample_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of maps ``(B, h, w) -> (B, H, W)`` with ``align_corners=False`` (the official code's choice).

    Computed in at least float32; the result has that dtype.
    """
    if maps.dim() != 3:
        raise ValueError(f"expected maps of shape (B, h, w), got {tuple(maps.shape)}")
    work = maps.to(torch.promote_types(maps.dtype, torch.float32))
    return F.interpolate(work.unsqueeze(1), size=tuple(size), mode="bilinear", align_corners=False).squeeze(1)
