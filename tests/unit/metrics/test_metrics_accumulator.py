"""PixelMetricAccumulator: streaming equals batch, exact pixel metrics equal sklearn, the histogram mode equals
the exact metrics of quantised scores, and the invad mode equals the official definitions written out here."""

from dataclasses import astuple

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from invert_ad.metrics import PixelMetricAccumulator, aupro, f1_max
from invert_ad.metrics._regions import inverse_region_areas


def pixel_case(seed, shape=(12, 24, 24), dtype=np.float64):
    rng = np.random.default_rng(seed)
    masks = np.zeros(shape, dtype=bool)
    for image in masks[shape[0] // 2 :]:
        y, x = rng.integers(0, shape[1] - 6, 2)
        image[y : y + rng.integers(2, 7), x : x + rng.integers(2, 7)] = True
        image[rng.integers(shape[1]), rng.integers(shape[2])] = True
    maps = ndimage.gaussian_filter(rng.normal(size=shape), (0, 1, 1)) + 0.3 * masks
    return maps.astype(dtype), masks


def compute(mode, maps, masks, batch=None, **kwargs):
    accumulator = PixelMetricAccumulator(mode, **kwargs)
    batch = batch or len(maps)
    for start in range(0, len(maps), batch):
        accumulator.update(maps[start : start + batch], masks[start : start + batch])
    return astuple(accumulator.compute())


def test_exact_pixel_metrics_match_sklearn_and_aupro():
    maps, masks = pixel_case(0)
    maps = np.round(maps, 2)  # ties
    expected = (
        roc_auc_score(masks.ravel(), maps.ravel()),
        average_precision_score(masks.ravel(), maps.ravel()),
        f1_max(maps.ravel(), masks.ravel()),
        aupro(maps, masks),
    )
    assert compute("exact", maps, masks) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("mode", ["exact", "histogram", "invad"])
def test_streaming_equals_one_batch(mode):
    maps, masks = pixel_case(1)
    kwargs = {"score_range": (float(maps.min()), float(maps.max()))} if mode == "histogram" else {}
    whole = compute(mode, maps, masks, **kwargs)
    for batch in (1, 5):
        assert compute(mode, maps, masks, batch=batch, **kwargs) == pytest.approx(whole, abs=1e-12)


def test_reset_forgets_previous_updates():
    maps, masks = pixel_case(2)
    accumulator = PixelMetricAccumulator()
    accumulator.update(-maps, masks)
    accumulator.reset()
    accumulator.update(maps, masks)
    assert astuple(accumulator.compute()) == compute("exact", maps, masks)


def test_reusing_the_callers_buffer_is_safe():
    maps, masks = pixel_case(10, dtype=np.float32)
    buffer = torch.empty(maps.shape[1:])[None]
    accumulator = PixelMetricAccumulator()
    for map_, mask in zip(maps, masks, strict=True):
        buffer.copy_(torch.from_numpy(map_))
        accumulator.update(buffer, mask[None])
    assert astuple(accumulator.compute()) == compute("exact", maps, masks)


def quantise(maps, low, high, num_bins):
    return np.clip(np.floor((maps - low) / (high - low) * num_bins), 0, num_bins - 1)


@pytest.mark.parametrize("num_bins", [7, 50])
def test_histogram_mode_is_exact_on_quantised_scores(num_bins):
    maps, masks = pixel_case(3)
    low, high = float(maps.min()), float(maps.max())
    binned = compute("histogram", maps, masks, batch=4, num_bins=num_bins, score_range=(low, high))
    assert binned == pytest.approx(compute("exact", quantise(maps, low, high, num_bins), masks), abs=1e-12)


def test_histogram_mode_with_1000_bins_is_close_to_exact():
    maps, masks = pixel_case(4, shape=(20, 32, 32))
    binned = compute("histogram", maps, masks, batch=3, score_range=(float(maps.min()), float(maps.max())))
    assert binned == pytest.approx(compute("exact", maps, masks), abs=2e-3)


def test_histogram_state_does_not_grow_with_updates():
    maps, masks = pixel_case(5)
    accumulator = PixelMetricAccumulator("histogram", num_bins=64, score_range=(-5.0, 5.0))

    def state_bytes():
        return sum(value.nbytes for value in vars(accumulator._state).values() if isinstance(value, np.ndarray))

    accumulator.update(maps[:2], masks[:2])
    size = state_bytes()
    for _ in range(5):
        accumulator.update(maps, masks)
    assert state_bytes() == size


def test_histogram_warns_about_clipped_scores():
    maps, masks = pixel_case(6)
    accumulator = PixelMetricAccumulator("histogram", num_bins=10, score_range=(0.0, 0.1))
    accumulator.update(maps, masks)
    with pytest.warns(RuntimeWarning, match="outside score_range"):
        accumulator.compute()


def official_strip_curve(scores, positive, weights, num_strips):
    """ADEval's CUDA accumulator over [min, max], written as threshold loops: point k predicts ``s >= edge_k``,
    plus the overflow bin counting ``s >= max`` once more for every edge below the top one."""
    low, high = scores.min(), scores.max()
    at_max = scores >= high
    points = []
    for k in range(num_strips, -1, -1):
        above = scores >= low + k * (high - low) / num_strips
        extra = at_max if k < num_strips else np.zeros_like(at_max)
        points.append(
            (
                np.sum(above & positive) + np.sum(extra & positive),
                np.sum(above & ~positive) + np.sum(extra & ~positive),
                np.sum(weights[above]) + np.sum(weights[extra]),
            )
        )
    tp, fp, overlap = np.array(points, dtype=float).T
    return fp / fp[-1], tp / tp[-1], overlap / overlap[-1]


def trapezoid(x, y):
    return sum((x[i + 1] - x[i]) * (y[i + 1] + y[i]) / 2 for i in range(len(x) - 1))


def official_aupro(fpr, pro, limit=0.3):
    inside = fpr <= limit
    x, y = list(fpr[inside]), list(pro[inside])
    x1, y1 = fpr[~inside][0], pro[~inside][0]
    x.append(limit)
    y.append(y[-1] + (y1 - y[-1]) * (limit - x[-2]) / (x1 - x[-2]))
    return trapezoid(x, y) / limit


def official_f1_max(scores, positive, num_bins):
    """``f1_max_gpu_hist``: min-max normalise (+1e-8), clamp to [0, 1 - 1e-8], bin by floor(s * (n - 1))."""
    normalised = np.clip((scores - scores.min()) / (scores.max() - scores.min() + 1e-8), 0, 1 - 1e-8)
    bins = np.floor(normalised * (num_bins - 1))
    best = 0.0
    for k in range(num_bins):
        tp, fp = np.sum((bins >= k) & positive), np.sum((bins >= k) & ~positive)
        best = max(best, 2 * tp / (2 * tp + fp + (positive.sum() - tp)))
    return best


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("num_bins", [1000, 37])
def test_invad_mode_matches_the_official_definitions(num_bins, clip):
    maps, masks = pixel_case(7, shape=(8, 16, 16))
    if clip:  # ties at the maximum across both classes: the curve's first point is off the origin
        maps = np.minimum(maps, np.quantile(maps, 0.98))
    weights = inverse_region_areas(masks).ravel()
    scores, positive = maps.ravel(), masks.ravel()
    fpr, tpr, pro = official_strip_curve(scores, positive, weights, num_bins)
    expected = (
        trapezoid(fpr, tpr),
        average_precision_score(positive, scores),
        official_f1_max(scores, positive, num_bins),
        official_aupro(fpr, pro),
    )
    assert compute("invad", maps, masks, batch=3, num_bins=num_bins) == pytest.approx(expected, abs=1e-12)


def test_invad_mode_is_close_to_exact():
    maps, masks = pixel_case(8, dtype=np.float32)
    assert compute("invad", maps, masks) == pytest.approx(compute("exact", maps, masks), abs=5e-3)


def test_invad_mode_rejects_constant_maps():
    maps, masks = np.ones((2, 4, 4)), np.zeros((2, 4, 4))
    masks[1, 0, 0] = 1
    with pytest.raises(ValueError, match="not constant"):
        compute("invad", maps, masks)


def test_accepts_torch_channel_dim_and_255_masks():
    maps, masks = pixel_case(9, dtype=np.float32)
    expected = compute("exact", maps, masks)
    tensor_maps = torch.from_numpy(maps)[:, None]
    tensor_masks = torch.from_numpy(masks.astype(np.uint8) * 255)[:, None]
    assert compute("exact", tensor_maps, tensor_masks) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "fast"}, "unknown mode"),
        ({"mode": "histogram"}, "score_range"),
        ({"mode": "histogram", "score_range": (1.0, 1.0)}, "score_range"),
        ({"num_bins": 1}, "num_bins"),
        ({"fpr_limit": 0.0}, "fpr_limit"),
        ({"fpr_limit": 1.5}, "fpr_limit"),
    ],
)
def test_invalid_configuration_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PixelMetricAccumulator(**kwargs)


def test_invalid_updates_raise():
    accumulator = PixelMetricAccumulator()
    with pytest.raises(ValueError, match="before any update"):
        accumulator.compute()
    with pytest.raises(ValueError, match="resize_maps"):
        accumulator.update(np.zeros((2, 8, 8)), np.zeros((2, 16, 16)))
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        accumulator.update(np.zeros((8, 8)), np.zeros((8, 8)))
    with pytest.raises(ValueError, match="NaN or infinite"):
        accumulator.update(np.full((1, 2, 2), np.nan), np.zeros((1, 2, 2)))
    with pytest.raises(ValueError, match="NaN"):
        accumulator.update(np.zeros((1, 2, 2)), np.full((1, 2, 2), np.nan))


@pytest.mark.parametrize("mode", ["exact", "histogram", "invad"])
def test_masks_without_normal_pixels_give_nan(mode):
    accumulator = PixelMetricAccumulator(mode, score_range=(0.0, 1.0))
    accumulator.update(np.random.default_rng(0).random((1, 3, 3)), np.ones((1, 3, 3)))
    with pytest.warns(RuntimeWarning, match="no normal pixel"):
        assert np.isnan(astuple(accumulator.compute())).all()
