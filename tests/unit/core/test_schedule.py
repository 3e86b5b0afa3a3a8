import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from invert_ad.schedule import (
    InversionGrid,
    alphas_cumprod_of,
    linear_alphas_cumprod,
    prediction_type_of,
    resolve_grid,
)


def test_linear_schedule_matches_method_values_and_diffusers():
    ab = linear_alphas_cumprod()
    expected = {0: 0.9999, 333: 0.3186, 500: 0.0778, 666: 0.0110, 999: 4.04e-5}
    for t, value in expected.items():
        assert ab[t].item() == pytest.approx(value, rel=2e-3)
    torch.testing.assert_close(alphas_cumprod_of(DDPMScheduler()), ab, rtol=1e-6, atol=0)


def test_presets():
    paper = resolve_grid("paper")
    assert paper.points == (0, 333, 666, 999) and paper.call_points == (0, 333, 666) and paper.num_calls == 3
    official = resolve_grid("official")
    assert official.call_points == (0, 500, 999) and official.terminal_alpha_bar == 0.0
    ab = linear_alphas_cumprod()
    assert official.alpha_bars(ab).tolist() == [ab[0].item(), ab[500].item(), ab[999].item(), 0.0]


@pytest.mark.parametrize(
    ("spec", "points"),
    [
        (2, (0, 500, 999)),  # round(0.5 * 999) = 500 (round half to even of 499.5 is 500)
        ("quad", (0, 111, 444, 999)),  # 999/9 = 111, 999*4/9 = 444
        ("cube:3", (0, 37, 296, 999)),  # 999/27 = 37, 999*8/27 = 296
        ([0, 10, 200], (0, 10, 200)),
    ],
)
def test_grid_specs(spec, points):
    assert resolve_grid(spec).points == points


def test_exp_spacing_by_hand():
    expected = tuple(round((math.exp(5 * u) - 1) / (math.exp(5) - 1) * 999) for u in np.linspace(0, 1, 4))
    assert resolve_grid("exp:3").points == expected
    assert expected[1] < 333  # exp crowds early steps


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ([0, 500, 1000], r"\[0, 999\]"),
        ([0, 500, 500], "strictly increasing"),
        ([-1, 5], r"\[0, 999\]"),
        ([5], "no network call"),
        ("linear", "unknown timesteps preset"),
        ("quad:x", "must be an int"),
        (0, "positive"),
        ([0.5, 3], "must be ints"),
    ],
)
def test_bad_grids(spec, match):
    with pytest.raises(ValueError, match=match):
        resolve_grid(spec)


def test_bad_grid_types():
    with pytest.raises(TypeError):
        resolve_grid(True)
    with pytest.raises(TypeError):
        resolve_grid(3.0)
    with pytest.raises(ValueError, match="terminal_alpha_bar"):
        resolve_grid(InversionGrid((0, 10), terminal_alpha_bar=1.5))


def test_scheduler_reading():
    assert prediction_type_of(DDIMScheduler(prediction_type="v_prediction")) == "v_prediction"
    assert prediction_type_of(object()) == "epsilon"
    with pytest.raises(TypeError, match="alphas_cumprod"):
        alphas_cumprod_of(object())

    class Weird:
        class config:
            prediction_type = "flow"

        alphas_cumprod = torch.linspace(1, 0.1, 10)

    with pytest.raises(ValueError, match="prediction_type"):
        prediction_type_of(Weird())

    class Increasing:
        alphas_cumprod = torch.linspace(0.1, 1, 10)

    with pytest.raises(ValueError, match="non-increasing"):
        alphas_cumprod_of(Increasing())


def test_grid_dict_round_trip():
    grid = resolve_grid("official")
    assert InversionGrid.from_dict(grid.to_dict()) == grid
