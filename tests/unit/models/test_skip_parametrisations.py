"""Skip and EDM parametrisations: closed forms at initialisation, EDM's formulas, saved configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from invert_ad.models import GaussianDenoiser, GaussianResidualDenoiser, create_denoiser, load_denoiser

SKIP_PRESETS = [f"{name}-{form}" for name in ("dit-s", "mlp", "conv") for form in ("skip", "edm")]
CHANNELS, GRID = 8, (4, 4)  # the sizes of the make_tiny fixture
T = torch.tensor([0, 1, 333, 666, 999])


def _alphas_cumprod() -> torch.Tensor:
    """DDPM's linear schedule (betas 1e-4 .. 0.02 over 1000 steps), float64, written out here."""
    return torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), dim=0)


@pytest.mark.parametrize("preset", SKIP_PRESETS)
def test_untrained_skip_model_is_the_trivial_predictor_exactly(preset: str, make_tiny) -> None:
    model = make_tiny(preset)
    x = torch.randn(len(T), CHANNELS, *GRID)
    trivial = (1 - _alphas_cumprod()[T]).sqrt().float().reshape(-1, 1, 1, 1) * x
    assert torch.equal(model(x, T).sample, trivial)
    assert model.config.covariance == "identity"
    assert model.config.output_scaling == ("edm" if preset.endswith("edm") else "none")
    assert dict(model.gaussian.named_buffers()) == {}  # nothing fitted, nothing saved
    assert all(name.startswith("residual.") for name, _ in model.named_parameters())


def test_skip_presets_use_the_plain_presets_network() -> None:
    with torch.device("meta"):
        dit = create_denoiser("dit-s-skip", 16, 8)
        mlp = create_denoiser("mlp-edm", 16, 8, depth=2)
    assert {k: dit.config.residual_config[k] for k in ("hidden_size", "depth", "num_heads")} == {
        "hidden_size": 256,
        "depth": 4,
        "num_heads": 4,
    }
    assert (mlp.config.residual_config["hidden_size"], mlp.config.residual_config["depth"]) == (512, 2)


def test_edm_form_matches_karras_preconditioning(make_tiny, randomize) -> None:
    """eps of the EDM preset = (x - D) / sigma with EDM's c_skip, c_out, c_in for sigma_data = 1, F = -net."""
    model = randomize(make_tiny("dit-s-edm")).eval()
    x_t = torch.randn(len(T) - 1, CHANNELS, *GRID, dtype=torch.float64)
    t = T[1:]  # sigma > 0
    ab = _alphas_cumprod()[t].reshape(-1, 1, 1, 1)
    sigma = ((1 - ab) / ab).sqrt()
    x = x_t / ab.sqrt()  # EDM's variable: x0 + sigma n
    c_skip, c_out, c_in = 1 / (sigma**2 + 1), sigma / (sigma**2 + 1).sqrt(), 1 / (sigma**2 + 1).sqrt()
    torch.testing.assert_close(c_in * x, x_t)  # the VP input needs no scaling
    with torch.no_grad():
        f = -model.residual(x_t.float(), t).sample.double()
        eps = model(x_t.float(), t).sample.double()
    denoised = c_skip * x + c_out * f
    torch.testing.assert_close(eps, (x - denoised) / sigma, rtol=1e-5, atol=1e-5)


def test_skip_output_scales_with_the_input_at_high_t(make_tiny) -> None:
    """The issue's failure: a plain net's output ignores the input's scale; the skip keeps it at t = 999."""
    model = make_tiny("dit-s-skip")
    x = torch.randn(2, CHANNELS, *GRID)
    with torch.no_grad():
        ratio = model(x / 2, 999).sample.norm() / model(x, 999).sample.norm()
    assert float(ratio) == pytest.approx(0.5, abs=1e-6)


def test_gaussian_edm_residual_is_scaled(train_features: torch.Tensor, randomize) -> None:
    plain = randomize(
        create_denoiser("gaussian-residual-mlp", CHANNELS, GRID, features=train_features, residual_config={"depth": 1})
    )
    edm = create_denoiser(
        "gaussian-residual-mlp-edm", CHANNELS, GRID, features=train_features, residual_config={"depth": 1}
    )
    edm.residual.load_state_dict(plain.residual.state_dict())
    x = torch.randn(len(T), CHANNELS, *GRID)
    gaussian = plain.gaussian(x, T).sample
    scale = _alphas_cumprod()[T].sqrt().float().reshape(-1, 1, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(edm(x, T).sample - gaussian, scale * (plain(x, T).sample - gaussian))


@pytest.mark.parametrize("preset", ["dit-s-edm", "conv-skip"])
def test_parametrisation_survives_save_and_load(preset: str, make_tiny, randomize, tmp_path: Path) -> None:
    model = randomize(make_tiny(preset)).eval()
    model.save_pretrained(tmp_path)
    loaded = load_denoiser(str(tmp_path))
    assert isinstance(loaded, GaussianResidualDenoiser)
    assert (loaded.config.covariance, loaded.config.output_scaling) == (
        model.config.covariance,
        model.config.output_scaling,
    )
    x = torch.randn(len(T), CHANNELS, *GRID)
    assert torch.equal(loaded(x, T).sample, model(x, T).sample)


def test_skip_presets_take_a_schedule_and_reject_bad_scalings() -> None:
    model = create_denoiser("mlp-skip", CHANNELS, GRID, depth=1, beta_schedule="scaled_linear", beta_end=0.012)
    assert model.config.beta_schedule == "scaled_linear" and "beta_end" not in model.config.residual_config
    ab = torch.cumprod(1 - torch.linspace(1e-4**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2, dim=0)
    x = torch.randn(1, CHANNELS, *GRID)
    torch.testing.assert_close(model(x, 500).sample, (1 - ab[500]).sqrt().float() * x)
    with pytest.raises(ValueError, match="output_scaling"):
        GaussianResidualDenoiser(CHANNELS, GRID, covariance="identity", output_scaling="karras")
    with pytest.raises(ValueError, match="covariance"):
        GaussianDenoiser(CHANNELS, GRID, covariance="spherical")
