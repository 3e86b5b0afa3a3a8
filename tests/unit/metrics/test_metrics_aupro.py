"""AU-PRO against curves computed by hand and against a brute-force implementation written here."""

import itertools
from collections import deque

import numpy as np
import pytest

from invert_ad.metrics import aupro


def polyline_area(points, limit):
    """Area under the polyline through ``points`` (sorted by x) from the first point to x = ``limit``."""
    area = 0.0
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x1 <= limit:
            area += (x1 - x0) * (y0 + y1) / 2
        elif x0 < limit:
            y_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            area += (limit - x0) * (y0 + y_limit) / 2
    return area


def flood_fill_regions(mask):
    """Lists of pixel coordinates of the 8-connected components of one 2-D mask (breadth-first search)."""
    seen = np.zeros_like(mask, dtype=bool)
    regions = []
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        seen[start] = True
        queue, region = deque([start]), []
        while queue:
            y, x = queue.popleft()
            region.append((y, x))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    inside = 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1]
                    if inside and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
        regions.append(region)
    return regions


def brute_force_aupro(maps, masks, limit=0.3):
    """Loop over every distinct threshold (and one above all), per region, then integrate the polyline."""
    regions = [[maps[i][tuple(np.array(r).T)] for r in flood_fill_regions(masks[i])] for i in range(len(maps))]
    regions = [scores for image in regions for scores in image]
    normal_scores = maps[masks == 0]
    points = []
    for threshold in [np.inf, *sorted(np.unique(maps), reverse=True)]:
        pro = np.mean([np.mean(scores >= threshold) for scores in regions])
        points.append((np.mean(normal_scores >= threshold), pro))
    return polyline_area(points, limit) / limit


def two_region_case():
    """A 4x4 image: region A (2 pixels) top-left, region B (4 pixels) bottom-right, 10 normal pixels.

    Distinct thresholds, from the top, give (FPR, PRO): +inf (0, 0); 0.9 (0, 1/4) [A half]; 0.8 (0, 1/2)
    [B half]; 0.7 (0.1, 1/2) [a normal]; 0.6 (0.1, 5/8) [B 3/4]; 0.55 (0.2, 5/8); 0.5 (0.2, 7/8) [A whole];
    0.3 (0.3, 7/8); 0.2 (0.3, 1) [B whole]; 0.1 (1, 1).
    """
    mask = np.array([[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]])
    scores = np.array(
        [
            [0.9, 0.5, 0.7, 0.1],
            [0.55, 0.3, 0.1, 0.1],
            [0.1, 0.1, 0.8, 0.8],
            [0.1, 0.1, 0.6, 0.2],
        ]
    )
    return scores[None], mask[None]


def test_two_regions_by_hand():
    maps, masks = two_region_case()
    # Up to 0.3: 0.1 * 1/2 + 0.1 * 5/8 + 0.1 * 7/8 = 0.2 (the jump at 0.3 is vertical), / 0.3.
    assert aupro(maps, masks) == pytest.approx(0.2 / 0.3)
    # Up to 0.25: 0.05 + 0.0625 + 0.05 * 7/8, / 0.25.
    assert aupro(maps, masks, fpr_limit=0.25) == pytest.approx((0.05 + 0.0625 + 0.04375) / 0.25)
    # Up to 1: 0.2 + 0.7 * 1.
    assert aupro(maps, masks, fpr_limit=1.0) == pytest.approx(0.9)


def test_tie_between_classes_gives_a_sloped_segment():
    # One anomalous pixel tied with 2 of 7 normal pixels at 0.5: the curve jumps from (0, 0) to (2/7, 1).
    mask = np.zeros((2, 4), dtype=int)
    mask[0, 0] = 1
    scores = np.full((2, 4), 0.1)
    scores[0, :3] = 0.5
    # Limit 0.3: triangle 1/2 * 2/7 plus rectangle (0.3 - 2/7) * 1 = 11/70.
    assert aupro(scores[None], mask[None]) == pytest.approx((11 / 70) / 0.3)
    # Limit 0.2 lands on the slope, where PRO = 0.2 / (2/7) = 0.7: area 1/2 * 0.2 * 0.7.
    assert aupro(scores[None], mask[None], fpr_limit=0.2) == pytest.approx(0.35)


def test_regions_are_eight_connected():
    # (1, 2) touches (0, 1) only by a corner: one region of 3 pixels (4-connectivity would give 2 + 1).
    mask = np.array([[1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]])
    scores = np.where(mask, 0.1, 0.5)
    scores[1, 2] = 0.9
    # PRO is 1/3 from FPR 0 to 1 (4-connectivity: (0 + 1) / 2 = 1/2).
    assert aupro(scores[None], mask[None]) == pytest.approx(1 / 3)


def test_regions_do_not_span_images():
    # Image 0's bottom-left pixel and image 1's top row would touch if the stack were labelled in 3-D.
    masks = np.zeros((2, 3, 3), dtype=int)
    masks[0, 2, 0] = 1
    masks[1, 0, :] = 1
    maps = np.where(masks, 0.1, 0.5)
    maps[0, 2, 0] = 0.9
    # Two regions, the 1-pixel one fully detected at FPR 0: PRO 1/2 (one merged region would give 1/4).
    assert aupro(maps, masks) == pytest.approx(0.5)


def test_perfect_and_worst_maps():
    masks = np.zeros((3, 8, 8))
    masks[1, 2:5, 2:4] = 1
    masks[2, 6:, :] = 1
    assert aupro(masks + 1.0, masks) == pytest.approx(1.0)
    assert aupro(-masks, masks) == pytest.approx(0.0)


def random_blobs(rng, shape, count):
    masks = np.zeros(shape, dtype=bool)
    for image in masks[1:]:
        for _ in range(count):
            y, x = rng.integers(0, shape[1], 2)
            h, w = rng.integers(1, 4, 2)
            image[y : y + h, x : x + w] = True
    return masks


@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
@pytest.mark.parametrize("seed", range(4))
def test_matches_brute_force(seed, limit):
    rng = np.random.default_rng(seed)
    masks = random_blobs(rng, (3, 10, 10), count=4)
    maps = np.round(rng.normal(size=masks.shape) + 1.2 * masks, 1)  # about 50 levels: many ties
    assert aupro(maps, masks, fpr_limit=limit) == pytest.approx(brute_force_aupro(maps, masks, limit), abs=1e-12)


def test_no_anomalous_pixel_gives_nan_with_warning():
    with pytest.warns(RuntimeWarning, match="no anomalous pixel"):
        assert np.isnan(aupro(np.random.default_rng(0).random((2, 4, 4)), np.zeros((2, 4, 4))))
