"""The adapter contract: schedules, the carried scheduler, timestep and image validation, maps, registry."""

import pytest
import torch
from adapter_nets import pixel_images
from diffusers import DDPMScheduler

from invert_ad import InversionScorer
from invert_ad.adapters import (
    DDPM_LINEAR,
    SD_SCALED_LINEAR,
    DDADAdapter,
    DiffusionAdapter,
    NoiseSchedule,
    check_images,
    create_adapter,
    list_adapters,
)


def test_linear_schedule_matches_the_reference_values():
    ab = DDPM_LINEAR.alphas_cumprod()
    assert ab.dtype == torch.float64 and ab.shape == (1000,)
    for t, expected in [(0, 0.9999), (333, 0.3186), (500, 0.0778), (666, 0.0110), (999, 4.04e-5)]:
        assert ab[t].item() == pytest.approx(expected, rel=2e-3), t


def test_scaled_linear_schedule_matches_diffusers():
    ours = SD_SCALED_LINEAR.alphas_cumprod()
    theirs = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod
    torch.testing.assert_close(ours, theirs.double(), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(ours, DDPM_LINEAR.alphas_cumprod())


def test_bad_schedule_is_refused():
    with pytest.raises(ValueError, match="beta_schedule"):
        NoiseSchedule("cosine").alphas_cumprod()
    with pytest.raises(ValueError, match="beta_start"):
        NoiseSchedule("linear", 0.02, 1e-4).alphas_cumprod()


def test_scheduler_carries_the_exact_float64_schedule_and_eps(pixel_unet):
    adapter = DDADAdapter(pixel_unet)
    scheduler = adapter.scheduler
    assert scheduler.config.prediction_type == "epsilon" and scheduler.config.clip_sample is False
    scorer = InversionScorer(adapter, scheduler)
    assert torch.equal(scorer.alphas_cumprod, adapter.alphas_cumprod)
    # the property returns a copy: mutating it does not change the adapter
    adapter.alphas_cumprod.zero_()
    assert adapter.alphas_cumprod[0] > 0.99


def test_the_contract_is_abstract():
    with pytest.raises(TypeError):
        DiffusionAdapter(schedule=DDPM_LINEAR)


def test_timesteps_scalar_vector_and_errors(pixel_unet):
    adapter = DDADAdapter(pixel_unet)
    x = adapter.encode(pixel_images(2))
    with torch.no_grad():
        assert torch.equal(adapter(x, 500), adapter(x, torch.tensor([500, 500])))
        assert torch.equal(adapter(x, torch.tensor(500.0)), adapter(x, 500))
        with pytest.raises(ValueError, match=r"\[0, 999\]"):
            adapter(x, 1000)
        with pytest.raises(ValueError, match="shape"):
            adapter(x, torch.tensor([1, 2, 3]))
        with pytest.raises(ValueError, match="integer"):
            adapter(x, torch.tensor([0.5, 1.0]))


def test_images_must_be_a_batch_in_unit_range():
    ok = pixel_images(1)
    assert check_images(ok) is ok
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        check_images(ok * 2 - 1)
    with pytest.raises(ValueError, match="channels"):
        check_images(ok, channels=1)
    with pytest.raises(ValueError, match="shape"):
        check_images(ok[0])
    with pytest.raises(TypeError):
        check_images(ok.numpy())
    with pytest.raises(ValueError, match="NaN"):
        check_images(torch.full_like(ok, float("nan")))


def test_to_pixel_map_is_bilinear_upsampling(pixel_unet):
    adapter = DDADAdapter(pixel_unet)
    maps = torch.rand(2, 4, 4)
    assert torch.equal(adapter.to_pixel_map(maps, 4), maps)
    assert adapter.to_pixel_map(maps, (8, 12)).shape == (2, 8, 12)
    # by hand: align_corners=False samples at (i + 0.5) / 2 - 0.5, clamped at the border
    small = torch.tensor([[[0.0, 1.0], [2.0, 3.0]]])
    expected = torch.tensor(
        [[0.0, 0.25, 0.75, 1.0], [0.5, 0.75, 1.25, 1.5], [1.5, 1.75, 2.25, 2.5], [2.0, 2.25, 2.75, 3.0]]
    )
    assert torch.equal(adapter.to_pixel_map(small, 4)[0], expected)
    with pytest.raises(ValueError, match=r"\(B, h, w\)"):
        adapter.to_pixel_map(maps[0], 8)


def test_registry(pixel_unet):
    assert {"ddad", "diffusionad", "diad", "mdm", "pixel"} <= set(list_adapters())
    assert list_adapters("d*") == ["ddad", "diad", "diffusionad"]
    assert isinstance(create_adapter("ddad", pixel_unet), DDADAdapter)
    with pytest.raises(ValueError, match="ddad"):
        create_adapter("nope", pixel_unet)
