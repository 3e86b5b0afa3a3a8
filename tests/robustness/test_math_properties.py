"""Property-based tests (hypothesis) of the core math: grids, the DDIM loop, and the scores' invariances."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from invert_ad.inversion import ddim_integrate, ddim_step, one_step_irf
from invert_ad.models import GaussianDenoiser
from invert_ad.schedule import SPACINGS, InversionGrid, linear_alphas_cumprod, resolve_grid, spaced_grid
from invert_ad.scoring import HybridScorer, MaxMinScorer, MaxNormScorer, NLLScorer, gaussian_nll, max_min, norm_map

AB = linear_alphas_cumprod()
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)


def tensors(shape, elements=finite):
    return st.lists(elements, min_size=math.prod(shape), max_size=math.prod(shape)).map(
        lambda values: torch.tensor(values, dtype=torch.float32).reshape(shape)
    )


@st.composite
def latents(draw, min_batch=1, max_batch=5):
    shape = (
        draw(st.integers(min_batch, max_batch)),
        draw(st.integers(1, 4)),
        draw(st.integers(1, 4)),
        draw(st.integers(1, 4)),
    )
    return draw(tensors(shape, st.floats(-50, 50, allow_nan=False, width=32)))


# ------------------------------------------------------------------ grids
def check_grid(grid: InversionGrid, num_train_timesteps: int) -> None:
    points = grid.points
    assert all(isinstance(p, int) for p in points)
    assert all(0 <= p < num_train_timesteps for p in points)
    assert all(b > a for a, b in itertools.pairwise(points))
    assert grid.num_calls == len(grid.call_points) >= 1
    alpha_bars = grid.alpha_bars(linear_alphas_cumprod(num_train_timesteps))
    assert len(alpha_bars) == grid.num_calls + 1 and bool((alpha_bars[1:] < alpha_bars[:-1]).all())


@FAST
@given(st.integers(2, 2000), st.data())
def test_uniform_int_grids_have_exactly_the_requested_calls(num_train_timesteps, data):
    steps = data.draw(st.integers(1, num_train_timesteps - 1))
    grid = resolve_grid(steps, num_train_timesteps)
    check_grid(grid, num_train_timesteps)
    assert grid.num_calls == steps and grid.points[0] == 0 and grid.points[-1] == num_train_timesteps - 1


@FAST
@given(st.integers(2, 2000), st.sampled_from(sorted(SPACINGS)), st.integers(1, 60))
def test_spaced_grids_are_valid_or_refused_cleanly(num_train_timesteps, spacing, steps):
    try:
        grid = resolve_grid(f"{spacing}:{steps}", num_train_timesteps)
    except ValueError as err:
        assert "repeated timesteps" in str(err) or "exceeds" in str(err)
        return
    check_grid(grid, num_train_timesteps)
    assert grid.num_calls == steps and grid.points == spaced_grid(steps, spacing, num_train_timesteps).points


@FAST
@given(st.integers(4, 2000), st.sampled_from(["paper", "official"]))
def test_presets_have_three_calls(num_train_timesteps, preset):
    grid = resolve_grid(preset, num_train_timesteps)
    check_grid(grid, num_train_timesteps)
    assert grid.num_calls == 3


@FAST
@given(st.lists(st.integers(-5, 1100), min_size=0, max_size=8), st.integers(2, 1000))
def test_explicit_point_lists_are_accepted_iff_valid(points, num_train_timesteps):
    valid = (
        len(points) >= 2
        and all(0 <= p < num_train_timesteps for p in points)
        and all(b > a for a, b in itertools.pairwise(points))
    )
    try:
        grid = resolve_grid(points, num_train_timesteps)
    except ValueError:
        assert not valid
    else:
        assert valid
        check_grid(grid, num_train_timesteps)
        assert grid.num_calls == len(points) - 1


@FAST
@given(st.text(max_size=12) | st.floats() | st.none() | st.booleans())
def test_nonsense_specs_raise_value_or_type_error(spec):
    try:
        grid = resolve_grid(spec)
    except (ValueError, TypeError):
        return
    check_grid(grid, 1000)  # a string that happens to be valid ("paper", "quad:7", ...)


# ------------------------------------------------------------------ the DDIM loop
def bounded_eps(bound: float):
    return lambda x, t: bound * torch.tanh(x + t.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype) / 1000)


@FAST
@given(latents(), st.floats(0.0, 10.0), st.integers(1, 50), st.sampled_from([None, 0.0]))
def test_inversion_of_finite_inputs_with_bounded_eps_is_finite(x, bound, steps, terminal):
    grid = spaced_grid(steps)
    grid = InversionGrid(grid.points, terminal) if terminal is not None else grid
    z, trajectory = ddim_integrate(bounded_eps(bound), x, grid.call_points, grid.alpha_bars(AB), True)
    assert z.shape == x.shape and z.dtype == x.dtype and len(trajectory) == grid.num_calls + 1
    assert all(torch.isfinite(state).all() for state in trajectory)
    # each inverting step is x' = c_x x + c_eps eps with c_x, c_eps in [0, 1]: |x'| <= |x| + bound
    assert z.abs().max() <= x.abs().max() + 2 * bound * grid.num_calls + 1e-3
    assert torch.isfinite(one_step_irf(bounded_eps(bound), x, 500, float(AB[500]))).all()


@FAST
@given(
    tensors((3, 4), st.floats(-100, 100, allow_nan=False)),
    tensors((3, 4), st.floats(-10, 10, allow_nan=False)),
    st.integers(0, 998),
    st.data(),
)
def test_a_ddim_step_and_its_reverse_with_the_same_eps_cancel(x, eps, t, data):
    t_next = data.draw(st.integers(t + 1, 999))
    x, eps = x.double(), eps.double()
    forward = ddim_step(x, eps, float(AB[t]), float(AB[t_next]))
    back = ddim_step(forward, eps, float(AB[t_next]), float(AB[t]))
    torch.testing.assert_close(back, x, rtol=1e-9, atol=1e-9)


@pytest.fixture(scope="module")
def gaussian():
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(64, 3, 2, 2, generator=generator, dtype=torch.float64)
    mixing = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.7, 0.0], [0.2, -0.3, 0.4]], dtype=torch.float64)
    features = 1.5 + torch.einsum("ij,njhw->nihw", mixing, base)
    return GaussianDenoiser.fit(features.float()).double(), features


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, 2**31 - 1), st.sampled_from([200, 400]))
def test_invert_then_denoise_returns_the_input_with_the_exact_gaussian_eps(gaussian, seed, steps):
    """Exact eps of the fitted Gaussian: inversion to t = T-1 then denoising back recovers x0 (first order)."""
    model, features = gaussian

    def eps(x, t):
        return model(x, t).sample

    x0 = features[torch.randint(64, (3,), generator=torch.Generator().manual_seed(seed))]
    grid = spaced_grid(steps)
    z = ddim_integrate(eps, x0, grid.call_points, grid.alpha_bars(AB))
    back_points = grid.points[::-1][:-1]
    x = ddim_integrate(eps, z, back_points, torch.cat([AB[list(back_points)], AB[:1]]))
    assert torch.isfinite(z).all()
    tolerance = 15.0 / steps  # two first-order passes: measured max error ~10.5 / steps; eps off by 5% gives 0.7
    torch.testing.assert_close(x, x0, atol=tolerance, rtol=0)


# ------------------------------------------------------------------ scores
SCORERS = [NLLScorer, MaxMinScorer, MaxNormScorer]


@FAST
@given(latents(min_batch=2, max_batch=6), st.data())
def test_scores_are_finite_and_permuting_the_batch_permutes_them(z, data):
    permutation = torch.tensor(data.draw(st.permutations(range(z.shape[0]))))
    hybrid = HybridScorer().fit(z)
    for scorer in [cls() for cls in SCORERS] + [hybrid]:
        out, shuffled = scorer.score(z), scorer.score(z[permutation])
        assert torch.isfinite(out.raw_score).all() and torch.isfinite(out.raw_map).all()
        assert out.raw_score.shape == (z.shape[0],) and out.raw_map.shape == (z.shape[0], *z.shape[2:])
        torch.testing.assert_close(shuffled.raw_score, out.raw_score[permutation], rtol=1e-6, atol=1e-6)
        assert torch.equal(shuffled.raw_map, out.raw_map[permutation])


@FAST
@given(latents(), st.data())
def test_nll_and_norm_maps_ignore_the_channel_order(z, data):
    permutation = torch.tensor(data.draw(st.permutations(range(z.shape[1]))))
    torch.testing.assert_close(gaussian_nll(z[:, permutation]), gaussian_nll(z), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(norm_map(z[:, permutation]), norm_map(z), rtol=1e-5, atol=1e-5)


@FAST
@given(latents(), st.sampled_from([(-1,), (-2,), (-2, -1)]))
def test_max_min_and_nll_ignore_spatial_flips(z, dims):
    maps = norm_map(z)
    assert torch.equal(max_min(maps.flip(dims)), max_min(maps))  # max and min are exact under any reordering
    assert torch.equal(MaxMinScorer().score(z.flip(dims)).raw_score, MaxMinScorer().score(z).raw_score)
    torch.testing.assert_close(gaussian_nll(z.flip(dims)), gaussian_nll(z), rtol=1e-12, atol=1e-9)


@FAST
@given(latents())
def test_nll_is_the_closed_form_and_grows_with_the_norm(z):
    dimension = z[0].numel()
    expected = 0.5 * z.double().flatten(1).square().sum(1) + 0.5 * dimension * math.log(2 * math.pi)
    torch.testing.assert_close(gaussian_nll(z), expected)
    assume(z.abs().max() > 0)
    assert bool((gaussian_nll(2 * z) >= gaussian_nll(z)).all())
    assert bool((max_min(norm_map(z)) >= 0).all())
