"""Position-free Gaussian priors: the shared Gaussian's exact eps, pooled statistics, whitening, memory sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.covariance import LedoitWolf

from invert_ad.inversion import ddim_integrate
from invert_ad.models import (
    GaussianDenoiser,
    SharedGaussianDenoiser,
    covariance_bytes,
    fit_neighbourhood_gaussian,
    whiten,
)
from invert_ad.models.shared_gaussian import streaming_ledoit_wolf
from invert_ad.schedule import linear_alphas_cumprod, spaced_grid


def _position_vectors(features: torch.Tensor) -> np.ndarray:
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1]).double().numpy()


def test_eps_is_the_isotropic_closed_form_of_method_section_2() -> None:
    # METHOD.md section 2: x0 ~ N(mu, s^2 I) has eps*(x_t, t) = sqrt(1-ab) (x_t - sqrt(ab) mu) / (ab s^2 + 1 - ab)
    mu, s2 = torch.tensor([0.5, -1.0, 2.0]), 0.3
    model = SharedGaussianDenoiser(in_channels=3, sample_size=(2, 5))
    rotation = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0)))[0]
    model.mean.copy_(mu)
    model.eigenvalues.fill_(s2)
    model.eigenvectors.copy_(rotation)  # any basis of an isotropic covariance
    x_t = torch.randn(4, 3, 2, 5, generator=torch.Generator().manual_seed(1))
    ab_all = linear_alphas_cumprod()
    for t in (0, 250, 666, 999):
        ab = float(ab_all[t])
        expected = (1 - ab) ** 0.5 * (x_t - ab**0.5 * mu[:, None, None]) / (ab * s2 + 1 - ab)
        torch.testing.assert_close(model(x_t, t).sample, expected, rtol=1e-5, atol=1e-6)


def test_eps_equals_the_matrix_form_for_a_fitted_covariance() -> None:
    g = torch.Generator().manual_seed(2)
    features = torch.einsum("dc,nchw->ndhw", torch.randn(5, 5, generator=g), torch.randn(30, 5, 3, 3, generator=g))
    model = SharedGaussianDenoiser.fit(features)
    covariance = LedoitWolf().fit(_position_vectors(features)).covariance_
    mean = _position_vectors(features).mean(0)
    x_t = torch.randn(2, 5, 3, 3, generator=g)
    ab_all = linear_alphas_cumprod().numpy()
    for t in (0, 500, 999):
        a = ab_all[t]
        # sqrt(1 - a) (a Sigma + (1 - a) I)^{-1} (x - sqrt(a) mu), solved position by position
        deviation = _position_vectors(x_t) - a**0.5 * mean
        expected = (1 - a) ** 0.5 * np.linalg.solve(a * covariance + (1 - a) * np.eye(5), deviation.T).T
        got = _position_vectors(model(x_t, torch.tensor([t, t])).sample)
        np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-5)


def test_many_step_inversion_returns_the_whitened_features() -> None:
    """METHOD.md section 2: many-step inversion maps x0 ~ N(mu, s^2 I) to ~ (x0 - mu) / s at t = 999.

    Exactly: sqrt(a1) mu + sqrt((a1 s^2 + 1 - a1) / (a0 s^2 + 1 - a0)) (x0 - sqrt(a0) mu), a0 = ab[0], a1 = ab[999].
    """
    mu, s2 = 1.5, 0.16
    model = SharedGaussianDenoiser(in_channels=2, sample_size=3, covariance="diagonal").double()
    model.mean.fill_(mu)
    model.eigenvalues.fill_(s2)
    x0 = mu + s2**0.5 * torch.randn(3, 2, 3, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ab = linear_alphas_cumprod()

    def invert(num_steps: int) -> torch.Tensor:
        grid = spaced_grid(num_steps, "uniform", 1000)
        return ddim_integrate(lambda x, t: model(x, t).sample, x0, grid.call_points, grid.alpha_bars(ab))

    a0, a1 = float(ab[0]), float(ab[999])
    exact = a1**0.5 * mu + ((a1 * s2 + 1 - a1) / (a0 * s2 + 1 - a0)) ** 0.5 * (x0 - a0**0.5 * mu)
    latent = invert(999)
    error = (latent - exact).abs().max()
    assert error < 1e-2
    assert 1.8 < (invert(500) - exact).abs().max() / error < 2.2  # Euler DDIM: first-order convergence
    torch.testing.assert_close(latent, (x0 - mu) / s2**0.5, rtol=0, atol=0.03)
    torch.testing.assert_close(whiten(model, x0).double(), (x0 - mu) / s2**0.5, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 3, 100])
def test_streaming_ledoit_wolf_matches_sklearn(chunk_size: int) -> None:
    g = torch.Generator().manual_seed(5)
    features = torch.randn(7, 6, 2, 3, generator=g) * torch.rand(1, 6, 1, 1, generator=g) + 3.0
    mean, covariance, empirical, shrinkage = streaming_ledoit_wolf(features, chunk_size)
    samples = _position_vectors(features)
    reference = LedoitWolf().fit(samples)
    np.testing.assert_allclose(covariance.numpy(), reference.covariance_, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(shrinkage.item(), reference.shrinkage_, rtol=1e-10)
    np.testing.assert_allclose(mean.numpy(), samples.mean(0), rtol=1e-12)
    np.testing.assert_allclose(empirical.numpy(), np.cov(samples.T, bias=True), rtol=1e-10, atol=1e-12)


def test_diagonal_shared_fit_keeps_plain_variances() -> None:
    features = torch.randn(10, 4, 3, 3, generator=torch.Generator().manual_seed(6)) * 2
    model = SharedGaussianDenoiser.fit(features, shrinkage="diagonal")
    assert "eigenvectors" not in dict(model.named_buffers())
    np.testing.assert_allclose(model.eigenvalues.numpy(), _position_vectors(features).var(0), rtol=1e-5)


def test_window_one_is_the_per_position_fit(train_features: torch.Tensor) -> None:
    pooled = fit_neighbourhood_gaussian(train_features, window=1)
    plain = GaussianDenoiser.fit(train_features)
    for name, buffer in plain.named_buffers():
        torch.testing.assert_close(pooled.get_buffer(name), buffer, rtol=1e-5, atol=1e-6)


def test_window_pools_the_neighbourhood(train_features: torch.Tensor) -> None:
    model = fit_neighbourhood_gaussian(train_features, window=3)
    # corner (0, 0) pools rows 0..1 and columns 0..1; the inner position (1, 2) pools rows 0..2, columns 1..3
    for (i, j), rows, cols in [((0, 0), slice(0, 2), slice(0, 2)), ((1, 2), slice(0, 3), slice(1, 4))]:
        samples = _position_vectors(train_features[:, :, rows, cols])
        reference = LedoitWolf().fit(samples)
        p = i * train_features.shape[3] + j
        np.testing.assert_allclose(model.mean[p].numpy(), samples.mean(0), rtol=1e-5, atol=1e-6)
        covariance = model.eigenvectors[p] @ torch.diag(model.eigenvalues[p]) @ model.eigenvectors[p].T
        np.testing.assert_allclose(covariance.numpy(), reference.covariance_, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("window", [0, 2, -3, 1.0])
def test_window_must_be_positive_and_odd(train_features: torch.Tensor, window) -> None:
    with pytest.raises(ValueError, match="positive odd int"):
        fit_neighbourhood_gaussian(train_features, window=window)


def test_bad_fit_input() -> None:
    with pytest.raises(ValueError, match=r"\(N, C, h, w\)"):
        SharedGaussianDenoiser.fit(torch.randn(4, 3, 2))
    with pytest.raises(ValueError, match="NaN"):
        SharedGaussianDenoiser.fit(torch.full((2, 3, 2, 2), float("nan")))
    with pytest.raises(ValueError, match="unknown shrinkage"):
        SharedGaussianDenoiser.fit(torch.randn(2, 3, 2, 2), shrinkage="oas")
    with pytest.raises(ValueError, match="unknown covariance"):
        SharedGaussianDenoiser(covariance="low_rank")


@pytest.mark.parametrize("kind", ["shared", "position"])
def test_whitened_norm_is_the_mahalanobis_distance(train_features: torch.Tensor, kind: str) -> None:
    model = SharedGaussianDenoiser.fit(train_features) if kind == "shared" else GaussianDenoiser.fit(train_features)
    x = torch.randn(3, 8, 4, 4, generator=torch.Generator().manual_seed(7)) * 2
    got = whiten(model, x).norm(dim=1)
    for b, i, j in [(0, 0, 0), (1, 2, 3), (2, 3, 1)]:
        own = train_features if kind == "shared" else train_features[:, :, i : i + 1, j : j + 1]
        samples = _position_vectors(own)
        reference = LedoitWolf().fit(samples)
        d = x[b, :, i, j].double().numpy() - samples.mean(0)
        expected = np.sqrt(d @ np.linalg.solve(reference.covariance_, d))
        np.testing.assert_allclose(got[b, i, j].item(), expected, rtol=1e-4)


def test_shared_prior_works_on_a_32x32_grid() -> None:
    features = torch.randn(3, 6, 32, 32, generator=torch.Generator().manual_seed(8))
    model = SharedGaussianDenoiser.fit(features)
    assert model(features[:2], 10).sample.shape == (2, 6, 32, 32)
    with pytest.raises(ValueError, match="sample_size"):
        model(torch.randn(1, 6, 16, 16), 10)


def test_covariance_bytes() -> None:
    assert covariance_bytes(192, 16) == 256 * 192 * 192 * 4 == 37_748_736
    assert covariance_bytes(192, 32) == 150_994_944
    assert covariance_bytes(192, (64, 64)) == 603_979_776
    assert covariance_bytes(192, 64, shared=True) == 147_456
