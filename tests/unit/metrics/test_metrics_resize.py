"""resize_maps (bilinear, align_corners=False) and resize_masks (nearest) against values worked out by hand."""

import numpy as np
import pytest
import torch

from invert_ad.metrics import resize_maps, resize_masks


def test_bilinear_upsampling_by_hand():
    # align_corners=False: output pixel j of 4 samples source x = (j + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25,
    # clamped to [0, 1], so weights along each axis are 0, 0.25, 0.75, 1 for the second sample.
    maps = np.array([[[0.0, 1.0], [2.0, 3.0]]])
    weights = np.array([0.0, 0.25, 0.75, 1.0])
    expected = weights[None, :] * 1.0 + weights[:, None] * 2.0
    resized = resize_maps(maps, 4)
    assert isinstance(resized, np.ndarray)
    assert resized.dtype == np.float64
    np.testing.assert_allclose(resized[0], expected)


def test_maps_keep_type_and_dtype():
    maps = torch.rand(3, 5, 7, dtype=torch.float16)
    resized = resize_maps(maps, (10, 14))
    assert isinstance(resized, torch.Tensor)
    assert resized.shape == (3, 10, 14)
    assert resized.dtype == torch.float16
    assert resize_maps(np.ones((2, 4, 4), dtype=np.int64), 8).dtype == np.float32


def test_nearest_masks_by_hand():
    masks = np.array([[[True, False], [False, True]]])
    up = resize_masks(masks, 4)
    assert up.dtype == np.bool_
    np.testing.assert_array_equal(up[0], np.kron(masks[0], np.ones((2, 2), dtype=bool)))
    # Downsampling 4 -> 2 takes source index floor(dst * 2): rows and columns 0 and 2.
    grid = np.arange(16).reshape(1, 4, 4)
    np.testing.assert_array_equal(resize_masks(grid, 2)[0], [[0, 2], [8, 10]])


def test_masks_stay_binary_as_tensors():
    masks = (torch.rand(2, 9, 11) > 0.5).to(torch.uint8) * 255
    resized = resize_masks(masks, (256, 256))
    assert resized.dtype == torch.uint8
    assert set(resized.unique().tolist()) <= {0, 255}


@pytest.mark.parametrize("resize", [resize_maps, resize_masks])
def test_invalid_shapes_and_sizes_raise(resize):
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        resize(np.zeros((4, 4)), 8)
    with pytest.raises(ValueError, match="positive"):
        resize(np.zeros((1, 4, 4)), (0, 8))
