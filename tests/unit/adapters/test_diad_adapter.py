"""DiAD-style latent diffusion: VAE encoding, a hint bound per batch, and maps back to pixels."""

import pytest
import torch
from adapter_nets import LATENT_SIZE, VAE_FACTOR, latent_images

from invert_ad import InversionScorer
from invert_ad.adapters import SD_SCALED_LINEAR, DiADAdapter


@pytest.fixture(scope="module")
def adapter(diad_parts):
    return DiADAdapter(*diad_parts)


def test_defaults(adapter):
    assert adapter.scaling_factor == pytest.approx(0.18215)
    assert adapter.vae_scale_factor == VAE_FACTOR
    assert adapter.schedule == SD_SCALED_LINEAR and adapter.config.in_channels == 4


@pytest.mark.parametrize("scoring", ["nll", "irf"])
def test_scores_through_inversion_scorer(adapter, scoring):
    scorer = InversionScorer(adapter, adapter.scheduler, timesteps="paper", scoring=scoring)
    if scorer.requires_fit:
        with adapter.condition(latent_images(3, seed=1)) as x0:
            scorer.fit(x0, batch_size=None)
    images = latent_images(2)
    with adapter.condition(images) as x0:
        assert x0.shape == (2, 4, LATENT_SIZE, LATENT_SIZE)
        out = scorer.score(x0)
    assert out.raw_score.shape == (2,) and torch.isfinite(out.raw_score).all()
    assert out.raw_map.shape == (2, LATENT_SIZE, LATENT_SIZE)
    assert adapter.to_pixel_map(out.raw_map, images.shape[-1]).shape == (2, 64, 64)


def test_encoding_is_the_scaled_posterior_mean_of_the_imagenet_normalised_image(adapter, diad_parts):
    vae = diad_parts[2]
    images = latent_images(2)
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    with torch.no_grad():
        expected = vae.encode((images - mean) / std).latent_dist.mean * 0.18215
        assert torch.equal(adapter.encode(images), expected)
        assert torch.equal(adapter.encode(images), adapter.encode(images))
        symmetric = DiADAdapter(*diad_parts, image_normalisation="symmetric")
        assert torch.equal(symmetric.encode(images), vae.encode(images * 2 - 1).latent_dist.mean * 0.18215)
    with pytest.raises(ValueError, match="hint_normalisation"):
        DiADAdapter(*diad_parts, hint_normalisation="[-1, 1]")


def test_only_mid_control_passes_the_middle_and_last_three_residuals(diad_parts):
    """DiAD's ControlledUnetModel: with only_mid_control the UNet sees residuals -3.. and the middle one."""
    unet, controlnet, vae, context = diad_parts
    seen = []
    hook = unet.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs), with_kwargs=True)
    x_t = torch.randn(2, 4, LATENT_SIZE, LATENT_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for only_mid in (True, False):
            DiADAdapter(unet, controlnet, vae, context, only_mid_control=only_mid).eps(x_t, 10, hint=latent_images(2))
    hook.remove()
    mid_only, everything = (s["down_block_additional_residuals"] for s in seen)
    assert len(mid_only) == len(everything) > 3
    assert all(not r.any() for r in mid_only[:-3]) and all(r.abs().sum() > 0 for r in everything)
    assert all(torch.equal(a, b) for a, b in zip(mid_only[-3:], everything[-3:], strict=True))
    assert torch.equal(seen[0]["mid_block_additional_residual"], seen[1]["mid_block_additional_residual"])


def test_eps_depends_on_the_hint(adapter):
    x_t = torch.randn(2, 4, LATENT_SIZE, LATENT_SIZE, generator=torch.Generator().manual_seed(0))
    a, b = latent_images(2, seed=0), latent_images(2, seed=1)
    with torch.no_grad():
        eps_a = adapter.eps(x_t, 500, hint=a)
        eps_b = adapter.eps(x_t, 500, hint=b)
        with adapter.condition(a):
            bound = adapter(x_t, torch.tensor([500, 500]))
    assert (eps_a - eps_b).abs().mean() > 1e-2
    assert torch.equal(bound, eps_a)


def test_a_batch_cannot_meet_another_batchs_hint(adapter):
    scorer = InversionScorer(adapter, adapter.scheduler, scoring="nll")
    x_t = torch.zeros(3, 4, LATENT_SIZE, LATENT_SIZE)
    with pytest.raises(RuntimeError, match="condition"):
        adapter(x_t, 10)  # no batch bound
    with adapter.condition(latent_images(3)) as x0:
        with pytest.raises(ValueError, match="batch of 2 latents but the hint holds 3"):
            scorer.score(x0, batch_size=2)  # chunks would pair latents with the wrong images
        with pytest.raises(ValueError, match="batch of 2"):
            adapter.eps(x_t[:2], 10)
        with pytest.raises(RuntimeError, match="already conditioned"), adapter.condition(latent_images(3)):
            pass
    with pytest.raises(RuntimeError, match="condition"):
        adapter(x_t, 10)  # the binding ends with the block, also after errors
    with pytest.raises(ValueError, match="hint size"):
        adapter.eps(x_t, 10, hint=torch.rand(3, 3, 32, 32))


def test_context_is_checked(diad_parts):
    unet, controlnet, vae, context = diad_parts
    assert DiADAdapter(unet, controlnet, vae, context[0]).context.shape == (1, 5, 16)
    with pytest.raises(ValueError, match="cross_attention_dim"):
        DiADAdapter(unet, controlnet, vae, torch.zeros(5, 8))
    with pytest.raises(ValueError, match="shape"):
        DiADAdapter(unet, controlnet, vae, torch.zeros(2, 5, 16))


def test_to_pixel_map_from_32_to_256(adapter):
    maps = torch.rand(2, 32, 32)
    up = adapter.to_pixel_map(maps, 256)
    assert up.shape == (2, 256, 256)
    assert torch.equal(up[:, 0, 0], maps[:, 0, 0]) and torch.equal(up[:, -1, -1], maps[:, -1, -1])  # corners
    assert torch.equal(adapter.to_pixel_map(torch.full((1, 32, 32), 0.25), 256), torch.full((1, 256, 256), 0.25))


def test_chunked_scoring_conditions_each_chunk_on_its_own_images(adapter):
    scorer = InversionScorer(adapter, adapter.scheduler, timesteps="paper", scoring="hybrid")
    assert adapter.fit(scorer, latent_images(4, seed=2), batch_size=3) is scorer
    images = latent_images(3)
    whole = adapter.score(scorer, images)
    chunked = adapter.score(scorer, images, batch_size=2)
    torch.testing.assert_close(chunked.latent, whole.latent, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked.raw_score, whole.raw_score, atol=1e-4, rtol=1e-5)
    assert chunked.raw_map.shape == (3, LATENT_SIZE, LATENT_SIZE)
    assert set(chunked.components) == set(whole.components) and chunked.components["nll"].shape == (3,)
    with pytest.raises(ValueError, match="batch_size"):
        adapter.score(scorer, images, batch_size=0)
