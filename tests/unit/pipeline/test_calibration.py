"""Thresholds and normalisation from normal scores, against numpy and a brute-force F1 search."""

import numpy as np
import pytest
import torch

from invert_ad.calibration import Calibration, fit_calibration, threshold_from_labels


def test_thresholds_are_normal_quantiles():
    rng = np.random.default_rng(0)
    scores, maps = rng.normal(size=200), rng.normal(size=(200, 4, 4))
    cal = fit_calibration(torch.tensor(scores), torch.tensor(maps), fpr=0.05)
    assert cal.image_threshold == pytest.approx(np.quantile(scores, 0.95))
    assert cal.image_median == pytest.approx(np.median(scores), abs=0.02)  # torch takes the lower middle value
    assert cal.pixel_threshold == pytest.approx(np.quantile(maps, 0.95))
    assert (scores > cal.image_threshold).mean() == pytest.approx(0.05, abs=0.01)


def test_normalisation_by_hand():
    cal = Calibration(
        image_threshold=3.0, image_median=1.0, pixel_threshold=2.0, pixel_median=0.0, fpr=0.01, num_images=10
    )
    assert cal.normalize_image_scores(torch.tensor([1.0, 3.0, 5.0, 10.0, -4.0])).tolist() == [0.0, 0.5, 1.0, 1.0, 0.0]
    assert cal.normalize_maps(torch.tensor([1.0])).item() == pytest.approx(0.25)
    assert Calibration.from_dict(cal.to_dict()) == cal


def test_bad_calibration_input():
    with pytest.raises(ValueError, match="fpr"):
        fit_calibration(torch.ones(5), torch.ones(5, 2, 2), fpr=0.0)
    with pytest.raises(ValueError, match="two normal images"):
        fit_calibration(torch.ones(1), torch.ones(1, 2, 2))
    with pytest.raises(ValueError, match="NaN"):
        fit_calibration(torch.tensor([1.0, float("nan")]), torch.ones(2, 2, 2))


def test_threshold_from_labels_maximises_f1():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 60)
    scores = np.round(rng.normal(size=60) + labels, 1)  # ties on purpose

    def f1(thr):
        pred = scores >= thr
        tp = (pred & (labels == 1)).sum()
        return 2 * tp / (pred.sum() + labels.sum())

    best = max(np.unique(scores), key=f1)
    found = threshold_from_labels(torch.tensor(scores), torch.tensor(labels))
    assert f1(found) == pytest.approx(f1(best))
    with pytest.raises(ValueError, match="both"):
        threshold_from_labels(torch.ones(3), torch.zeros(3))
