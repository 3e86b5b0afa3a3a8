"""Unconditional feature-space Diffusion Transformer (the denoiser of InvAD, Sakai et al., arXiv 2504.05662).

One token per grid position (patch size 1, a 1x1 convolution embeds each position's C-vector), a trainable
position table initialised with 2-D sin-cos, a sinusoidal timestep embedding and adaLN-Zero blocks
(Peebles & Xie, "Scalable Diffusion Models with Transformers"). Module and parameter names follow the
official DiT / InvAD code (``x_embedder.proj``, ``t_embedder.mlp.{0,2}``, ``pos_embed``,
``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2,adaLN_modulation.1}``,
``final_layer.{norm_final,linear,adaLN_modulation.1}``), so an official checkpoint's ``net.*`` state dict
loads after stripping that prefix and dropping its unused ``x_embedder_linear`` / ``y_embedder`` entries.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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

__all__ = ["DIT_PRESETS", "FeatureDiT"]

DIT_PRESETS: dict[str, dict[str, int]] = {
    # trains on a laptop CPU in minutes (about 4.8 M parameters at 192 channels)
    "dit-s": {"hidden_size": 256, "depth": 4, "num_heads": 4},
    # InvAD's DiT-base
    "dit-b": {"hidden_size": 1024, "depth": 8, "num_heads": 16},
    # InvAD's DiT-gigant, about 1.22 B parameters
    "dit-g": {"hidden_size": 2048, "depth": 16, "num_heads": 8},
}
"""Architecture presets of :class:`FeatureDiT` by name."""


class PointwiseEmbed(nn.Module):
    """Patch size 1 embedding: a 1x1 convolution, ``(B, C, h, w)`` -> tokens ``(B, h * w, H)``."""

    def __init__(self, in_channels: int, hidden_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed every grid position; tokens are in row-major order."""
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection (rows ordered q, k, v; heads contiguous).

    Args:
        hidden_size: token width H.
        num_heads: heads; must divide H.
    """

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens ``(B, N, H)`` -> ``(B, N, H)``."""
        b, n, width = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, width // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, width))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning.

    ``x += gate_msa * attn(modulate(norm1(x)))`` then ``x += gate_mlp * mlp(modulate(norm2(x)))``, with the six
    shift / scale / gate vectors produced from the conditioning by a zero-initialised ``adaLN_modulation``.

    Args:
        hidden_size: token width H.
        num_heads: attention heads.
        mlp_ratio: inner width of the MLP relative to H.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Tokens ``(B, N, H)`` and conditioning ``(B, H)`` -> ``(B, N, H)``."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FeatureDiT(ModelMixin, ConfigMixin):
    """Unconditional DiT over a feature grid, predicting eps.

    A freshly initialised model outputs exactly zero (adaLN-Zero gates and a zero output layer).

    Args:
        in_channels: feature channels C.
        sample_size: feature grid, an int (square) or ``(h, w)``; inputs must have this grid.
        hidden_size: token width H (divisible by ``num_heads`` and by 4).
        depth: number of blocks.
        num_heads: attention heads.
        mlp_ratio: MLP inner width relative to H.
        learn_sigma: also output a variance: ``2C`` output channels, eps first.

    Raises:
        ValueError: ``hidden_size`` not divisible by ``num_heads`` or by 4, or a bad ``sample_size``.

    Example:
        >>> model = FeatureDiT(in_channels=8, sample_size=4, hidden_size=32, depth=1, num_heads=2)
        >>> model(torch.randn(2, 8, 4, 4), torch.tensor([0, 999])).sample.shape
        torch.Size([2, 8, 4, 4])
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 192,
        sample_size: int | tuple[int, int] = 16,
        hidden_size: int = 256,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        learn_sigma: bool = False,
    ) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}")
        self.grid = grid_hw(sample_size)
        out_channels = 2 * in_channels if learn_sigma else in_channels
        self.x_embedder = PointwiseEmbed(in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.pos_embed = nn.Parameter(sincos_pos_embed_2d(hidden_size, self.grid).unsqueeze(0))
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, out_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Apply DiT's initialisation; the position table keeps its sin-cos values.

        Xavier-uniform linears (and 1x1 patch embedding), normal(0.02) timestep MLP, zero adaLN modulations
        and a zero output layer.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        proj = self.x_embedder.proj
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        nn.init.zeros_(proj.bias)
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
        x = self.x_embedder(sample) + self.pos_embed
        c = self.t_embedder(as_timesteps(timestep, b, sample.device))
        for block in self.blocks:
            x = block(x, c)
        out = self.final_layer(x, c).transpose(1, 2).reshape(b, -1, h, w)
        return DenoiserOutput(sample=out) if return_dict else (out,)
