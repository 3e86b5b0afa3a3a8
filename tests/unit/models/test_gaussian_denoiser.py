"""The per-position Gaussian denoiser: Ledoit-Wolf, the closed-form eps, inversion to whitened features."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from sklearn.covariance import LedoitWolf

from invert_ad.inversion import ddim_integrate
from invert_ad.models import GaussianDenoiser, GaussianResidualDenoiser, ledoit_wolf
from invert_ad.schedule import linear_alphas_cumprod, resolve_grid, spaced_grid


def _alphas_cumprod_numpy() -> np.ndarray:
    return np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))


@pytest.mark.parametrize("n_samples", [5, 40, 500])
def test_ledoit_wolf_matches_sklearn(n_samples: int) -> None:
    g = torch.Generator().manual_seed(n_samples)
    mixing = torch.randn(3, 6, 6, generator=g, dtype=torch.float64)
    x = torch.randn(3, n_samples, 6, generator=g, dtype=torch.float64) @ mixing + 2.0
    covariance, shrinkage = ledoit_wolf(x)
    for p in range(3):
        reference = LedoitWolf().fit(x[p].numpy())
        np.testing.assert_allclose(covariance[p].numpy(), reference.covariance_, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(shrinkage[p].item(), reference.shrinkage_, rtol=1e-10)


def test_ledoit_wolf_single_channel_has_no_shrinkage() -> None:
    x = torch.randn(2, 30, 1, dtype=torch.float64)
    covariance, shrinkage = ledoit_wolf(x)
    assert torch.equal(shrinkage, torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(covariance[:, 0, 0], x.var(dim=1, correction=0)[:, 0])


def test_schedule_matches_ddpm_scheduler() -> None:
    model = GaussianDenoiser(in_channels=2, sample_size=2)
    assert model.alphas_cumprod.dtype == torch.float64
    torch.testing.assert_close(model.alphas_cumprod, linear_alphas_cumprod(), rtol=0, atol=0)
    reference = DDPMScheduler().alphas_cumprod.to(torch.float64)
    torch.testing.assert_close(model.alphas_cumprod, reference, rtol=1e-5, atol=1e-7)
    scaled = GaussianDenoiser(2, 2, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    reference = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod
    torch.testing.assert_close(scaled.alphas_cumprod, reference.to(torch.float64), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("shrinkage", ["ledoit_wolf", "diagonal"])
def test_eps_equals_numpy_closed_form(train_features: torch.Tensor, shrinkage: str) -> None:
    model = GaussianDenoiser.fit(train_features, shrinkage=shrinkage)
    feats = train_features.double().numpy()
    _, c, h, w = feats.shape
    x_t = torch.randn(3, c, h, w, generator=torch.Generator().manual_seed(3))
    ab_all = _alphas_cumprod_numpy()
    for t in (0, 10, 333, 500, 999):
        eps = model(x_t, torch.full((3,), t)).sample.double().numpy()
        ab = ab_all[t]
        for i, j in [(0, 0), (1, 2), (3, 3)]:
            samples = feats[:, :, i, j]
            mu = samples.mean(axis=0)
            if shrinkage == "ledoit_wolf":
                sigma = LedoitWolf().fit(samples).covariance_
            else:
                sigma = np.diag(samples.var(axis=0))
            rhs = x_t[:, :, i, j].double().numpy() - np.sqrt(ab) * mu
            expected = np.sqrt(1 - ab) * np.linalg.solve(ab * sigma + (1 - ab) * np.eye(c), rhs.T).T
            np.testing.assert_allclose(eps[:, :, i, j], expected, rtol=1e-4, atol=1e-5)


def test_fit_stores_mean_and_eigendecomposition(train_features: torch.Tensor) -> None:
    model = GaussianDenoiser.fit(train_features, chunk_size=5)
    assert model.config.covariance == "full"
    assert model.mean.shape == (16, 8) and model.eigenvectors.shape == (16, 8, 8)
    torch.testing.assert_close(model.mean, train_features.mean(dim=0).flatten(1).T)
    samples = train_features.flatten(2).permute(2, 0, 1)
    covariance = model.eigenvectors @ torch.diag_embed(model.eigenvalues) @ model.eigenvectors.mT
    torch.testing.assert_close(covariance, ledoit_wolf(samples)[0].float(), rtol=1e-4, atol=1e-5)
    assert not any(True for _ in model.parameters())


def test_unfitted_model_is_the_standard_normal_prior() -> None:
    model = GaussianDenoiser(in_channels=3, sample_size=(2, 3))
    x = torch.randn(2, 3, 2, 3)
    ab = float(linear_alphas_cumprod()[400])
    expected = (1 - ab) ** 0.5 * x  # N(0, I) data: marginal N(0, I), eps* = sqrt(1 - ab) x_t
    torch.testing.assert_close(model(x, 400).sample, expected)


def test_zero_variance_channels_are_floored() -> None:
    features = torch.randn(20, 3, 2, 2)
    features[:, 1] = 5.0
    for shrinkage in ("ledoit_wolf", "diagonal"):
        model = GaussianDenoiser.fit(features, shrinkage=shrinkage, min_variance=1e-4)
        assert model.eigenvalues.min() >= 1e-4
        assert torch.isfinite(model(torch.randn(1, 3, 2, 2), 0).sample).all()


def test_invalid_inputs_rejected(train_features: torch.Tensor) -> None:
    model = GaussianDenoiser.fit(train_features)
    with pytest.raises(ValueError, match="timesteps"):
        model(train_features[:1], 1000)
    with pytest.raises(ValueError, match="sample_size"):
        model(torch.randn(1, 8, 4, 5), 0)
    with pytest.raises(ValueError, match="shrinkage"):
        GaussianDenoiser.fit(train_features, shrinkage="oas")
    with pytest.raises(ValueError, match="N >= 2"):
        GaussianDenoiser.fit(train_features[:1])
    with pytest.raises(ValueError, match="NaN"):
        GaussianDenoiser.fit(torch.full((3, 2, 1, 1), float("nan")))
    with pytest.raises(ValueError, match="covariance"):
        GaussianDenoiser(covariance="sparse")
    with pytest.raises(ValueError, match="beta_schedule"):
        GaussianDenoiser(beta_schedule="cosine")


def test_autocast_does_not_touch_the_closed_form(train_features: torch.Tensor) -> None:
    model = GaussianDenoiser.fit(train_features)
    x = train_features[:2]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eps = model(x, 300).sample
    assert eps.dtype == x.dtype
    torch.testing.assert_close(eps, model(x, 300).sample, rtol=0, atol=0)


@pytest.mark.parametrize("shrinkage", ["ledoit_wolf", "diagonal"])
def test_many_step_inversion_whitens_the_features(shrinkage: str) -> None:
    """METHOD.md section 2: with the exact eps, the PF-ODE maps x0 to about Sigma^-1/2 (x0 - mu) at t = 999.

    Exactly (in the eigenbasis of Sigma): sqrt(a1) mu + sqrt((a1 l + 1 - a1) / (a0 l + 1 - a0)) (x0 - sqrt(a0) mu).
    """
    g = torch.Generator().manual_seed(0)
    features = torch.randn(400, 3, 2, 2, generator=g) * torch.tensor([0.5, 1.0, 3.0]).view(1, 3, 1, 1) + 2.0
    model = GaussianDenoiser.fit(features, shrinkage=shrinkage).double()
    x0 = features[:6].double()
    ab = linear_alphas_cumprod()

    def invert(num_steps: int) -> torch.Tensor:
        grid = spaced_grid(num_steps)
        return ddim_integrate(lambda x, t: model(x, t).sample, x0, grid.call_points, grid.alpha_bars(ab))

    mu = model.mean.T.reshape(1, 3, 2, 2)
    u = model.eigenvectors if shrinkage == "ledoit_wolf" else torch.eye(3, dtype=torch.float64).expand(4, 3, 3)
    lam = model.eigenvalues

    def in_eigenbasis(gain: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # U diag(gain) U^T v per position
        tokens = v.flatten(2).transpose(1, 2)
        out = torch.einsum("pij,pj,pkj,bpk->bpi", u, gain, u, tokens)
        return out.transpose(1, 2).reshape(v.shape)

    a0, a1 = float(ab[0]), float(ab[999])
    exact = a1**0.5 * mu + in_eigenbasis(((a1 * lam + 1 - a1) / (a0 * lam + 1 - a0)).sqrt(), x0 - a0**0.5 * mu)
    latent = invert(999)
    error = (latent - exact).abs().max()
    assert error < 1e-2
    assert 1.8 < (invert(500) - exact).abs().max() / error < 2.2  # Euler DDIM: first-order convergence
    whitened = in_eigenbasis(lam.rsqrt(), x0 - mu)
    torch.testing.assert_close(latent, whitened, rtol=0, atol=0.03)
    if shrinkage == "diagonal":  # the 1-D case per channel: (x0 - mu) / s
        s = features.double().std(dim=0, correction=0)
        torch.testing.assert_close(latent, (x0 - features.double().mean(dim=0)) / s, rtol=0, atol=0.03)


@pytest.mark.parametrize("kind", ["dit", "mlp", "conv"])
def test_untrained_gaussian_residual_equals_the_gaussian_exactly(
    train_features: torch.Tensor, kind: str, randomize
) -> None:
    gaussian = GaussianDenoiser.fit(train_features)
    model = GaussianResidualDenoiser.from_gaussian(gaussian, kind, {"depth": 1})
    x = torch.randn(4, 8, 4, 4)
    t = torch.tensor([0, 250, 600, 999])
    assert torch.equal(model(x, t).sample, gaussian(x, t).sample)
    trainable = {name for name, _ in model.named_parameters()}
    assert trainable and all(name.startswith("residual.") for name in trainable)
    assert model.config.residual_config["depth"] == 1
    assert "in_channels" not in model.config.residual_config
    randomize(model)
    assert not torch.equal(model(x, t).sample, gaussian(x, t).sample)
    assert torch.equal(model.gaussian.mean, gaussian.mean)


def test_gaussian_residual_rejects_conflicting_residual_config() -> None:
    with pytest.raises(ValueError, match="residual_config"):
        GaussianResidualDenoiser(in_channels=4, sample_size=2, residual_config={"in_channels": 4})
    with pytest.raises(ValueError, match="learn_sigma"):
        GaussianResidualDenoiser(4, 2, residual_kind="mlp", residual_config={"learn_sigma": True})
    with pytest.raises(ValueError, match="residual_kind"):
        GaussianResidualDenoiser(in_channels=4, sample_size=2, residual_kind="unet")


def _closed_form_eps(features: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """eps* = sqrt(1 - a) (a Sigma + (1 - a) I)^-1 (x_t - sqrt(a) mu) per position, Sigma by sklearn's LedoitWolf."""
    ab = _alphas_cumprod_numpy()
    feats = features.double().numpy()
    out = np.zeros(x_t.shape)
    for i in range(x_t.shape[2]):
        for j in range(x_t.shape[3]):
            samples = feats[:, :, i, j]
            mu, sigma = samples.mean(axis=0), LedoitWolf().fit(samples).covariance_
            for b, step in enumerate(t.tolist()):
                a = ab[step]
                system = a * sigma + (1 - a) * np.eye(sigma.shape[0])
                rhs = x_t[b, :, i, j].double().numpy() - np.sqrt(a) * mu
                out[b, :, i, j] = np.sqrt(1 - a) * np.linalg.solve(system, rhs)
    return torch.from_numpy(out)


def test_cached_operator_path_equals_the_rotations_and_the_closed_form(train_features: torch.Tensor) -> None:
    """A batch at one timestep runs one product with the cached M_t; mixed batches rotate by U twice: both exact."""
    model = GaussianDenoiser.fit(train_features)
    x = torch.randn(3, 8, 4, 4, generator=torch.Generator().manual_seed(5))
    for step in (0, 333, 999):
        t = torch.full((3,), step)
        with torch.inference_mode():
            cached = model(x, t).sample
        assert step in model._operators  # built on first use, kept
        with torch.inference_mode():
            assert torch.equal(model(x, t).sample, cached)  # reused
        mixed = model(torch.cat([x, x]), torch.tensor([step] * 3 + [(step + 1) % 1000] * 3)).sample[:3]
        expected = _closed_form_eps(train_features, x, t)
        torch.testing.assert_close(cached.double(), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(mixed.double(), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(cached, mixed, rtol=1e-5, atol=1e-6)
    vectors = model.eigenvectors.double()
    operator = model.operator(333)
    torch.testing.assert_close(operator, operator.mT)
    torch.testing.assert_close(  # M_t shares the eigenvectors, with the closed-form gains as eigenvalues
        vectors.mT @ operator @ vectors,
        torch.diag_embed(
            (1 - model.alphas_cumprod[333]).sqrt()
            / (model.alphas_cumprod[333] * model.eigenvalues.double() + 1 - model.alphas_cumprod[333])
        ),
    )


def test_operator_cache_is_bounded_and_follows_the_statistics(train_features: torch.Tensor) -> None:
    model = GaussianDenoiser.fit(train_features)
    other = GaussianDenoiser.fit(train_features[: len(train_features) // 2])
    x = torch.randn(2, 8, 4, 4)
    for step in range(model.max_cached_operators + 2):
        model(x, step)
    assert sorted(model._operators) == list(range(model.max_cached_operators))
    torch.testing.assert_close(model(x, 5).sample, _closed_form_eps(train_features, x, torch.full((2,), 5)).float())
    model.load_state_dict(other.state_dict())  # new statistics: the cached matrices must not be reused
    assert torch.equal(model(x, 0).sample, other(x, 0).sample)
    assert list(model._operators) == [0]
    assert torch.equal(model.double()(x.double(), 1).sample, other.double()(x.double(), 1).sample)


def _reference_eps(model: GaussianDenoiser, features: torch.Tensor, x_t: torch.Tensor, step: int) -> torch.Tensor:
    """eps* by hand for each covariance kind: sklearn's Ledoit-Wolf solve, per-channel variances, or N(0, I)."""
    covariance = model.config.covariance
    if covariance == "full":
        return _closed_form_eps(features, x_t, torch.full((len(x_t),), step))
    a = float(_alphas_cumprod_numpy()[step])
    x = x_t.double()
    if covariance == "identity":
        return (1 - a) ** 0.5 * x
    mu, var = features.double().mean(dim=0), features.double().var(dim=0, correction=0)
    return (1 - a) ** 0.5 * (x - a**0.5 * mu) / (a * var + 1 - a)


@pytest.mark.parametrize("covariance", ["full", "diagonal", "identity"])
@pytest.mark.parametrize("spacing", ["exp:4", "paper", 7])
def test_closed_form_inversion_is_the_euler_steps(train_features: torch.Tensor, covariance: str, spacing) -> None:
    """The whole DDIM inversion as one affine map per position equals the steps written out in float64."""
    if covariance == "identity":
        model = GaussianDenoiser(in_channels=8, sample_size=4, covariance="identity")
    else:
        model = GaussianDenoiser.fit(train_features, shrinkage="ledoit_wolf" if covariance == "full" else "diagonal")
    grid = resolve_grid(spacing, 1000)
    bars = grid.alpha_bars(model.alphas_cumprod).tolist()
    x0 = torch.randn(3, 8, 4, 4, generator=torch.Generator().manual_seed(2))
    expected = x0.double()
    for k, step in enumerate(grid.call_points):  # x <- sqrt(a'/a) x + (sqrt(1 - a') - sqrt(a'/a) sqrt(1 - a)) eps
        a, a_next = bars[k], bars[k + 1]
        eps = _reference_eps(model, train_features, expected, step)
        expected = (a_next / a) ** 0.5 * expected + ((1 - a_next) ** 0.5 - (a_next / a * (1 - a)) ** 0.5) * eps
    got = model.closed_form_inversion(x0, grid.call_points, bars)
    assert got.dtype == torch.float32 and got.shape == x0.shape
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    matrix, offset = model.inversion_map(grid.call_points, bars)
    assert matrix.shape == ((16, 8, 8) if covariance == "full" else (16, 8)) and offset.shape == (16, 8)
    if covariance == "full":
        torch.testing.assert_close(matrix, matrix.mT)


def test_closed_form_inversion_follows_the_statistics(train_features: torch.Tensor) -> None:
    model = GaussianDenoiser.fit(train_features)
    other = GaussianDenoiser.fit(train_features[:32])
    grid = resolve_grid("paper", 1000)
    bars = grid.alpha_bars(model.alphas_cumprod)
    x = torch.randn(2, 8, 4, 4)
    first = model.closed_form_inversion(x, grid.call_points, bars)
    assert len(model._inversion_maps) == 1  # built once, kept
    assert torch.equal(model.closed_form_inversion(x, grid.call_points, bars), first)
    model.load_state_dict(other.state_dict())  # new statistics: the cached map must not be reused
    assert torch.equal(
        model.closed_form_inversion(x, grid.call_points, bars), other.closed_form_inversion(x, grid.call_points, bars)
    )
    with pytest.raises(ValueError, match="alpha-bars"):
        model.inversion_map(grid.call_points, bars[:-1])
    with torch.inference_mode():
        frozen = GaussianDenoiser.fit(train_features)  # inference-mode buffers: no version counter to trust
    assert frozen.closed_form_inversion(x, grid.call_points, bars) is None
