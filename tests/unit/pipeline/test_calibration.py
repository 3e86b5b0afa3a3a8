"""Thresholds, normalisation and the domain limit from normal scores, against numpy and hand-computed values."""

import math
import warnings

import numpy as np
import pytest
import torch

from invert_ad.calibration import DOMAIN_MARGIN, Calibration, domain_scores, fit_calibration


def test_thresholds_are_normal_quantiles():
    rng = np.random.default_rng(0)
    scores, maps = rng.normal(size=200), rng.normal(size=(200, 4, 4))
    cal = fit_calibration(torch.tensor(scores), torch.tensor(maps), fpr=0.05)
    assert cal.image_threshold == pytest.approx(np.quantile(scores, 0.95))
    assert cal.image_median == pytest.approx(np.median(scores), abs=0.02)  # torch takes the lower middle value
    # the pixel threshold is a quantile of the per-image maxima: a normal image's mask is as rare as its flag
    assert cal.pixel_threshold == pytest.approx(np.quantile(maps.reshape(200, -1).max(axis=1), 0.95))
    assert (maps.reshape(200, -1).max(axis=1) > cal.pixel_threshold).mean() == pytest.approx(0.05, abs=0.01)
    assert (scores > cal.image_threshold).mean() == pytest.approx(0.05, abs=0.01)
    assert cal.domain_threshold is None and cal.folds is None


def test_normalisation_by_hand():
    cal = Calibration(
        image_threshold=3.0, image_median=1.0, pixel_threshold=2.0, pixel_median=0.0, fpr=0.01, num_images=10
    )
    raw = torch.tensor([1.0, 3.0, 5.0, 10.0, -4.0, 1e3])
    want = [1 / (1 + math.exp(-math.log(3) * (s - 3.0) / 2.0)) for s in raw.tolist()]
    got = cal.normalize_scores(raw)
    assert got.dtype == torch.float64 and got.tolist() == pytest.approx(want, rel=1e-12)
    assert got[0].item() == pytest.approx(0.25) and got[1].item() == 0.5  # the median and the threshold
    assert cal.normalize_maps(torch.tensor([0.0])).item() == pytest.approx(0.25)
    assert Calibration.from_dict(cal.to_dict()) == cal


def test_normalised_scores_keep_the_ranking():
    """Distinct raw scores stay distinct and ordered, far beyond the threshold too (no clamp)."""
    cal = Calibration(
        image_threshold=0.0, image_median=-1.0, pixel_threshold=0.0, pixel_median=-1.0, fpr=0.1, num_images=10
    )
    raw = torch.linspace(-15, 15, 301)
    normalized = cal.normalize_scores(raw)
    assert bool((normalized.diff() > 0).all()) and normalized.min() > 0 and normalized.max() < 1


def test_small_samples_warn_with_numbers():
    rng = np.random.default_rng(0)
    with pytest.warns(UserWarning, match=r"21 normal images cannot support fpr=0.01.*about 0.2.*fpr >= 0.238"):
        fit_calibration(torch.tensor(rng.normal(size=21)), torch.ones(21, 2, 2), fpr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit_calibration(torch.tensor(rng.normal(size=500)), torch.ones(500, 2, 2), fpr=0.01)


def test_domain_limit():
    features = torch.zeros(3, 2, 2, 2)
    features[1] = 1.0
    features[2, 0] = 2.0  # mean square: half the values are 4
    assert domain_scores(features).tolist() == [0.0, 1.0, 2.0]
    cal = fit_calibration(torch.arange(3.0), torch.ones(3, 2, 2), fpr=0.5, domain_score=domain_scores(features))
    assert cal.domain_threshold == pytest.approx(DOMAIN_MARGIN * 2.0)
    inside = cal.in_domain(torch.tensor([0.5, DOMAIN_MARGIN * 2.0, DOMAIN_MARGIN * 2.0 + 1e-6]))
    assert inside.tolist() == [True, True, False]


def test_bad_calibration_input():
    with pytest.raises(ValueError, match="fpr"):
        fit_calibration(torch.ones(5), torch.ones(5, 2, 2), fpr=0.0)
    with pytest.raises(ValueError, match="two normal images"):
        fit_calibration(torch.ones(1), torch.ones(1, 2, 2))
    with pytest.raises(ValueError, match="NaN"):
        fit_calibration(torch.tensor([1.0, float("nan")]), torch.ones(2, 2, 2))
    with pytest.raises(ValueError, match="3 scores but 2 maps"):
        fit_calibration(torch.ones(3), torch.ones(2, 2, 2))
