"""Plumbing of the DiAD adapter: an image-conditioned latent diffusion model scored by inversion.

DiAD (He et al., AAAI 2024) runs Stable Diffusion in a VAE's latent space with a ControlNet-like guidance
network whose hint is the test image. :class:`invert_ad.adapters.DiADAdapter` wraps the three diffusers parts
(``AutoencoderKL``, ``UNet2DConditionModel``, ``ControlNetModel``) plus a fixed text context, so that
:class:`invert_ad.InversionScorer` can score it by DDIM inversion, one-step IRF or reconstruction.

PLUMBING ONLY: the models here are tiny and randomly initialised, and the images are random, so every score
is meaningless. The example shows the calls: building the adapter, scoring inside ``adapter.condition``,
calibrating and scoring in chunks with ``fit`` / ``score``, and bringing latent-grid maps back
to pixels with ``to_pixel_map``. For trained models on real data see ``benchmarks/retrofit.py``.

Run: ``python examples/retrofit_diad.py`` (a few seconds on a CPU).
"""

from __future__ import annotations

import time

import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel

from invert_ad import InversionScorer
from invert_ad.adapters import DiADAdapter

SIZE = 32  # image side; the VAE below downsamples by 4, so latents are 4 x 8 x 8


def tiny_diad(generator: torch.Generator) -> DiADAdapter:
    """A random tiny DiAD: f=4 VAE, a cross-attention UNet, a ControlNet copied from it, a fixed context."""
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=SIZE,
    )
    unet = UNet2DConditionModel(
        sample_size=SIZE // 4,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    # The hint embedding must downsample images to the latent grid: two stride-2 stages for f = 4.
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 16))
    context = torch.randn(1, 4, 16, generator=generator)  # stands in for the empty prompt's CLIP embedding
    # A plain ControlNet, fed as ControlNet and Stable Diffusion are (DiAD's own SGN comes from its checkpoint:
    # DiADAdapter.from_checkpoint, see docs/checkpoints.md).
    adapter = DiADAdapter(
        unet,
        controlnet,
        vae,
        context,
        image_normalisation="symmetric",
        hint_normalisation="unit",
        only_mid_control=False,
    )
    return adapter.eval().requires_grad_(False)


def main() -> None:
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    adapter = tiny_diad(generator)
    print(adapter.config, f"f={adapter.vae_scale_factor}")
    normal = torch.rand(8, 3, SIZE, SIZE, generator=generator)  # images in [0, 1]
    test = torch.rand(6, 3, SIZE, SIZE, generator=generator)

    # One batch: the hint (the images themselves) is bound for the block; score exactly the yielded latents.
    scorer = InversionScorer(adapter, adapter.scheduler, timesteps="paper", scoring="nll")
    with adapter.condition(test) as x0:
        out = scorer.score(x0)
    print(f"latents {tuple(x0.shape)}, maps {tuple(out.raw_map.shape)}, scores {out.raw_score.tolist()}")

    # Chunked and calibrated: every chunk is encoded and scored under its own images' hint.
    methods = {
        "reconstruction": {"scoring": "reconstruction", "reconstruction_timestep": 500, "reconstruction_steps": 10},
        "inversion S=3 hybrid": {"scoring": "hybrid", "timesteps": "paper"},
        "IRF": {"scoring": "irf"},
    }
    for name, kwargs in methods.items():
        scorer = InversionScorer(adapter, adapter.scheduler, **kwargs)
        if scorer.requires_fit:
            adapter.fit(scorer, normal, batch_size=4)  # normal images only, never the test set
        start = time.perf_counter()
        out = adapter.score(scorer, test, batch_size=4)
        seconds = time.perf_counter() - start
        pixel_maps = adapter.to_pixel_map(out.raw_map, test.shape[-2:])
        print(f"{name:<22} NFE {scorer.nfe:>2}  maps {tuple(pixel_maps.shape)}  {len(test) / seconds:6.1f} images/s")

    # Outside a block the adapter refuses to guess the hint.
    try:
        adapter(torch.randn(2, 4, SIZE // 4, SIZE // 4), 10)
    except RuntimeError as err:
        print(f"eps outside condition(): {err}")


if __name__ == "__main__":
    main()
