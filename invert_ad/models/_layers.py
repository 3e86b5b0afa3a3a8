"""Building blocks shared by the feature-space denoisers: output type, embeddings, adaLN helpers.

The timestep embedding, the 2-D sin-cos position table and the adaLN-Zero final layer follow the DiT
conventions (Peebles & Xie, "Scalable Diffusion Models with Transformers") so that the official InvAD
checkpoints map onto :class:`~invert_ad.models.FeatureDiT` by renaming keys only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from diffusers.utils import BaseOutput
from torch import nn

__all__ = [
    "DenoiserOutput",
    "FinalLayer",
    "Mlp",
    "TimestepEmbedder",
    "alpha_bars_at",
    "as_timesteps",
    "check_sample",
    "grid_hw",
    "modulate",
    "sincos_pos_embed_2d",
    "zero_adaln_",
]

FREQUENCY_EMBEDDING_SIZE = 256


@dataclass
class DenoiserOutput(BaseOutput):
    """Output of every ``invert_ad.models`` denoiser.

    Attributes:
        sample: the predicted noise ``(B, C_out, h, w)``; ``C_out = 2C`` for learned-sigma models (eps first).
    """

    sample: torch.Tensor


def grid_hw(sample_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """Normalise a grid size (an int for square grids or ``(h, w)``; JSON turns tuples into lists).

    Raises:
        ValueError: not one or two positive ints.
    """
    size = (sample_size, sample_size) if isinstance(sample_size, int) else tuple(sample_size)
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ValueError(f"sample_size must be a positive int or a pair (h, w) of them, got {sample_size!r}")
    return size


def check_sample(sample: torch.Tensor, in_channels: int, grid: tuple[int, int] | None) -> None:
    """Validate a denoiser input ``(B, in_channels, h, w)``; ``grid`` (if given) must equal ``(h, w)``.

    Raises:
        ValueError: wrong rank, channel count or grid size.
    """
    if sample.dim() != 4 or sample.shape[1] != in_channels:
        raise ValueError(f"sample must have shape (B, {in_channels}, h, w), got {tuple(sample.shape)}")
    if grid is not None and tuple(sample.shape[2:]) != grid:
        raise ValueError(f"sample grid {tuple(sample.shape[2:])} differs from the model's sample_size {grid}")


def as_timesteps(timestep: torch.Tensor | float | int, batch_size: int, device: torch.device) -> torch.Tensor:
    """Broadcast a scalar or ``(B,)`` timestep to a float32 tensor of shape ``(B,)`` on ``device``.

    Raises:
        ValueError: a tensor with neither one element nor ``batch_size`` elements.
    """
    t = torch.as_tensor(timestep, device=device).reshape(-1)
    if t.numel() == 1:
        t = t.expand(batch_size)
    if t.shape != (batch_size,):
        raise ValueError(f"timestep must be a scalar or have shape ({batch_size},), got {tuple(t.shape)}")
    return t.to(torch.float32)


def alpha_bars_at(
    alphas_cumprod: torch.Tensor, timestep: torch.Tensor | float | int, batch_size: int, device: torch.device
) -> torch.Tensor:
    """Alpha-bar ``(B,)`` (float64, on ``device``) at integer timesteps (floats are rounded), range-checked.

    Raises:
        ValueError: a timestep outside ``[0, T - 1]``, or neither a scalar nor ``(B,)``.
    """
    t = as_timesteps(timestep, batch_size, device).round().long()
    # value checks branch on data: an exported graph cannot hold them
    if not torch.compiler.is_exporting() and ((t < 0).any() or (t >= len(alphas_cumprod)).any()):
        raise ValueError(f"timesteps must lie in [0, {len(alphas_cumprod) - 1}], got {t.tolist()}")
    return alphas_cumprod.to(device)[t]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation ``x (1 + scale) + shift`` for tokens ``x (B, N, H)`` and ``shift, scale (B, H)``."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def zero_adaln_(blocks: Iterable[nn.Module], *outputs: nn.Module) -> None:
    """adaLN-Zero initialisation, in place: zero the weight and bias of each block's ``adaLN_modulation[-1]``
    linear and of each layer in ``outputs`` (output projections).

    Zero modulations give zero gates, so every residual block starts as the identity; with zero output layers
    a freshly initialised denoiser outputs exactly zero. No other parameter is touched.

    Args:
        blocks: modules with an ``adaLN_modulation`` ``nn.Sequential`` ending in a linear.
        *outputs: layers with ``weight`` and ``bias``, zeroed too.
    """
    for layer in [*(block.adaLN_modulation[-1] for block in blocks), *outputs]:
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)


def _sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """``[sin(p w_k), cos(p w_k)]`` with ``w_k = 10000^(-k / (dim/2))``: ``(M,)`` -> ``(M, dim)``, float64."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.to(torch.float64)[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_pos_embed_2d(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """The MAE/DiT 2-D sin-cos position table, ``(h * w, dim)`` float32 in row-major token order.

    The first half of each vector encodes the column index, the second half the row index.

    Raises:
        ValueError: ``dim`` not divisible by 4.
    """
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos position embedding needs a width divisible by 4, got {dim}")
    h, w = grid
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    table = torch.cat([_sincos_1d(dim // 2, cols.flatten()), _sincos_1d(dim // 2, rows.flatten())], dim=1)
    return table.float()


class TimestepEmbedder(nn.Module):
    """Sinusoidal 256-d timestep features ``[cos, sin]`` followed by ``Linear, SiLU, Linear``.

    Args:
        hidden_size: output width H.
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(FREQUENCY_EMBEDDING_SIZE, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    @staticmethod
    def frequencies(t: torch.Tensor, dim: int = FREQUENCY_EMBEDDING_SIZE) -> torch.Tensor:
        """Sinusoidal features of timesteps ``t (B,)``: ``(B, dim)`` float32 (``dim`` even)."""
        half = dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        return torch.cat([args.cos(), args.sin()], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """Embed timesteps ``(B,)`` into ``(B, H)``."""
        freqs = self.frequencies(t)
        return self.mlp(freqs.to(self.mlp[0].weight.dtype))

    def reset_parameters(self) -> None:
        """DiT's initialisation: weights normal with std 0.02, biases zero."""
        for index in (0, 2):
            nn.init.normal_(self.mlp[index].weight, std=0.02)
            nn.init.zeros_(self.mlp[index].bias)


class Mlp(nn.Module):
    """Two-layer perceptron ``fc2(GELU_tanh(fc1(x)))`` on the last dimension.

    Args:
        width: input and output width.
        hidden: inner width.
    """

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., width)`` -> ``(..., width)``."""
        return self.fc2(self.act(self.fc1(x)))


class FinalLayer(nn.Module):
    """adaLN output head: ``linear(modulate(norm_final(x), shift, scale))`` with zero-initialised linears.

    Args:
        hidden_size: token width H.
        out_channels: output width per token.
    """

    def __init__(self, hidden_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Tokens ``(B, N, H)`` and conditioning ``(B, H)`` -> ``(B, N, out_channels)``."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))

    def reset_parameters(self) -> None:
        """Zero the modulation and the output projection, so the head outputs exactly zero."""
        zero_adaln_([self], self.linear)
