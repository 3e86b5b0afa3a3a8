"""DDAD- and DiffusionAD-style pixel adapters through InversionScorer."""

import pytest
import torch
from adapter_nets import PIXEL_SIZE, pixel_images

from invert_ad import InversionScorer
from invert_ad.adapters import DDADAdapter, DiffusionADAdapter, PixelAdapter


@pytest.mark.parametrize("cls", [DDADAdapter, DiffusionADAdapter])
@pytest.mark.parametrize("scoring", ["nll", "irf"])
def test_scores_through_inversion_scorer(cls, scoring, pixel_unet):
    adapter = cls(pixel_unet)
    scorer = InversionScorer(adapter, adapter.scheduler, timesteps="paper", scoring=scoring)
    images = pixel_images(3)
    with adapter.condition(images) as x0:
        if scorer.requires_fit:
            scorer.fit(adapter.encode(pixel_images(4, seed=1)))
        out = scorer.score(x0)
    assert out.raw_score.shape == (3,) and torch.isfinite(out.raw_score).all()
    assert out.raw_map.shape == (3, PIXEL_SIZE, PIXEL_SIZE)
    assert adapter.to_pixel_map(out.raw_map, images.shape[-2:]).shape == (3, PIXEL_SIZE, PIXEL_SIZE)
    assert scorer.nfe == (1 if scoring == "irf" else 3)


def test_value_ranges():
    images = pixel_images(2)
    unet = torch.nn.Identity()
    torch.testing.assert_close(DDADAdapter(unet, in_channels=3).encode(images), images * 2 - 1)
    assert torch.equal(DiffusionADAdapter(unet, in_channels=3).encode(images), images)
    torch.testing.assert_close(PixelAdapter(unet, value_range=(-2.0, 2.0)).encode(images), images * 4 - 2)
    with pytest.raises(ValueError, match="value_range"):
        PixelAdapter(unet, value_range=(1.0, 0.0))
    with pytest.raises(ValueError, match="channels"):
        DDADAdapter(unet, in_channels=1).encode(images)


@pytest.mark.parametrize(("cls", "dtype"), [(DDADAdapter, torch.float32), (DiffusionADAdapter, torch.int64)])
def test_timestep_dtype_follows_the_original_call(cls, dtype, pixel_unet):
    seen = []
    hook = pixel_unet.register_forward_pre_hook(lambda module, args: seen.append(args[1]))
    adapter = cls(pixel_unet)
    with torch.no_grad():
        adapter(adapter.encode(pixel_images(2)), torch.tensor([0, 999]))
    hook.remove()
    assert seen[0].dtype == dtype and seen[0].tolist() == [0, 999]


def test_channel_count_is_declared_and_checked(pixel_unet):
    adapter = DDADAdapter(pixel_unet)
    assert adapter.config.in_channels == 3
    scorer = InversionScorer(adapter, adapter.scheduler, scoring="nll")
    with pytest.raises(ValueError, match="channels"):
        scorer.score(torch.zeros(1, 4, PIXEL_SIZE, PIXEL_SIZE))
