"""MDM-style teachers (mask ratio 0) and x0 / v predictors give the latents of the equivalent eps model."""

import pytest
import torch
from adapter_nets import PIXEL_SIZE, make_pixel_unet, pixel_images
from torch import nn

from invert_ad import InversionScorer
from invert_ad.adapters import DDPM_LINEAR, MaskedDenoiser, MDMAdapter


class Teacher(nn.Module):
    """A masked-diffusion stand-in: an eps UNet whose output is re-expressed as eps, x0 or v.

    Records every mask ratio it is called with; masking itself is not modelled (only ratio 0 is used).
    """

    def __init__(self, unet: nn.Module, kind: str) -> None:
        super().__init__()
        self.unet, self.kind, self.mask_ratios = unet, kind, []
        self.alphas_cumprod = DDPM_LINEAR.alphas_cumprod()

    def forward(self, x: torch.Tensor, t: torch.Tensor, mask_ratio: float = 0.5) -> torch.Tensor:
        self.mask_ratios.append(mask_ratio)
        eps = self.unet(x, t).sample.double()
        a = self.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        x0 = (x.double() - (1 - a).sqrt() * eps) / a.sqrt()
        out = {"epsilon": eps, "sample": x0, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0}[self.kind]
        return out.float()


def _encode(images: torch.Tensor) -> torch.Tensor:
    return images * 2 - 1


@pytest.fixture(scope="module")
def unet():
    return make_pixel_unet(seed=3)


@pytest.mark.parametrize("kind", ["sample", "v_prediction"])
@pytest.mark.parametrize("timesteps", ["paper", "official"])
def test_x0_and_v_models_give_the_eps_models_latents(kind, timesteps, unet):
    images = pixel_images(3)
    reference = MDMAdapter(Teacher(unet, "epsilon"), encoder=_encode, in_channels=3)
    converted = MDMAdapter(Teacher(unet, kind), encoder=_encode, prediction_type=kind, in_channels=3)
    latents = {}
    for name, adapter in (("eps", reference), (kind, converted)):
        scorer = InversionScorer(adapter, adapter.scheduler, timesteps=timesteps, scoring="nll")
        with adapter.condition(images) as x0:
            latents[name] = scorer.invert(x0)
        latents[name + "_irf"] = InversionScorer(adapter, adapter.scheduler, scoring="irf").irf(adapter.encode(images))
    torch.testing.assert_close(latents[kind], latents["eps"], atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(latents[kind + "_irf"], latents["eps_irf"], atol=2e-4, rtol=1e-4)
    assert latents["eps"].abs().mean() > 0.1  # not trivially equal


def test_without_conversion_the_latents_differ(unet):
    """The test above can fail: declaring an x0 model as eps gives other latents."""
    images = pixel_images(2)
    wrong = MDMAdapter(Teacher(unet, "sample"), encoder=_encode, in_channels=3)
    right = MDMAdapter(Teacher(unet, "epsilon"), encoder=_encode, in_channels=3)
    z = [InversionScorer(a, a.scheduler).invert(a.encode(images)) for a in (wrong, right)]
    assert not torch.allclose(z[0], z[1], atol=1e-2)


def test_the_teacher_runs_unmasked_and_the_generator_without_a_ratio(unet):
    teacher = Teacher(unet, "epsilon")
    assert isinstance(teacher, MaskedDenoiser)
    adapter = MDMAdapter(teacher, encoder=_encode, in_channels=3)
    InversionScorer(adapter, adapter.scheduler, timesteps="paper").invert(adapter.encode(pixel_images(1)))
    assert teacher.mask_ratios == [0.0, 0.0, 0.0]

    calls = []

    def generator(x, t):
        calls.append(t)
        return torch.zeros_like(x)

    one_step = MDMAdapter(generator, encoder=_encode, masked=False, prediction_type="sample", in_channels=3)
    with torch.no_grad():
        eps = one_step(one_step.encode(pixel_images(1)), 999)
    assert len(calls) == 1 and eps.shape == (1, 3, PIXEL_SIZE, PIXEL_SIZE)


def test_encoder_channels_are_checked(unet):
    adapter = MDMAdapter(Teacher(unet, "epsilon"), encoder=lambda x: x[:, :1], in_channels=3)
    with pytest.raises(ValueError, match="encoder gave 1 channels"):
        adapter.encode(pixel_images(1))
    with pytest.raises(TypeError):
        MDMAdapter(Teacher(unet, "epsilon"), encoder=None)
    with pytest.raises(ValueError, match="prediction_type"):
        MDMAdapter(Teacher(unet, "epsilon"), encoder=_encode, prediction_type="x0")
