"""Shared pieces of the robustness suite: a small real detector, image makers, an RSS sampler.

Not a test module (no ``test_`` prefix); the test files import it by name (pytest puts this folder on
``sys.path``).
"""

from __future__ import annotations

import io
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
import torch
from diffusers import DDPMScheduler
from PIL import Image

from invert_ad.data import list_images, load_image
from invert_ad.detector import AnomalyDetector, channel_statistics
from invert_ad.features import create_feature_extractor
from invert_ad.models import create_denoiser
from invert_ad.scorer import InversionScorer

IMAGE_SIZE = 32  # lite0 at 32 px gives a 2 x 2 grid of 192 channels: the real backbone, seconds on a CPU
GRID = 2
SHARED_DATA = Path(os.environ.get("INVERT_AD_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data"))


def texture(seed: int, size: int = 64) -> np.ndarray:
    """A smooth random RGB texture ``(size, size, 3)`` uint8 (compresses well as PNG)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(60, 200, (4, 4, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BILINEAR))


def normal_images(count: int, size: int = IMAGE_SIZE) -> torch.Tensor:
    """``(count, 3, size, size)`` in [0, 1]: real mvtec3d_tire train images when present, else textures."""
    folder = SHARED_DATA / "mvtec3d_tire" / "train" / "good"
    if folder.is_dir() and len(list_images(folder)) >= count:
        pictures = [load_image(p) for p in list_images(folder)[:count]]
    else:
        pictures = [Image.fromarray(texture(i, 4 * size)) for i in range(count)]
    arrays = [np.asarray(p.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32) / 255 for p in pictures]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def build_small_detector(num_train: int = 8, num_holdout: int = 4, image_size: int = IMAGE_SIZE) -> AnomalyDetector:
    """The real lite0 backbone + a Gaussian denoiser fitted on real features + hybrid scorer + calibration.

    Assembled like :func:`invert_ad.training.train.train_detector` (standardised features, holdout
    calibration), only smaller.
    """
    extractor = create_feature_extractor("efficientnet_lite0", image_size=image_size, grid=GRID)
    images = normal_images(num_train + num_holdout, image_size)
    with torch.inference_mode():
        raw = extractor(images)
    mean, std = channel_statistics(raw[:num_train])
    features = (raw - mean.reshape(1, -1, 1, 1)) / std.reshape(1, -1, 1, 1)
    train, holdout = features[:num_train], features[num_train:]
    denoiser = create_denoiser("gaussian", in_channels=features.shape[1], grid_size=GRID, features=train)
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", clip_sample=False
    )
    scorer = InversionScorer(denoiser.eval().requires_grad_(False), scheduler, timesteps="paper", scoring="hybrid")
    detector = AnomalyDetector(extractor, scorer, feature_mean=mean, feature_std=std)
    return detector.fit(normal_features=holdout, folds=None)


# ---------------------------------------------------------------------------------------------- image files
def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def hand_png(array: np.ndarray, bit_depth: int, color_type: int) -> bytes:
    """A PNG written from the spec (for 16-bit RGB, which Pillow cannot write)."""
    height, width = array.shape[:2]
    dtype = ">u2" if bit_depth == 16 else "u1"
    rows = b"".join(b"\x00" + row.astype(dtype).tobytes() for row in array)
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(rows))
        + png_chunk(b"IEND", b"")
    )


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width x height`` 8-bit gray pixels (a decompression bomb's header)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (width + 1) * 4)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def encoded(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def _corrupt(data: bytes, start: int, stop: int, step: int, value: int | None = None) -> bytes:
    mutable = bytearray(data)
    for k in range(start, min(stop, len(mutable) - 2), step):
        mutable[k] = value if value is not None else mutable[k] ^ 0x5A
    return bytes(mutable)


def image_zoo() -> dict[str, tuple[bytes, bool]]:
    """Files of every kind a user may feed: ``{file name: (bytes, readable)}``.

    ``readable`` files must load as RGB and be scored; the others must raise ``ImageReadError`` and be
    reported and skipped. Sizes are those of the decoded image (40 x 40 unless the name says otherwise).
    """
    rgb = texture(0, 40)
    image = Image.fromarray(rgb)
    alpha = np.linspace(0, 255, 40 * 40).reshape(40, 40).astype(np.uint8)
    rgba = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    ramp16 = (np.arange(40 * 40).reshape(40, 40) * 40).astype(np.uint16)
    floats = np.linspace(0, 1, 40 * 40, dtype=np.float32).reshape(40, 40)
    floats[0, 0], floats[0, 1] = np.nan, np.inf
    multipage = io.BytesIO()
    image.save(multipage, "TIFF", save_all=True, append_images=[Image.fromarray(255 - rgb)])
    exif_image = Image.new("RGB", (30, 20), (1, 2, 3))
    exif = exif_image.getexif()
    exif[0x0112] = 6  # "rotate 90": not applied, the stored pixels are read
    png, jpeg, cmyk_tiff = encoded(image, "PNG"), encoded(image, "JPEG"), encoded(image.convert("CMYK"), "TIFF")
    scan = jpeg.find(b"\xff\xda")
    idat = png.find(b"IDAT")
    good = {
        "rgb.png": png,
        "rgb.jpg": jpeg,
        "progressive.jpg": encoded(image, "JPEG", progressive=True),
        "gray.png": encoded(image.convert("L"), "PNG"),
        "gray.jpg": encoded(image.convert("L"), "JPEG"),
        "bilevel.png": encoded(image.convert("1"), "PNG"),
        "gray_alpha.png": encoded(image.convert("LA"), "PNG"),
        "rgba.png": encoded(rgba, "PNG"),
        "palette.png": encoded(image.convert("P"), "PNG"),
        "palette_transparent.png": encoded(image.convert("P"), "PNG", transparency=0),
        "gray16.png": hand_png(ramp16, 16, 0),
        "rgb16.png": hand_png(rgb.astype(np.uint16) * 257, 16, 2),
        "gray16.tif": encoded(Image.fromarray(ramp16), "TIFF"),
        "int32.tif": encoded(Image.fromarray(ramp16.astype(np.int32)), "TIFF"),
        "float_nan_inf.tif": encoded(Image.fromarray(floats, "F"), "TIFF"),
        "cmyk.jpg": encoded(image.convert("CMYK"), "JPEG"),
        "cmyk.tif": cmyk_tiff,
        "ycbcr.jpg": encoded(image.convert("YCbCr"), "JPEG"),
        "lab.tif": encoded(image.convert("LAB"), "TIFF"),
        "rgb.bmp": encoded(image, "BMP"),
        "rgb.webp": encoded(image, "WEBP"),
        "rgba.webp": encoded(rgba, "WEBP"),
        "multipage.tif": multipage.getvalue(),
        "exif_rotated_30x20.jpg": encoded(exif_image, "JPEG", exif=exif),
        "one_pixel_1x1.png": encoded(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"),
        "wide_5000x1.png": encoded(Image.new("RGB", (5000, 1), (9, 9, 9)), "PNG"),
        "tall_1x5000.png": encoded(Image.new("RGB", (1, 5000), (9, 9, 9)), "PNG"),
        "png_named.jpg": png,
        "gif_named.png": encoded(image, "GIF"),
        "UPPER_CASE.PNG": png,
    }
    bad = {
        "empty.png": b"",
        "truncated.png": png[: len(png) // 2],
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "truncated.tif": cmyk_tiff[:200],
        "header_only.png": png[:33],
        "random_bytes.png": np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes(),
        "html_page.jpg": b"<html><body>404 Not Found</body></html>",
        "pdf_named.png": b"%PDF-1.4\n" + b"x" * 100,
        "bad_header_crc.png": _corrupt(png, 29, 30, 1),
        "corrupt_idat.png": _corrupt(png, idat + 8, idat + 40, 1),
        "corrupt_scan.jpg": _corrupt(jpeg, scan + 20, len(jpeg), 7, 0xFF),
        "bomb_20000x20000.png": bomb_png(20000, 20000),
        "zero_size_0x0.png": bomb_png(0, 0),
    }
    return {**{k: (v, True) for k, v in good.items()}, **{k: (v, False) for k, v in bad.items()}}


def expected_size(name: str) -> tuple[int, int]:
    """``(width, height)`` of a readable zoo file."""
    for part in name.split("_"):
        width, _, height = part.partition(".")[0].partition("x")
        if width.isdigit() and height.isdigit():
            return int(width), int(height)
    return 40, 40


# ---------------------------------------------------------------------------------------------- memory
def rss() -> int:
    """Resident set size of this process, bytes."""
    return psutil.Process().memory_info().rss


class PeakRss:
    """Sample this process's RSS every ``interval`` seconds in a thread; ``peak`` is the highest seen.

    Example:
        >>> with PeakRss() as sampler:
        ...     work()
        >>> sampler.peak - sampler.start
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        process = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, process.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> PeakRss:
        self.start = self.peak = rss()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start
