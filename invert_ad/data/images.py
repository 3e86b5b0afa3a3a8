"""Reading images and masks from disk: any Pillow mode to 8-bit RGB, masks to binary, clear errors."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["IMAGE_EXTENSIONS", "ImageReadError", "list_images", "load_image", "load_mask"]

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("LA", "La", "RGBA", "RGBa", "PA")
_UINT16_TO_UINT8 = 257.0  # 65535 / 255: maps 0..65535 onto 0..255 exactly at both ends


class ImageReadError(ValueError):
    """An image or mask file that is missing, empty, truncated or not an image; the message names the path."""


def list_images(folder: str | os.PathLike, problems: list[tuple[Path, str]] | None = None) -> list[Path]:
    """Image files directly inside ``folder`` (by extension, case-insensitive; hidden files left out), sorted.

    Entries named like images that are not readable files are left out. With ``problems``, each of them except
    sub-folders is also appended to it, in sorted order, as ``(path, reason)``: ``"dangling symbolic link"``,
    ``"symbolic link loop"``, ``"not a regular file"`` (FIFO, socket, device) or ``"cannot access: ..."``.
    """
    images = []
    for path in sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS):
        if path.name.startswith("."):
            continue
        if path.is_file():
            images.append(path)
        elif problems is not None and (reason := _not_a_file(path)) is not None:
            problems.append((path, reason))
    return images


def _not_a_file(path: Path) -> str | None:
    """Why ``path`` (not a regular file, nor a link to one) cannot be read as an image; None for a folder."""
    try:
        mode = path.stat().st_mode
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "symbolic link loop"
        if path.is_symlink() and err.errno in (errno.ENOENT, errno.ENOTDIR):
            return "dangling symbolic link"
        return f"cannot access: {err.strerror or err}"
    return None if stat.S_ISDIR(mode) else "not a regular file"


def _open(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode ``path`` (Pillow decodes lazily; truncation only shows on ``load``)."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageReadError(f"cannot read image {path}: the file is empty")
        with Image.open(path) as image:
            image.load()
            return image
    except ImageReadError:
        raise
    except Exception as err:  # missing, truncated, not an image, decompression bomb, ...: all "cannot read"
        raise ImageReadError(f"cannot read image {path}: {type(err).__name__}: {err}") from err


def _to_uint8_gray(image: Image.Image) -> np.ndarray:
    """Integer (16-bit, also when Pillow says ``I``) or float single-channel data scaled to 0..255."""
    data = np.asarray(image)
    if image.mode == "F":  # floats: [0, 1] if they fit, otherwise taken as 0..255
        scale = 255.0 if float(np.nanmax(data, initial=0.0)) <= 1.0 else 1.0
        return np.clip(np.nan_to_num(data) * scale, 0, 255).round().astype(np.uint8)
    return np.clip(data.astype(np.float64) / _UINT16_TO_UINT8, 0, 255).round().astype(np.uint8)


def _cmyk_to_rgb(image: Image.Image) -> Image.Image:
    """Subtractive conversion R = (255 - C)(255 - K) / 255 (and G, B with M, Y); ICC profiles are ignored."""
    cmyk = np.asarray(image).astype(np.float64)
    ink = 255.0 - cmyk[..., :3]
    key = 255.0 - cmyk[..., 3:]
    return Image.fromarray((ink * key / 255.0).round().astype(np.uint8), "RGB")


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        return Image.fromarray(_to_uint8_gray(image), "L").convert("RGB")
    if mode == "CMYK":
        return _cmyk_to_rgb(image)
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Read an image as 8-bit RGB.

    Conversions: gray (``L``, ``1``) is repeated on three channels; 16-bit data (``I;16*``, and ``I`` as Pillow
    reads some 16-bit files) is divided by 257, so 65535 becomes 255 (never clipped at 255); float ``F`` data in
    [0, 1] is scaled by 255; images with alpha (``LA``, ``RGBA``, ``P`` with transparency) are composited over
    black; ``CMYK`` uses ``(255 - C)(255 - K) / 255``; palette and other modes go through Pillow. EXIF orientation
    is not applied (masks are aligned with the stored pixels).

    Args:
        path: image file.

    Returns:
        A decoded PIL image of mode ``RGB``.

    Raises:
        ImageReadError: the file is missing, empty, truncated, not an image, or its mode cannot be converted.
    """
    image = _open(path)
    try:
        return _to_rgb(image)
    except Exception as err:  # exotic modes Pillow cannot convert
        raise ImageReadError(f"cannot convert image {path} of mode {image.mode!r} to RGB: {err}") from err


def load_mask(path: str | os.PathLike, size: int | tuple[int, int] | None = None) -> np.ndarray:
    """Read a ground-truth mask as a boolean array: a pixel is anomalous where any colour channel is > 0.

    Alpha channels are ignored; palette (``P``) masks are read by index (index > 0 is anomalous).

    Args:
        path: mask file (any mode or bit depth).
        size: output side ``S`` or ``(H, W)``; resized with nearest neighbour after binarising. ``None`` keeps
            the file's size.

    Returns:
        ``(H, W)`` bool array.

    Raises:
        ImageReadError: the file cannot be read.
    """
    image = _open(path)
    data = np.asarray(image)
    if data.ndim == 3:
        colour = data[..., :-1] if image.mode in _ALPHA_MODES else data
        binary = colour.any(axis=-1)
    else:
        binary = data > 0
    if size is None:
        return binary
    height, width = (size, size) if isinstance(size, int) else size
    if binary.shape == (height, width):
        return binary
    resized = Image.fromarray(binary.astype(np.uint8) * 255, "L").resize((width, height), Image.Resampling.NEAREST)
    return np.asarray(resized) > 0
