"""Small convolutional denoiser: 3x3 residual blocks at full feature resolution with adaLN timestep conditioning.

The "small conv UNet option": on a 16x16 feature grid there is little to gain from down-sampling, so the
network stays at one resolution. Each block normalises (GroupNorm without affine), modulates with a
timestep-dependent shift and scale, applies two 3x3 convolutions and adds the result through a
timestep-dependent gate; gates and the output convolution start at zero.
"""

from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from ._layers import (
    DenoiserOutput,
    TimestepEmbedder,
    as_timesteps,
    check_sample,
    grid_hw,
    sincos_pos_embed_2d,
    zero_adaln_,
)

__all__ = ["ConvDenoiser"]


def _modulate_2d(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x (1 + scale) + shift`` for maps ``x (B, W, h, w)`` and ``shift, scale (B, W)``."""
    return x * (1 + scale[:, :, None, None]) + shift[:, :, None, None]


class ConvBlock(nn.Module):
    """Residual 3x3 block with adaLN-Zero: ``x += gate * conv2(SiLU(norm2(conv1(SiLU(modulate(norm1(x)))))))``.

    Args:
        width: channels W.
        num_groups: GroupNorm groups (divides W).
    """

    def __init__(self, width: int, num_groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups, width, eps=1e-6, affine=False)
        self.conv1 = nn.Conv2d(width, width, kernel_size=3, padding=1)
        self.norm2 = nn.GroupNorm(num_groups, width, eps=1e-6, affine=False)
        self.conv2 = nn.Conv2d(width, width, kernel_size=3, padding=1)
        self.act = nn.SiLU()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Maps ``(B, W, h, w)`` and conditioning ``(B, W)`` -> ``(B, W, h, w)``."""
        shift, scale, gate = self.adaLN_modulation(c).chunk(3, dim=1)
        y = self.conv1(self.act(_modulate_2d(self.norm1(x), shift, scale)))
        y = self.conv2(self.act(self.norm2(y)))
        return x + gate[:, :, None, None] * y


class ConvDenoiser(ModelMixin, ConfigMixin):
    """Residual 3x3 convolutional network predicting eps, with adaLN-Zero timestep conditioning.

    A freshly initialised model outputs exactly zero.

    Args:
        in_channels: feature channels C.
        sample_size: feature grid, an int (square) or ``(h, w)``. Inputs must have this grid only when
            ``position_embedding`` is on; otherwise any grid works.
        width: channels W of the hidden maps (divisible by ``num_groups``, and by 4 with
            ``position_embedding``).
        depth: number of residual blocks.
        num_groups: GroupNorm groups.
        position_embedding: add a trainable position map (initialised with 2-D sin-cos) after the input
            convolution.
        learn_sigma: also output a variance: ``2C`` output channels, eps first.

    Raises:
        ValueError: ``width`` not divisible by ``num_groups``.

    Example:
        >>> model = ConvDenoiser(in_channels=8, sample_size=4, width=32, depth=2, num_groups=8)
        >>> model(torch.randn(2, 8, 4, 4), torch.tensor([10, 20])).sample.shape
        torch.Size([2, 8, 4, 4])
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 192,
        sample_size: int | tuple[int, int] = 16,
        width: int = 256,
        depth: int = 4,
        num_groups: int = 32,
        position_embedding: bool = False,
        learn_sigma: bool = False,
    ) -> None:
        super().__init__()
        if width % num_groups:
            raise ValueError(f"width={width} must be divisible by num_groups={num_groups}")
        grid = grid_hw(sample_size)
        self.grid = grid if position_embedding else None
        self.conv_in = nn.Conv2d(in_channels, width, kernel_size=3, padding=1)
        self.t_embedder = TimestepEmbedder(width)
        self.pos_embed = (
            nn.Parameter(sincos_pos_embed_2d(width, grid).T.reshape(1, width, *grid)) if position_embedding else None
        )
        self.blocks = nn.ModuleList(ConvBlock(width, num_groups) for _ in range(depth))
        self.norm_out = nn.GroupNorm(num_groups, width, eps=1e-6, affine=False)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.act = nn.SiLU()
        self.conv_out = nn.Conv2d(width, 2 * in_channels if learn_sigma else in_channels, kernel_size=3, padding=1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's default convolutions, normal(0.02) timestep MLP, zero adaLN modulations and zero output."""
        self.t_embedder.reset_parameters()
        zero_adaln_([*self.blocks, self], self.conv_out)

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor | float | int, return_dict: bool = True
    ) -> DenoiserOutput | tuple[torch.Tensor]:
        """Predict the noise in ``sample``.

        Args:
            sample: noisy features ``(B, C, h, w)``.
            timestep: training timesteps, a scalar or ``(B,)``.
            return_dict: return a :class:`DenoiserOutput` (else a 1-tuple).

        Returns:
            eps ``(B, C, h, w)`` (``(B, 2C, h, w)`` with ``learn_sigma``).
        """
        check_sample(sample, self.config.in_channels, self.grid)
        x = self.conv_in(sample)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        c = self.t_embedder(as_timesteps(timestep, sample.shape[0], sample.device))
        for block in self.blocks:
            x = block(x, c)
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        out = self.conv_out(self.act(_modulate_2d(self.norm_out(x), shift, scale)))
        return DenoiserOutput(sample=out) if return_dict else (out,)
