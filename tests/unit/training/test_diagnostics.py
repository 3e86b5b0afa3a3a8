"""Training diagnostics against closed forms: per-t eps-MSE of known predictors, latents, the scale ratio."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from invert_ad.models import GaussianDenoiser
from invert_ad.training.diagnostics import diagnose_denoiser

C, GRID = 4, (2, 2)


def _alphas_cumprod() -> torch.Tensor:
    return torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), dim=0)


def _normal(scale: float, n: int = 1024) -> torch.Tensor:
    return scale * torch.randn(n, C, *GRID, generator=torch.Generator().manual_seed(3))


def _exact_gaussian(variance: float) -> GaussianDenoiser:
    """The N(0, variance I) prior's eps, set by hand (no fitting noise)."""
    model = GaussianDenoiser(C, GRID, covariance="diagonal")
    model.eigenvalues.fill_(variance)
    return model


class ConstantNorm(nn.Module):
    """A network whose output ignores its input's scale (an undertrained plain DiT's failure)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.weight * torch.ones_like(x)


@pytest.mark.parametrize("std", [1.0, 2.0])
def test_per_t_mse_of_the_references_match_closed_forms(std: float) -> None:
    ab = _alphas_cumprod()
    result = diagnose_denoiser(
        _exact_gaussian(std**2), _normal(std), ab, gaussian=_exact_gaussian(std**2), max_images=1024
    )
    assert result["call_points"] == [0, 333, 666]
    s2 = std**2
    for t in result["call_points"]:
        a = float(ab[t])
        trivial = a * a + a * (1 - a) * s2  # E|a eps - sqrt(a (1 - a)) x0|^2; = a for unit variance
        gaussian = 1 - (1 - a) / (a * s2 + 1 - a)  # Var(eps | x_t) for N(0, s2 I) data
        assert result["eps_mse"]["trivial"][str(t)] == pytest.approx(trivial, rel=0.05)
        assert result["eps_mse"]["gaussian"][str(t)] == pytest.approx(gaussian, rel=0.05)
        assert result["eps_mse"]["model"][str(t)] == result["eps_mse"]["gaussian"][str(t)]  # same draws
    json.dumps(result)  # fit for a training record


def test_trivial_model_latent_and_scale_ratio_are_exact() -> None:
    """On the paper grid, the trivial predictor maps x0 to prod_k (sqrt(a_k a_k+1) + sqrt((1-a_k)(1-a_k+1))) x0."""
    ab = _alphas_cumprod()
    x0 = _normal(1.0, 64)
    result = diagnose_denoiser(GaussianDenoiser(C, GRID, covariance="identity"), x0, ab, trained=True)
    factor = 1.0
    for i, j in ((0, 333), (333, 666), (666, 999)):
        factor *= float((ab[i] * ab[j]).sqrt() + ((1 - ab[i]) * (1 - ab[j])).sqrt())
    assert factor == pytest.approx(0.5016, abs=1e-4)
    assert result["latent"]["model"]["std"] == pytest.approx(factor * float(x0.std()), rel=1e-5)
    assert result["latent"]["trivial"] == result["latent"]["model"]
    assert result["output_scale_ratio"] == {"t": 666, "model": pytest.approx(0.5, abs=1e-6), "ideal": 0.5}
    assert result["status"] == "ready" and result["behind"] == {}
    assert result["verdict"].startswith("better than the trivial predictor at every call point (t=0, t=333, t=666)")


def test_a_scale_blind_network_is_reported_behind_the_gaussian() -> None:
    ab = _alphas_cumprod()
    result = diagnose_denoiser(ConstantNorm(), _normal(2.0, 64), ab, gaussian=_exact_gaussian(4.0))
    assert result["status"] == "behind_trivial"
    assert set(result["behind"]) == {"0", "333", "666"}  # at t = 0 both references are within sampling noise
    assert result["behind"]["333"] == result["behind"]["666"] == "gaussian"
    assert result["output_scale_ratio"]["model"] == pytest.approx(1.0)
    assert result["eps_mse"]["model"]["666"] == pytest.approx(2.0, rel=0.05)  # E(1 - n)^2
    verdict = result["verdict"]
    assert verdict.startswith("not yet better than the trivial predictor at the last call t=666 (eps-MSE 2.0")
    assert "output-scale ratio 1.00" in verdict and "--denoiser gaussian" in verdict and "\n" not in verdict


def test_a_sound_model_behind_the_gaussian_is_told_to_compare() -> None:
    """The trivial predictor on N(0, 4 I) data: scale-correct, better than nothing, worse than the exact Gaussian."""
    ab = _alphas_cumprod()
    model = GaussianDenoiser(C, GRID, covariance="identity")
    result = diagnose_denoiser(model, _normal(2.0, 256), ab, gaussian=_exact_gaussian(4.0), trained=True)
    assert result["status"] == "behind_gaussian"
    assert result["behind"]["333"] == "gaussian"
    assert result["verdict"].startswith("not yet better than the Gaussian at ")
    assert "compare with --denoiser gaussian" in result["verdict"]


def test_fitted_models_and_bad_inputs() -> None:
    ab = _alphas_cumprod()
    result = diagnose_denoiser(_exact_gaussian(1.0), _normal(1.0, 8), ab, grid=[0, 500, 999], draws=1)
    assert result["status"] == "fitted" and result["call_points"] == [0, 500]
    assert result["verdict"].startswith("fitted denoiser, nothing trained")
    with pytest.raises(ValueError, match=r"\(N, C, h, w\)"):
        diagnose_denoiser(_exact_gaussian(1.0), torch.zeros(0, C, *GRID), ab)
    with pytest.raises(ValueError, match="draws"):
        diagnose_denoiser(_exact_gaussian(1.0), _normal(1.0, 8), ab, draws=0)
