"""The mixture denoiser's eps is Tweedie's formula of the mixture prior: -sqrt(1 - a) grad log p_t, by autograd."""

from __future__ import annotations

import math

import pytest
import torch

from invert_ad.models import GaussianDenoiser, GaussianMixtureDenoiser, create_denoiser
from invert_ad.schedule import linear_alphas_cumprod


def two_products(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of two 'products' with different means and correlations, ``(2n, 3, 2, 2)`` and their labels."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2 * n, 1, 2, 2, generator=g)
    a = 0.8 * base[:n] + 0.3 * torch.randn(n, 3, 2, 2, generator=g) + 2.0
    b = -0.5 * base[n:] + 0.6 * torch.randn(n, 3, 2, 2, generator=g) - 1.0
    return torch.cat([a, b]), torch.cat([torch.zeros(n), torch.ones(n)]).long()


def mixture_log_density(model: GaussianMixtureDenoiser, x: torch.Tensor, ab: float) -> torch.Tensor:
    """log p_t(x) of the mixture, from each component's dense covariance (torch.distributions)."""
    terms = []
    for component, log_weight in zip(model.components, model.log_weights, strict=True):
        vectors, values = component.eigenvectors.double(), component.eigenvalues.double()
        covariance = vectors @ torch.diag_embed(ab * values + 1 - ab) @ vectors.transpose(1, 2)  # (P, C, C)
        mean = math.sqrt(ab) * component.mean.double()  # (P, C)
        positions = x.double().flatten(2).transpose(1, 2)  # (B, P, C)
        normal = torch.distributions.MultivariateNormal(mean, covariance_matrix=covariance)
        terms.append(log_weight.double() + normal.log_prob(positions).sum(dim=1))
    return torch.logsumexp(torch.stack(terms), dim=0)


@pytest.mark.parametrize("t", [0, 200, 666, 999])
def test_eps_is_tweedie_of_the_mixture(t):
    features, labels = two_products()
    model = GaussianMixtureDenoiser.fit(features, labels=labels)
    ab = float(linear_alphas_cumprod()[t])
    x = (math.sqrt(ab) * features[[0, 45, 3]] + math.sqrt(1 - ab) * torch.randn(3, 3, 2, 2)).double()
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(mixture_log_density(model, x, ab).sum(), x)
    expected = -math.sqrt(1 - ab) * grad
    got = model(x.detach().float(), torch.full((3,), t)).sample.double()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_one_component_is_the_gaussian_and_kmeans_finds_the_products():
    features, labels = two_products()
    single = GaussianMixtureDenoiser.fit(features, labels=torch.zeros_like(labels))
    gaussian = GaussianDenoiser.fit(features)
    x, t = torch.randn(4, 3, 2, 2), torch.tensor([0, 300, 600, 999])
    torch.testing.assert_close(single(x, t).sample, gaussian(x, t).sample, rtol=1e-5, atol=1e-6)
    clustered = create_denoiser("gaussian-mixture", 3, 2, features=features, num_components=2)
    by_labels = GaussianMixtureDenoiser.fit(features, labels=labels)
    assert sorted(clustered.log_weights.exp().tolist()) == pytest.approx([0.5, 0.5])
    means = sorted(float(c.mean.mean()) for c in clustered.components)
    assert means == pytest.approx(sorted(float(c.mean.mean()) for c in by_labels.components))


def test_save_load_and_refit(tmp_path):
    features, labels = two_products()
    model = GaussianMixtureDenoiser.fit(features, labels=labels)
    model.save_pretrained(tmp_path / "m")
    loaded = GaussianMixtureDenoiser.from_pretrained(tmp_path / "m")
    x, t = torch.randn(2, 3, 2, 2), torch.tensor([10, 900])
    assert torch.equal(loaded(x, t).sample, model(x, t).sample)
    again = model.refit(features[::2])
    assert again.config.num_components == 2 and again.config.covariance == "full"
    with pytest.raises(ValueError, match="at least two images"):
        GaussianMixtureDenoiser.fit(features[:3], labels=torch.tensor([0, 0, 1]))
