"""InversionScorer end to end with every denoiser kind, prediction-type conversion and bad input."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiTTransformer2DModel, UNet2DModel

from invert_ad import InversionScorer, NotFittedError
from invert_ad.schedule import linear_alphas_cumprod

C, H = 4, 8


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=H,
        in_channels=C,
        out_channels=C,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    ).eval()


@pytest.fixture(scope="module")
def dit():
    torch.manual_seed(0)
    return DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=C,
        out_channels=2 * C,  # learned sigma
        num_layers=1,
        sample_size=H,
        patch_size=2,
        norm_num_groups=4,
    ).eval()


def features(n=5, seed=0):
    return torch.randn(n, C, H, H, generator=torch.Generator().manual_seed(seed))


def linear_eps(x, t):
    """A fixed callable denoiser: eps depends on x and t."""
    return 0.3 * x + 1e-3 * t.float().reshape(-1, 1, 1, 1)


@pytest.mark.parametrize("kind", ["unet", "dit", "callable", "learned_sigma_callable"])
@pytest.mark.parametrize("scoring", ["nll", "maxmin", "hybrid", "irf", "reconstruction"])
def test_every_denoiser_kind_and_scorer(kind, scoring, request):
    denoiser = {
        "unet": lambda: request.getfixturevalue("unet"),
        "dit": lambda: request.getfixturevalue("dit"),
        "callable": lambda: linear_eps,
        "learned_sigma_callable": lambda: lambda x, t: torch.cat([linear_eps(x, t), torch.ones_like(x)], 1),
    }[kind]()
    scorer = InversionScorer(denoiser, DDPMScheduler(), timesteps="paper", scoring=scoring)
    x = features()
    assert scorer.invert(x).shape == x.shape
    scorer.fit(features(6, seed=1))
    out = scorer.score(x, batch_size=2)
    assert out.raw_score.shape == (5,) and out.raw_map.shape == (5, H, H) and out.latent.shape == x.shape
    assert torch.isfinite(out.raw_score).all()
    assert scorer.nfe == {"irf": 1}.get(scoring, 3)


def test_dit_is_called_with_its_null_class(dit):
    seen = {}
    hook = dit.register_forward_pre_hook(lambda m, args, kwargs: seen.update(kwargs), with_kwargs=True)
    InversionScorer(dit, DDPMScheduler()).invert(features(2))
    hook.remove()
    assert seen["class_labels"].tolist() == [dit.config.num_embeds_ada_norm] * 2


def test_learned_sigma_takes_the_first_channels():
    base = InversionScorer(linear_eps, DDPMScheduler(), scoring="nll").invert(features())
    sigma = InversionScorer(lambda x, t: torch.cat([linear_eps(x, t), 7 * x], 1), DDPMScheduler()).invert(features())
    torch.testing.assert_close(base, sigma)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_other_prediction_types_give_the_eps_model_latents(prediction_type):
    ab = linear_alphas_cumprod()

    def converted(x, t):
        eps = linear_eps(x, t).double()
        a = ab[t].reshape(-1, 1, 1, 1)
        x0 = (x.double() - (1 - a).sqrt() * eps) / a.sqrt()
        out = a.sqrt() * eps - (1 - a).sqrt() * x0 if prediction_type == "v_prediction" else x0
        return out.float()

    reference = InversionScorer(linear_eps, DDIMScheduler(), timesteps="official").invert(features())
    other = InversionScorer(converted, DDIMScheduler(prediction_type=prediction_type), timesteps="official")
    torch.testing.assert_close(other.invert(features()), reference, atol=1e-5, rtol=1e-5)


def test_bad_input(unet):
    scorer = InversionScorer(unet, DDPMScheduler(), scoring="nll")
    with pytest.raises(ValueError, match=r"\(B, C, h, w\)"):
        scorer.score(torch.zeros(C, H, H))
    with pytest.raises(ValueError, match="3 channels but the denoiser expects 4"):
        scorer.score(torch.zeros(2, 3, H, H))
    bad = features()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        scorer.score(bad)
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        scorer.score(bad.numpy())
    with pytest.raises(ValueError, match="strictly increasing"):
        InversionScorer(unet, DDPMScheduler(), timesteps=[0, 666, 333])
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        InversionScorer(unet, DDPMScheduler(), timesteps=[0, 500, 1200])
    with pytest.raises(TypeError, match="alphas_cumprod"):
        InversionScorer(unet, object())
    with pytest.raises(ValueError, match="irf_timestep"):
        InversionScorer(unet, DDPMScheduler(), irf_timestep=1000)
    with pytest.raises(TypeError, match="callable"):
        InversionScorer("unet", DDPMScheduler())
    with pytest.raises(NotFittedError):
        InversionScorer(unet, DDPMScheduler(), scoring="hybrid").score(features())
    with pytest.raises(ValueError, match="does not match"):
        InversionScorer(lambda x, t: x[:, :1], DDPMScheduler(), scoring="nll").score(features())


def test_runs_in_the_denoiser_dtype(unet):
    scorer = InversionScorer(unet.to(torch.float64), DDPMScheduler(), scoring="nll")
    assert scorer.invert(features()).dtype == torch.float64
    unet.to(torch.float32)


def test_cpu_bf16_autocast_agrees_with_fp32(unet):
    x = features()
    ref = InversionScorer(unet, DDPMScheduler(), scoring="nll").invert(x)
    bf16 = InversionScorer(unet, DDPMScheduler(), scoring="nll", autocast_dtype=torch.bfloat16).invert(x)
    assert bf16.dtype == torch.float32
    assert (bf16 - ref).abs().max() < 0.1 * ref.abs().max()


def test_a_trained_toy_model_ranks_outliers_above_inliers():
    """Train an eps-MLP on per-position Gaussian data (seconds), then score inliers and 5-sigma outliers."""
    g = torch.Generator().manual_seed(0)
    mu = torch.tensor([2.0, -1.0]).reshape(1, 2, 1, 1).expand(1, 2, 2, 2)
    sd = 0.5

    def sample(n):
        return mu + sd * torch.randn(n, 2, 2, 2, generator=g)

    net = torch.nn.Sequential(
        torch.nn.Linear(9, 128), torch.nn.SiLU(), torch.nn.Linear(128, 128), torch.nn.SiLU(), torch.nn.Linear(128, 8)
    )

    def denoiser(x, t):
        inp = torch.cat([x.flatten(1), (t.float() / 1000).unsqueeze(1)], 1)
        return net(inp).reshape(x.shape)

    ab = linear_alphas_cumprod().float()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(1500):
        x0 = sample(256)
        t = torch.randint(0, 1000, (256,), generator=g)
        a = ab[t].reshape(-1, 1, 1, 1)
        noise = torch.randn(x0.shape, generator=g)
        loss = (denoiser(a.sqrt() * x0 + (1 - a).sqrt() * noise, t) - noise).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    scorer = InversionScorer(denoiser, DDPMScheduler()).fit(sample(256))
    inliers = sample(200)
    outliers = inliers.clone()
    outliers[:, :, 0, 0] += 5 * sd  # one anomalous position per sample
    s_in, s_out = scorer.score(inliers).raw_score, scorer.score(outliers).raw_score
    auroc = (s_out.unsqueeze(1) > s_in.unsqueeze(0)).float().mean()
    assert auroc > 0.95
    z = scorer.invert(inliers)
    assert 0.7 < z.std() < 1.3 and z.mean().abs() < 0.3  # inverted normal data look like N(0, I)


def test_a_gaussian_denoiser_inverts_in_closed_form_with_the_steps_latent():
    """The scorer takes the Gaussian's one-product inversion; a plain callable of the same eps takes the steps."""
    from invert_ad.models import GaussianDenoiser

    g = torch.Generator().manual_seed(3)
    mixing = torch.randn(6, 6, generator=g)
    base = torch.randn(40, 6, 3, 3, generator=g)
    features = torch.einsum("dc,nchw->ndhw", mixing, base) + torch.linspace(-1, 1, 9).reshape(3, 3)
    gaussian = GaussianDenoiser.fit(features)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    closed = InversionScorer(gaussian, scheduler, timesteps="exp:4")
    stepped = InversionScorer(lambda x, t: gaussian(x, t).sample, scheduler, timesteps="exp:4")
    x = torch.randn(4, 6, 3, 3, generator=g)
    latent = closed.invert(x)
    assert len(gaussian._inversion_maps) == 1
    torch.testing.assert_close(latent, stepped.invert(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(closed.latents(x), latent, rtol=0, atol=0)
    _, trajectory = closed.invert(x, return_trajectory=True)  # the states on the way are the steps'
    assert len(trajectory) == 5
    torch.testing.assert_close(trajectory[-1], latent, rtol=1e-5, atol=1e-5)
