"""Tiny stand-ins for the retrofitted detectors' networks (same classes and key layouts, few parameters)."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel, UNet2DModel

PIXEL_SIZE = 16
LATENT_SIZE = 8
VAE_FACTOR = 8
CONTEXT_WIDTH = 16


def make_pixel_unet(seed: int = 0) -> UNet2DModel:
    """A two-level pixel UNet on 3 x 16 x 16 images (DDAD / DiffusionAD stand-in)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return UNet2DModel(
            sample_size=PIXEL_SIZE,
            in_channels=3,
            out_channels=3,
            block_out_channels=(8, 16),
            layers_per_block=1,
            norm_num_groups=4,
            down_block_types=("DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D"),
        ).eval()


def pixel_images(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, PIXEL_SIZE, PIXEL_SIZE, generator=torch.Generator().manual_seed(seed))


def make_diad_parts() -> tuple[UNet2DConditionModel, ControlNetModel, AutoencoderKL, torch.Tensor]:
    """An f8 VAE, a cross-attention UNet and a ControlNet on 64 x 64 images (8 x 8 latents), plus a context.

    The ControlNet's zero-initialised output convolutions are randomised, as after training (at zero the hint
    would have no effect), and so is its hint embedding (at its default initialisation it barely responds to
    the image).
    """
    with torch.random.fork_rng():
        torch.manual_seed(0)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 8, 8),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            sample_size=LATENT_SIZE * VAE_FACTOR,
        ).eval()
        blocks = {
            "block_out_channels": (16, 32),
            "layers_per_block": 1,
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "cross_attention_dim": CONTEXT_WIDTH,
            "attention_head_dim": 4,
            "norm_num_groups": 8,
        }
        unet = UNet2DConditionModel(
            sample_size=LATENT_SIZE,
            in_channels=4,
            out_channels=4,
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            **blocks,
        ).eval()
        controlnet = ControlNetModel(in_channels=4, conditioning_embedding_out_channels=(8, 8, 8, 8), **blocks).eval()
        with torch.no_grad():  # as after training: zero convolutions non-zero, a hint embedding that responds
            for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
                conv.weight.normal_(0.0, 0.3)
            for conv in controlnet.controlnet_cond_embedding.modules():
                if isinstance(conv, torch.nn.Conv2d):
                    conv.weight.normal_(0.0, 0.3)
        context = torch.randn(1, 5, CONTEXT_WIDTH)
        return unet, controlnet, vae, context


def latent_images(n: int = 3, seed: int = 0) -> torch.Tensor:
    size = LATENT_SIZE * VAE_FACTOR
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
