"""evaluate_metrics: keys, mAD, modes, degenerate inputs and validation."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from invert_ad.metrics import METRIC_KEYS, evaluate_metrics


@pytest.fixture
def case():
    rng = np.random.default_rng(0)
    masks = np.zeros((10, 16, 16), dtype=np.uint8)
    masks[5:, 4:9, 6:12] = 1
    masks[7:, 12:, :3] = 1
    maps = (rng.normal(size=masks.shape) + 1.5 * masks).astype(np.float32)
    labels = masks.reshape(10, -1).any(axis=1).astype(int)
    scores = maps.reshape(10, -1).max(axis=1) + rng.normal(scale=0.5, size=10)
    return scores, labels, maps, masks


def test_image_only_gives_none_pixel_keys_and_mad_over_three(case):
    scores, labels, _, _ = case
    result = evaluate_metrics(scores, labels)
    assert tuple(result) == METRIC_KEYS
    assert [result[key] for key in METRIC_KEYS[3:7]] == [None] * 4
    assert result["image_auroc"] == pytest.approx(roc_auc_score(labels, scores))
    assert result["image_ap"] == pytest.approx(average_precision_score(labels, scores))
    assert result["mad"] == pytest.approx(np.mean([result[key] for key in METRIC_KEYS[:3]]))


def test_mad_is_the_mean_of_the_seven(case):
    result = evaluate_metrics(*case)
    assert all(type(value) is float for value in result.values())
    assert result["pixel_auroc"] == pytest.approx(roc_auc_score(case[3].ravel(), case[2].ravel()))
    assert result["mad"] == pytest.approx(np.mean([result[key] for key in METRIC_KEYS[:7]]))


def test_torch_inputs_give_the_same_numbers(case):
    tensors = [torch.from_numpy(np.asarray(array)) for array in case]
    assert evaluate_metrics(*tensors) == pytest.approx(evaluate_metrics(*case), abs=1e-12)


@pytest.mark.parametrize("mode", ["histogram", "invad"])
def test_binned_modes_are_close_to_exact(case, mode):
    assert evaluate_metrics(*case, mode=mode) == pytest.approx(evaluate_metrics(*case), abs=0.02)


def test_invad_image_f1max_uses_the_official_bins():
    # Normalised scores 0, 0.5006, 0.5007, 1 fall in bins 0, 500, 500, 998: the tie at bin 500 mixes a normal
    # and an anomalous image, so the best threshold gives F1 = 2 * 2 / (2 * 2 + 1) = 0.8, not the exact 1.
    scores, labels = [0.0, 0.5006, 0.5007, 1.0], [0, 0, 1, 1]
    assert evaluate_metrics(scores, labels)["image_f1max"] == pytest.approx(1.0)
    assert evaluate_metrics(scores, labels, mode="invad")["image_f1max"] == pytest.approx(0.8)


def test_invad_image_f1max_keeps_the_official_epsilon():
    # Range 1e-8: the official 1e-8 added to the range halves the normalised scores, so 0.298498e-8 and
    # 0.2995e-8 share bin floor(999 s / 2e-8) = 149 (F1-max 0.8); without it they would fall in bins 298 and 299.
    scores, labels = [0.0, 0.298498e-8, 0.2995e-8, 1e-8], [0, 0, 1, 1]
    assert evaluate_metrics(scores, labels, mode="invad")["image_f1max"] == pytest.approx(0.8)


def test_masks_without_anomalies_give_nan_pixel_metrics(case):
    scores, labels, maps, _ = case
    with pytest.warns(RuntimeWarning, match="no anomalous pixel"):
        result = evaluate_metrics(scores, labels, maps, np.zeros_like(maps))
    assert all(math.isnan(result[key]) for key in ("pixel_auroc", "pixel_ap", "pixel_f1max", "aupro", "mad"))


def test_constant_maps_in_histogram_mode(case):
    scores, labels, maps, masks = case
    result = evaluate_metrics(scores, labels, np.ones_like(maps), masks, mode="histogram")
    assert result["pixel_auroc"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"masks": None}, "both maps and masks"),
        ({"maps": None}, "both maps and masks"),
        ({"image_labels": np.zeros(10)}, "only normal"),
        ({"mode": "fast"}, "unknown mode"),
        ({"maps": np.zeros((9, 16, 16)), "masks": np.zeros((9, 16, 16))}, "9 images"),
    ],
)
def test_invalid_calls_raise(case, change, message):
    arguments = dict(zip(("image_scores", "image_labels", "maps", "masks"), case, strict=True)) | change
    with pytest.raises(ValueError, match=message):
        evaluate_metrics(**arguments)
