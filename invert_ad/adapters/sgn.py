"""DiAD's Semantic-Guided Network (SGN): a ControlNet-like copy of the UNet encoder plus the SFF block.

From the paper (He et al., AAAI 2024) and the public code (lewandofskee/DiAD, ``sgn/sgn.py``):

- the encoder half of the latent UNet (its own weights) reads ``x_t`` plus the hint embedding (ControlNet's
  eight-convolution hint block, added after the input convolution) and emits 12 skip residuals through
  1x1 zero convolutions, and one middle residual;
- the Spatial-aware Feature Fusion (SFF) block replaces residuals 9, 10 and 11 (the last level, at stride 8)
  by ``silu(r_i + d_1i(r_6) + d_2i(r_7) + d_3i(r_8))``, where each ``d`` is a bias-free 3x3 stride-2
  convolution, an affine-free instance norm and a SiLU, reading the residuals of the level above;
- with ``only_mid_control=True`` (DiAD's training and test setting) the UNet receives the middle residual
  and residuals 9-11 only, on the skips of its first three decoder blocks; residuals 0-8 are dropped.

Here the encoder is a diffusers ``ControlNetModel`` (its layout is exactly the ControlNet encoder) and the SFF
block is built from the checkpoint's convolution shapes, so any width (DiAD's shipped ``model_channels=320``
or a small one) loads. :class:`SemanticGuidedNetwork` is called like a ``ControlNetModel`` and returns the
residuals after SFF.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["SFF_SOURCES", "SFF_TARGETS", "SemanticGuidedNetwork"]

SFF_SOURCES: tuple[int, ...] = (6, 7, 8)
"""Residuals the SFF convolutions read (``down1x`` reads 6, ``down2x`` 7, ``down3x`` 8)."""

SFF_TARGETS: tuple[int, ...] = (9, 10, 11)
"""Residuals the SFF block replaces (``downx1`` feeds 9, ``downx2`` 10, ``downx3`` 11)."""

_SFF_KEY = re.compile(r"^down([123])([123])\.0\.weight$")


class _FusionConv(nn.Sequential):
    """Bias-free 3x3 stride-2 convolution, affine-free instance norm, SiLU (DiAD's ``downXY``)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1, bias=False),
            nn.InstanceNorm2d(out_channels),
            nn.SiLU(),
        )


class SemanticGuidedNetwork(nn.Module):
    """DiAD's SGN: ``sgn(x_t, t, encoder_hidden_states, controlnet_cond) -> (12 down residuals, mid residual)``.

    Args:
        encoder: a diffusers ``ControlNetModel`` with four levels of two residual blocks (13 residuals), the
            encoder copy and hint embedding of the SGN.
        fusion_shapes: ``{"downXY": (out_channels, in_channels)}`` for the nine SFF convolutions
            (X: source residual 6 + X - 1, Y: target residual 9 + Y - 1), read from a checkpoint's
            ``downXY.0.weight`` with :meth:`fusion_shapes_of`.

    Raises:
        ValueError: an encoder that does not emit 12 down residuals, or SFF shapes that are not the nine
            ``down11`` .. ``down33``.
    """

    def __init__(self, encoder: nn.Module, fusion_shapes: Mapping[str, tuple[int, int]]) -> None:
        super().__init__()
        config = encoder.config
        residuals = 1 + len(config.block_out_channels) * (config.layers_per_block + 1) - 1
        if residuals != 12:
            raise ValueError(
                f"DiAD's SFF block reads residuals 6-8 and replaces 9-11 of 12; this encoder emits {residuals} "
                f"(block_out_channels {list(config.block_out_channels)}, layers_per_block {config.layers_per_block})"
            )
        expected = {f"down{s}{t}" for s in (1, 2, 3) for t in (1, 2, 3)}
        if set(fusion_shapes) != expected:
            raise ValueError(f"fusion_shapes must name {sorted(expected)}, got {sorted(fusion_shapes)}")
        widths = list(config.block_out_channels)
        for name, (out_channels, in_channels) in fusion_shapes.items():
            source, want_in = int(name[4]), widths[1] if name[4] == "1" else widths[2]
            if (in_channels, out_channels) != (want_in, widths[3]):
                raise ValueError(
                    f"SFF convolution {name} maps {in_channels} -> {out_channels} channels, but residual "
                    f"{SFF_SOURCES[source - 1]} has {want_in} and residuals 9-11 have {widths[3]} "
                    f"(encoder widths {widths})"
                )
        self.encoder = encoder
        self.fusion = nn.ModuleDict({name: _FusionConv(i, o) for name, (o, i) in sorted(fusion_shapes.items())})
        self.silu = nn.SiLU()

    @staticmethod
    def fusion_shapes_of(state_dict: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
        """``{"downXY": (out, in)}`` from the SFF weights ``downXY.0.weight`` of an SGN state dict (no prefix)."""
        return {
            f"down{m.group(1)}{m.group(2)}": (int(v.shape[0]), int(v.shape[1]))
            for k, v in state_dict.items()
            if (m := _SFF_KEY.match(k))
        }

    def load_fusion_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load the SFF convolutions from ``downXY.0.weight`` entries (no prefix); strict.

        Raises:
            KeyError: an SFF weight is absent.
        """
        for name, block in self.fusion.items():
            key = f"{name}.0.weight"
            if key not in state_dict:
                raise KeyError(f"the SGN state dict lacks the SFF weight {key!r}")
            block[0].load_state_dict({"weight": state_dict[key]}, strict=True)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: torch.Tensor,
        conditioning_scale: float = 1.0,
        return_dict: bool = False,
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """Residuals for the UNet: 12 skip residuals (9-11 after SFF) and the middle one.

        Args:
            sample: ``x_t (B, C, h, w)``.
            timestep: ``(B,)`` integer timesteps.
            encoder_hidden_states: the cross-attention context ``(B, L, D)``.
            controlnet_cond: the hint ``(B, 3, 8 h, 8 w)``, normalised as the model was trained.
            conditioning_scale: multiplies every residual (DiAD: 1).
            return_dict: must be false (kept for the ``ControlNetModel`` call signature).

        Returns:
            ``(down residuals, mid residual)``.
        """
        if return_dict:
            raise ValueError("SemanticGuidedNetwork returns a (down, mid) tuple; call it with return_dict=False")
        down, mid = self.encoder(
            sample,
            timestep,
            encoder_hidden_states=encoder_hidden_states,
            controlnet_cond=controlnet_cond,
            return_dict=False,
        )
        down = list(down)
        sources = [down[i] for i in SFF_SOURCES]
        fused = []
        for y, target in enumerate(SFF_TARGETS, start=1):
            total = down[target]
            for x, source in enumerate(sources, start=1):
                total = total + self.fusion[f"down{x}{y}"](source)
            fused.append(self.silu(total))
        for target, value in zip(SFF_TARGETS, fused, strict=True):
            down[target] = value
        if conditioning_scale != 1.0:
            down, mid = [d * conditioning_scale for d in down], mid * conditioning_scale
        return tuple(down), mid

    def extra_repr(self) -> str:
        return f"sff_sources={SFF_SOURCES}, sff_targets={SFF_TARGETS}"

    @classmethod
    def from_ldm_params(
        cls, params: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]
    ) -> SemanticGuidedNetwork:
        """Build from DiAD's ``control_stage_config.params`` and its state dict (without ``control_model.``).

        The encoder is converted with :func:`~invert_ad.adapters.ldm.convert_ldm_weights` (checked complete),
        the SFF convolutions are built from and loaded with their own weights.
        """
        from diffusers import ControlNetModel

        from .ldm import LDM_PREFIXES, controlnet_config_from_ldm, convert_ldm_weights

        encoder = ControlNetModel(**controlnet_config_from_ldm(params))
        prefixed = {LDM_PREFIXES["controlnet"] + k: v for k, v in state_dict.items()}
        convert_ldm_weights(prefixed, "controlnet", encoder, ignore=tuple(f"down{s}" for s in (1, 2, 3)))
        sgn = cls(encoder, cls.fusion_shapes_of(state_dict))
        sgn.load_fusion_weights(state_dict)
        return sgn.eval()
