"""load_image / load_mask on hand-made files of every mode, and on broken files."""

from __future__ import annotations

import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from invert_ad.data import ImageReadError, list_images, load_image, load_mask


def _png_bytes(array: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG written by hand (color type 0 gray, 2 RGB), independent of Pillow's writer."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    height, width = array.shape[:2]
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in array)
    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def _pixels(path) -> np.ndarray:
    image = load_image(path)
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


def test_rgb_png_is_read_exactly(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    np.testing.assert_array_equal(_pixels(tmp_path / "a.png"), rgb)


def test_gray_is_repeated_on_three_channels(tmp_path):
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(gray, "L").save(tmp_path / "g.jpg", quality=100)
    pixels = _pixels(tmp_path / "g.jpg")
    assert pixels.shape == (3, 4, 3)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    np.testing.assert_allclose(pixels[..., 0], gray, atol=3)  # JPEG


def test_sixteen_bit_gray_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 1000, 32896, 40000, 65535]])
    (tmp_path / "g16.png").write_bytes(_png_bytes(values, color_type=0))
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    # 65535 / 257 = 255; rounding of 1000 / 257 = 3.89 and 40000 / 257 = 155.6
    np.testing.assert_array_equal(_pixels(tmp_path / "g16.png")[..., 0], [[0, 1, 4, 128, 156, 255]])


def test_sixteen_bit_rgb_png_keeps_its_range(tmp_path):
    values = np.array([[[65535, 0, 32896], [1000, 20000, 51400]]])
    (tmp_path / "c16.png").write_bytes(_png_bytes(values, color_type=2))
    np.testing.assert_allclose(_pixels(tmp_path / "c16.png"), values / 257, atol=1)


def test_sixteen_bit_tiff(tmp_path):
    Image.fromarray(np.array([[0, 30000, 65535]], dtype=np.uint16)).save(tmp_path / "t.tif")
    np.testing.assert_array_equal(_pixels(tmp_path / "t.tif")[..., 1], [[0, 117, 255]])


def test_float_tiff_in_unit_range(tmp_path):
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F").save(tmp_path / "f.tif")
    np.testing.assert_array_equal(_pixels(tmp_path / "f.tif")[..., 2], [[0, 128, 255]])


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_composited_over_black(tmp_path, mode):
    rgba = np.array([[[200, 100, 50, 255], [200, 100, 50, 128], [200, 100, 50, 0]]], dtype=np.uint8)
    if mode == "LA":
        rgba = rgba[..., [0, 3]]
    Image.fromarray(rgba, mode).save(tmp_path / "a.png")
    color = rgba[..., :-1].astype(float)
    expected = np.broadcast_to(color * rgba[..., -1:] / 255, (1, 3, 3))
    np.testing.assert_allclose(_pixels(tmp_path / "a.png"), expected, atol=1)


def test_palette_with_transparency(tmp_path):
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    image.save(tmp_path / "p.png", transparency=0)  # palette index 0 (red) is fully transparent
    np.testing.assert_array_equal(_pixels(tmp_path / "p.png"), [[[0, 0, 0], [0, 0, 255]]])


def test_cmyk_uses_subtractive_conversion(tmp_path):
    cmyk = np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 0, 0, 255], [100, 50, 0, 100]]], dtype=np.uint8)
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "c.tif")
    expected = (255 - cmyk[..., :3].astype(float)) * (255 - cmyk[..., 3:].astype(float)) / 255
    np.testing.assert_allclose(_pixels(tmp_path / "c.tif"), expected, atol=0.5)
    np.testing.assert_array_equal(_pixels(tmp_path / "c.tif")[0, :3], [[255, 255, 255], [0, 255, 255], [0, 0, 0]])


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_file_raises_image_read_error_naming_the_path(tmp_path, suffix):
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / f"full{suffix}")
    data = (tmp_path / f"full{suffix}").read_bytes()
    (tmp_path / f"cut{suffix}").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match=f"cut\\{suffix}") as info:
        load_image(tmp_path / f"cut{suffix}")
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(("content", "match"), [(b"", "empty"), (b"hello, not an image", "cannot read")])
def test_empty_or_non_image_file(tmp_path, content, match):
    (tmp_path / "x.png").write_bytes(content)
    with pytest.raises(ImageReadError, match=match):
        load_image(tmp_path / "x.png")


def test_missing_file(tmp_path):
    with pytest.raises(ImageReadError, match=r"nothing\.png"):
        load_image(tmp_path / "nothing.png")


def test_mask_is_binarised_above_zero(tmp_path):
    values = np.array([[0, 1, 3], [0, 255, 0]], dtype=np.uint8)
    Image.fromarray(values).save(tmp_path / "m.png")
    np.testing.assert_array_equal(load_mask(tmp_path / "m.png"), values > 0)


def test_rgba_mask_ignores_alpha(tmp_path):
    rgba = np.zeros((1, 2, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[0, 1, 0] = 9
    Image.fromarray(rgba, "RGBA").save(tmp_path / "m.png")
    np.testing.assert_array_equal(load_mask(tmp_path / "m.png"), [[False, True]])


def test_mask_resize_is_nearest(tmp_path):
    mask = np.zeros((4, 4), dtype=np.uint8)
    mask[:2, 2:] = 200
    Image.fromarray(mask).save(tmp_path / "m.png")
    expected = np.zeros((8, 8), dtype=bool)
    expected[:4, 4:] = True
    np.testing.assert_array_equal(load_mask(tmp_path / "m.png", 8), expected)
    np.testing.assert_array_equal(
        load_mask(tmp_path / "m.png", (2, 6)), np.repeat(expected[::4, ::4], 3, axis=1)[:, :6]
    )


def test_list_images_filters_by_extension_and_hidden(tmp_path):
    for name in ("b.PNG", "a.jpg", ".hidden.png", "notes.txt", "c.bmp"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.PNG", "c.bmp"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX FIFOs")
def test_list_images_reports_entries_that_are_not_readable_files(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "b.png").symlink_to(tmp_path / "gone.png")
    (tmp_path / "c.png").symlink_to(tmp_path / "c.png")
    (tmp_path / "d.png").mkdir()  # a folder named like an image: left out, not a problem
    (tmp_path / "e.jpg").symlink_to(tmp_path / "a.png")
    os.mkfifo(tmp_path / "f.png")
    (tmp_path / ".g.png").symlink_to(tmp_path / "gone.png")  # hidden: left out, not a problem
    assert [p.name for p in list_images(tmp_path)] == ["a.png", "e.jpg"]
    problems: list = []
    assert [p.name for p in list_images(tmp_path, problems)] == ["a.png", "e.jpg"]
    assert [(p.name, why) for p, why in problems] == [
        ("b.png", "dangling symbolic link"),
        ("c.png", "symbolic link loop"),
        ("f.png", "not a regular file"),
    ]
