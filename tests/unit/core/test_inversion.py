"""The Euler DDIM loop against closed forms for Gaussian data (METHOD.md section 2) and a hand-written loop."""

import numpy as np
import pytest
import torch

from invert_ad.inversion import ddim_integrate, one_step_irf
from invert_ad.schedule import linear_alphas_cumprod, resolve_grid, spaced_grid

AB = linear_alphas_cumprod()
MU, SIGMA = 1.5, 0.4


def exact_eps(x, t):
    """eps* of x0 ~ N(MU, SIGMA^2 I)."""
    a = AB[t].reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    return (1 - a).sqrt() * (x - a.sqrt() * MU) / (a * SIGMA**2 + 1 - a)


def test_many_step_inversion_follows_the_pf_ode_map():
    """DDIM is a first-order solver: the error against the exact PF-ODE map halves as the steps double."""
    x0 = MU + SIGMA * torch.randn(8, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a = AB[999]
    expected = a.sqrt() * MU + (a * SIGMA**2 + 1 - a).sqrt() * (x0 - MU) / SIGMA
    errors = []
    for steps in (250, 500, 999):
        grid = spaced_grid(steps)
        z = ddim_integrate(exact_eps, x0, grid.call_points, grid.alpha_bars(AB))
        errors.append((z - expected).abs().max().item())
    assert errors[-1] < 0.015
    assert 1.8 < errors[0] / errors[1] < 2.2 and 1.8 < errors[1] / errors[2] < 2.2
    torch.testing.assert_close(z, (x0 - MU) / SIGMA, atol=3e-2, rtol=0)


def test_inversion_then_denoising_returns_the_input():
    x0 = MU + SIGMA * torch.randn(4, 2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grid = spaced_grid(500)
    z = ddim_integrate(exact_eps, x0, grid.call_points, grid.alpha_bars(AB))
    back_points = grid.points[::-1][:-1]
    back_ab = torch.cat([AB[list(back_points)], AB.new_tensor([AB[0].item()])])
    x = ddim_integrate(exact_eps, z, back_points, back_ab)
    torch.testing.assert_close(x, x0, atol=3e-2, rtol=0)  # two first-order passes of 500 steps


def hand_inversion(x, points, terminal=None):
    """Written from the formulas: eps at the source, x0hat, then re-noise to the next alpha-bar."""
    ab = AB.numpy()
    x = x.numpy().astype(np.float64)
    calls = points if terminal is not None else points[:-1]
    for k, t in enumerate(calls):
        eps = exact_eps(torch.from_numpy(x), torch.full((x.shape[0],), t)).numpy()
        x0hat = (x - np.sqrt(1 - ab[t]) * eps) / np.sqrt(ab[t])
        a_next = terminal if k == len(calls) - 1 and terminal is not None else ab[points[k + 1]]
        x = np.sqrt(a_next) * x0hat + np.sqrt(1 - a_next) * eps
    return x


@pytest.mark.parametrize("preset", ["paper", "official", "quad:3"])
def test_three_step_grids_match_a_hand_computation(preset):
    grid = resolve_grid(preset)
    x0 = MU + SIGMA * torch.randn(5, 3, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    z = ddim_integrate(exact_eps, x0, grid.call_points, grid.alpha_bars(AB))
    np.testing.assert_allclose(z.numpy(), hand_inversion(x0, list(grid.points), grid.terminal_alpha_bar), atol=1e-10)


def test_official_grid_final_latent_is_the_last_eps():
    grid = resolve_grid("official")
    x0 = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    z, trajectory = ddim_integrate(exact_eps, x0, grid.call_points, grid.alpha_bars(AB), return_trajectory=True)
    assert len(trajectory) == 4
    torch.testing.assert_close(z, exact_eps(trajectory[2], torch.full((3,), 999)))


def test_float32_state_keeps_dtype():
    x0 = torch.randn(2, 3, 2, 2)
    grid = resolve_grid("paper")
    z = ddim_integrate(exact_eps, x0, grid.call_points, grid.alpha_bars(AB))
    assert z.dtype == torch.float32


def test_irf_is_eps_on_the_mean_path():
    x0 = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    out = one_step_irf(exact_eps, x0, 500, AB[500].item())
    a = AB[500].item()
    expected = np.sqrt(1 - a) * (np.sqrt(a) * x0.numpy() - np.sqrt(a) * MU) / (a * SIGMA**2 + 1 - a)
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-12)


def test_alpha_bar_count_is_checked():
    with pytest.raises(ValueError, match="alpha-bars"):
        ddim_integrate(exact_eps, torch.zeros(1, 1, 1, 1), [0, 5], AB[:2])
