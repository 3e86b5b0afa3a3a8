"""Per-position MLP denoiser with adaLN-Zero residual blocks (InvAD's MLP variant).

Each grid position's C-vector is denoised on its own, conditioned on the timestep; positions interact only
through an optional learned position embedding. Cheap on a CPU: no attention, no spatial mixing.
"""

from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from ._layers import (
    DenoiserOutput,
    FinalLayer,
    Mlp,
    TimestepEmbedder,
    as_timesteps,
    check_sample,
    grid_hw,
    modulate,
    sincos_pos_embed_2d,
    zero_adaln_,
)

__all__ = ["MLPDenoiser"]


class ResidualMLPBlock(nn.Module):
    """Residual MLP block with adaLN-Zero: ``x += gate * mlp(modulate(norm(x), shift, scale))``.

    Shift, scale and gate come from a zero-initialised ``adaLN_modulation`` of the conditioning.

    Args:
        hidden_size: token width H.
        mlp_ratio: MLP inner width relative to H.
    """

    def __init__(self, hidden_size: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 3 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Tokens ``(B, N, H)`` and conditioning ``(B, H)`` -> ``(B, N, H)``."""
        shift, scale, gate = self.adaLN_modulation(c).chunk(3, dim=1)
        return x + gate.unsqueeze(1) * self.mlp(modulate(self.norm(x), shift, scale))


class MLPDenoiser(ModelMixin, ConfigMixin):
    """Per-position MLP predicting eps, with adaLN-Zero residual blocks.

    A freshly initialised model outputs exactly zero.

    Args:
        in_channels: feature channels C.
        sample_size: feature grid, an int (square) or ``(h, w)``. Inputs must have this grid only when
            ``position_embedding`` is on; otherwise any grid works.
        hidden_size: token width H (divisible by 4 with ``position_embedding``).
        depth: number of residual blocks.
        mlp_ratio: MLP inner width relative to H.
        position_embedding: add a trainable position table (initialised with 2-D sin-cos) after the input
            projection, making the denoiser position-aware.
        learn_sigma: also output a variance: ``2C`` output channels, eps first.

    Example:
        >>> model = MLPDenoiser(in_channels=8, sample_size=4, hidden_size=32, depth=2)
        >>> model(torch.randn(2, 8, 4, 4), 500).sample.shape
        torch.Size([2, 8, 4, 4])
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 192,
        sample_size: int | tuple[int, int] = 16,
        hidden_size: int = 512,
        depth: int = 4,
        mlp_ratio: float = 2.0,
        position_embedding: bool = False,
        learn_sigma: bool = False,
    ) -> None:
        super().__init__()
        grid = grid_hw(sample_size)
        self.grid = grid if position_embedding else None
        self.input_proj = nn.Linear(in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.pos_embed = (
            nn.Parameter(sincos_pos_embed_2d(hidden_size, grid).unsqueeze(0)) if position_embedding else None
        )
        self.blocks = nn.ModuleList(ResidualMLPBlock(hidden_size, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, 2 * in_channels if learn_sigma else in_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform linears, normal(0.02) timestep MLP, zero adaLN modulations and zero output layer."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        self.t_embedder.reset_parameters()
        zero_adaln_(self.blocks)
        self.final_layer.reset_parameters()

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
        b, _, h, w = sample.shape
        x = self.input_proj(sample.flatten(2).transpose(1, 2))
        if self.pos_embed is not None:
            x = x + self.pos_embed
        c = self.t_embedder(as_timesteps(timestep, b, sample.device))
        for block in self.blocks:
            x = block(x, c)
        out = self.final_layer(x, c).transpose(1, 2).reshape(b, -1, h, w)
        return DenoiserOutput(sample=out) if return_dict else (out,)
