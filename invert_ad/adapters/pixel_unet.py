"""The pixel-space UNet that DDAD and DiffusionAD train (written here from their published architecture).

Both detectors use the same guided-diffusion-derived UNet (DDAD's ``unet.UNetModel``, DiffusionAD's
``models.Recon_subnetwork.UNetModel``), with the state-dict layout ``time_embedding.{1,3}``,
``down.N.*``, ``middle.{0,1,2}.*``, ``up.N.*`` and ``out.{0,2}``:

- a sinusoidal timestep embedding ``[sin, cos]`` of width ``base_channels`` and a two-layer MLP to
  ``4 * base_channels``;
- residual blocks ``GroupNorm(32) -> SiLU -> conv3x3``, plus the projected embedding, then
  ``GroupNorm(32) -> SiLU -> dropout -> conv3x3``, with a 1x1 skip convolution when the width changes;
  GroupNorm is computed in float32;
- down- and upsampling inside residual blocks (BigGAN style: 2x2 average pooling, nearest upsampling);
- single-head-group QKV self-attention (heads laid out ``[q, k, v]`` per head, each scaled by
  ``ch ** -1/4``) at the strides listed by ``attention_resolutions``;
- ``num_res_blocks`` blocks per level on the way down, ``num_res_blocks + 1`` on the way up, each up block
  reading the concatenated skip of the matching down block.

:class:`PixelUNet` takes the peers' constructor arguments under their own names, so a peer's configuration
(DDAD's ``build_model`` values, DiffusionAD's ``args``) builds the network whose checkpoint it wrote.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DEFAULT_CHANNEL_MULTS", "PixelUNet", "PixelUNetConfig"]

DEFAULT_CHANNEL_MULTS: dict[int, tuple[float, ...]] = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 3, 4),
}
"""The peers' channel multipliers by image size, used when ``channel_mults`` is not given (``""``)."""

_GROUPS = 32
_RESOLUTIONS = re.compile(r"^\s*\d+(\s*,\s*\d+)*\s*$")


@dataclass(frozen=True)
class PixelUNetConfig:
    """The constructor arguments of :class:`PixelUNet`, resolved (``.config`` of the model).

    Attributes:
        img_size: image side in pixels (attention strides are ``img_size // resolution``).
        base_channels: width of the first level; the timestep MLP is ``4 *`` this wide.
        channel_mults: width multiplier per level.
        attention_resolutions: image sides (in feature-map pixels) that get self-attention.
        n_heads: attention heads (used when ``n_head_channels == -1``).
        n_head_channels: channels per head (``-1``: use ``n_heads``).
        num_res_blocks: residual blocks per level on the way down.
        dropout: dropout probability inside residual blocks.
        biggan_updown: resample inside residual blocks (else plain pooling / upsampling layers).
        conv_resample: the plain resampling layers carry a convolution (only without ``biggan_updown``).
        in_channels: image channels (also the output channels).
    """

    img_size: int
    base_channels: int
    channel_mults: tuple[float, ...]
    attention_resolutions: tuple[int, ...]
    n_heads: int
    n_head_channels: int
    num_res_blocks: int
    dropout: float
    biggan_updown: bool
    conv_resample: bool
    in_channels: int

    @property
    def out_channels(self) -> int:
        """Output channels (eps of an image: the input channels)."""
        return self.in_channels


def _timestep_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``[sin(t w), cos(t w)]`` with ``w_k = 10000 ** (-k / (dim / 2))``: ``(B,) -> (B, dim)`` float32."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device) * -(math.log(10000) / half))
    args = torch.outer(t.float(), freqs)
    return torch.cat((args.sin(), args.cos()), dim=-1)


class _TimestepFeatures(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"the timestep embedding width must be even, got {dim}")
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return _timestep_features(t, self.dim)


class _GroupNorm32(nn.GroupNorm):
    """GroupNorm over 32 groups, computed in float32 (or float64 for float64 inputs) and cast back."""

    def __init__(self, channels: int) -> None:
        if channels % _GROUPS:
            raise ValueError(f"GroupNorm over {_GROUPS} groups needs a multiple of {_GROUPS} channels, got {channels}")
        super().__init__(_GROUPS, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x if x.dtype == torch.float64 else x.float()).type(x.dtype)


class _Resample(nn.Module):
    """2x nearest upsampling or 2x2 average pooling, optionally followed / replaced by a convolution."""

    def __init__(self, channels: int, up: bool, use_conv: bool = False, out_channels: int | None = None) -> None:
        super().__init__()
        self.up = up
        out_channels = out_channels or channels
        if up and use_conv:
            self.conv = nn.Conv2d(channels, out_channels, 3, padding=1)
        elif not up and use_conv:
            self.downsample = nn.Conv2d(channels, out_channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            return self.conv(x) if hasattr(self, "conv") else x
        if hasattr(self, "downsample"):
            return self.downsample(x)
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class _ResBlock(nn.Module):
    def __init__(
        self, channels: int, emb_dim: int, dropout: float, out_channels: int | None = None, resample: str = ""
    ) -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.in_layers = nn.Sequential(
            _GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.resample = resample
        if resample:
            self.h_upd = _Resample(channels, up=resample == "up")
            self.x_upd = _Resample(channels, up=resample == "up")
        self.embed_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_channels))
        self.out_layers = nn.Sequential(
            _GroupNorm32(out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.resample:
            h = self.in_layers[:-1](x)
            h = self.in_layers[-1](self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        h = h + self.embed_layers(emb).type(h.dtype)[..., None, None]
        return self.skip_connection(x) + self.out_layers(h)


class _Attention(nn.Module):
    def __init__(self, channels: int, n_heads: int, n_head_channels: int) -> None:
        super().__init__()
        if n_head_channels != -1:
            if channels % n_head_channels:
                raise ValueError(f"{channels} channels are not divisible into heads of {n_head_channels}")
            n_heads = channels // n_head_channels
        if n_heads < 1 or channels % n_heads:
            raise ValueError(f"{channels} channels are not divisible into {n_heads} heads")
        self.n_heads = n_heads
        self.norm = _GroupNorm32(channels)
        self.to_qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.to_qkv(self.norm(x))
        width = c // self.n_heads
        q, k, v = qkv.reshape(b * self.n_heads, 3 * width, -1).split(width, dim=1)
        scale = 1.0 / math.sqrt(math.sqrt(width))
        weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        h = torch.einsum("bts,bcs->bct", weight, v).reshape(b, c, -1)
        return (x + self.proj_out(h)).reshape(b, c, *spatial)


class _Stage(nn.Sequential):
    """Layers applied in order; residual blocks also receive the timestep embedding."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, _ResBlock) else layer(x)
        return x


def _resolutions(value: Any) -> tuple[int, ...]:
    if isinstance(value, str):
        if not _RESOLUTIONS.match(value):
            raise ValueError(f"attention_resolutions must be comma-separated ints such as '32,16,8', got {value!r}")
        return tuple(int(v) for v in value.split(","))
    return tuple(int(v) for v in value)


class PixelUNet(nn.Module):
    """DDAD's and DiffusionAD's UNet: ``model(x (B, C, H, W), t (B,)) -> eps (B, C, H, W)``.

    The arguments and their defaults are the peers' own (``UNetModel`` of DDAD's ``unet.py``).

    Args:
        img_size: image side ``H = W`` in pixels.
        base_channels: width of the first level.
        conv_resample: plain resampling layers carry a convolution (used only without ``biggan_updown``).
        n_heads: attention heads when ``n_head_channels == -1``.
        n_head_channels: channels per attention head (``-1``: ``n_heads`` heads).
        channel_mults: width multiplier per level; ``""`` takes the peers' default for ``img_size``
            (:data:`DEFAULT_CHANNEL_MULTS`).
        num_res_blocks: residual blocks per level.
        dropout: dropout probability.
        attention_resolutions: feature-map sides with self-attention, ``"32,16,8"`` or a sequence of ints.
        biggan_updown: resample inside residual blocks.
        in_channels: image channels (and output channels).

    Raises:
        ValueError: no default ``channel_mults`` for ``img_size``, badly formed ``attention_resolutions``,
            widths that GroupNorm(32) or the attention heads cannot divide.
    """

    def __init__(
        self,
        img_size: int,
        base_channels: int,
        conv_resample: bool = True,
        n_heads: int = 1,
        n_head_channels: int = -1,
        channel_mults: Sequence[float] | str = "",
        num_res_blocks: int = 2,
        dropout: float = 0.0,
        attention_resolutions: str | Sequence[int] = "32,16,8",
        biggan_updown: bool = True,
        in_channels: int = 1,
    ) -> None:
        super().__init__()
        if isinstance(channel_mults, str):
            if channel_mults:
                raise ValueError(f"channel_mults must be a sequence of numbers or '', got {channel_mults!r}")
            if img_size not in DEFAULT_CHANNEL_MULTS:
                raise ValueError(
                    f"no default channel_mults for img_size {img_size}; give channel_mults or use one of "
                    f"{sorted(DEFAULT_CHANNEL_MULTS)}"
                )
            channel_mults = DEFAULT_CHANNEL_MULTS[img_size]
        self.config = PixelUNetConfig(
            img_size=int(img_size),
            base_channels=int(base_channels),
            channel_mults=tuple(channel_mults),
            attention_resolutions=_resolutions(attention_resolutions),
            n_heads=int(n_heads),
            n_head_channels=int(n_head_channels),
            num_res_blocks=int(num_res_blocks),
            dropout=float(dropout),
            biggan_updown=bool(biggan_updown),
            conv_resample=bool(conv_resample),
            in_channels=int(in_channels),
        )
        self._build(self.config)

    def _build(self, c: PixelUNetConfig) -> None:
        attention_strides = {c.img_size // r for r in c.attention_resolutions}
        emb_dim = 4 * c.base_channels
        base = c.base_channels

        def attention(ch: int) -> _Attention:
            return _Attention(ch, c.n_heads, c.n_head_channels)

        def resample(ch: int, up: bool) -> nn.Module:
            if c.biggan_updown:
                return _ResBlock(ch, emb_dim, c.dropout, ch, resample="up" if up else "down")
            return _Resample(ch, up=up, use_conv=c.conv_resample, out_channels=ch)

        self.time_embedding = nn.Sequential(
            _TimestepFeatures(base), nn.Linear(base, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        ch = int(c.channel_mults[0] * base)
        self.down = nn.ModuleList([_Stage(nn.Conv2d(c.in_channels, base, 3, padding=1))])
        skips, stride = [ch], 1
        for level, mult in enumerate(c.channel_mults):
            for _ in range(c.num_res_blocks):
                width = int(base * mult)
                layers: list[nn.Module] = [_ResBlock(ch, emb_dim, c.dropout, width)]
                ch = width
                if stride in attention_strides:
                    layers.append(attention(ch))
                self.down.append(_Stage(*layers))
                skips.append(ch)
            if level != len(c.channel_mults) - 1:
                self.down.append(_Stage(resample(ch, up=False)))
                stride *= 2
                skips.append(ch)
        self.middle = _Stage(_ResBlock(ch, emb_dim, c.dropout), attention(ch), _ResBlock(ch, emb_dim, c.dropout))
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mults))):
            for j in range(c.num_res_blocks + 1):
                width = int(base * mult)
                layers = [_ResBlock(ch + skips.pop(), emb_dim, c.dropout, width)]
                ch = width
                if stride in attention_strides:
                    layers.append(attention(ch))
                if level and j == c.num_res_blocks:
                    layers.append(resample(ch, up=True))
                    stride //= 2
                self.up.append(_Stage(*layers))
        self.out = nn.Sequential(
            _GroupNorm32(ch), nn.SiLU(), nn.Conv2d(int(base * c.channel_mults[0]), c.out_channels, 3, padding=1)
        )

    @classmethod
    def from_arguments(cls, arguments: Mapping[str, Any]) -> PixelUNet:
        """Build from a mapping of constructor arguments (unknown names are an error).

        Raises:
            TypeError: an argument :class:`PixelUNet` does not take (the message lists the ones it takes).
        """
        known = set(inspect.signature(cls.__init__).parameters) - {"self"}
        unknown = sorted(set(arguments) - known)
        if unknown:
            raise TypeError(f"PixelUNet takes no argument(s) {unknown}; it takes {sorted(known)}")
        return cls(**arguments)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps at ``x (B, C, H, W)`` and timesteps ``t (B,)`` (int or float, training indices).

        Computed in the dtype of the weights (float32 as the peers do; float64 after ``.double()``, for
        reference checks), returned in the dtype of ``x``.
        """
        dtype = self.out[-1].weight.dtype
        emb = self.time_embedding[1:](self.time_embedding[0](t).to(dtype))
        h = x.to(dtype)
        skips = []
        for stage in self.down:
            h = stage(h, emb)
            skips.append(h)
        h = self.middle(h, emb)
        for stage in self.up:
            h = stage(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h.type(x.dtype))
