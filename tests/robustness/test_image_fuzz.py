"""Fuzzing the image loader: any bytes either load as 8-bit RGB or raise ``ImageReadError``, nothing else.

Inputs: random bytes under every extension, and valid PNG / JPEG / BMP / TIFF / WebP / GIF files mutated by
byte flips, truncation, insertion and chunk duplication. Pillow's decompression-bomb limit is lowered to
4 MP for the run so a mutated header claiming a huge size is refused instead of allocating hundreds of MB
(the loader's behaviour is the same at the default limit, only slower).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image
from robust_helpers import encoded, texture

from invert_ad.data import IMAGE_EXTENSIONS, ImageReadError, load_image, load_mask

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))


def _seeds() -> dict[str, bytes]:
    image = Image.fromarray(texture(3, 24))
    rgba = Image.fromarray(np.dstack([texture(3, 24), texture(4, 24)[..., 0]]), "RGBA")
    return {
        ".png": encoded(image, "PNG"),
        ".jpg": encoded(image, "JPEG", quality=80),
        ".bmp": encoded(image, "BMP"),
        ".tif": encoded(image.convert("CMYK"), "TIFF"),
        ".webp": encoded(rgba, "WEBP"),
        ".gif.png": encoded(image, "GIF"),
        ".p.png": encoded(image.convert("P"), "PNG", transparency=3),
    }


SEEDS = _seeds()


@st.composite
def mutated(draw):
    suffix = draw(st.sampled_from(sorted(SEEDS)))
    data = bytearray(SEEDS[suffix])
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "truncate", "insert", "duplicate"]))
        position = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            data[position] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80]))
        elif kind == "truncate":
            del data[position:]
        elif kind == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "duplicate":
            length = draw(st.integers(1, 64))
            data[position:position] = data[position : position + length]
    return suffix.rsplit(".", 1)[-1], bytes(data)


@pytest.fixture(autouse=True)
def small_bomb_limit(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4_000_000)


def _check(tmp_path, suffix: str, data: bytes) -> str:
    path = tmp_path / f"fuzz.{suffix}"
    path.write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's own warnings (bomb, truncated EXIF, ...) are fine
        try:
            image = load_image(path)
        except ImageReadError as err:
            assert str(path) in str(err)
            outcome = "error"
        else:
            assert image.mode == "RGB" and min(image.size) >= 1
            pixels = np.asarray(image)
            assert pixels.dtype == np.uint8 and pixels.shape == (image.size[1], image.size[0], 3)
            outcome = "rgb"
        try:
            mask = load_mask(path, 8)
        except ImageReadError:
            pass
        else:
            assert mask.dtype == bool and mask.shape == (8, 8)
    return outcome


@FUZZ
@given(st.binary(max_size=4096), st.sampled_from([e.lstrip(".") for e in IMAGE_EXTENSIONS]))
def test_random_bytes(tmp_path_factory, data, suffix):
    event(_check(tmp_path_factory.mktemp("fuzz"), suffix, data))


@FUZZ
@given(mutated())
def test_mutated_valid_files(tmp_path_factory, case):
    suffix, data = case
    event(f"{suffix}: {_check(tmp_path_factory.mktemp('fuzz'), suffix, data)}")


@pytest.mark.parametrize("suffix", sorted(SEEDS))
def test_seed_files_themselves_load(tmp_path, suffix):
    assert _check(tmp_path, suffix.rsplit(".", 1)[-1], SEEDS[suffix]) == "rgb"
