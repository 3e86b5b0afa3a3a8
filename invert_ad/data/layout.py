"""Which dataset a folder is: an MVTec-layout category, or a plain folder of normal images."""

from __future__ import annotations

import os
from pathlib import Path

from .base import ImageDataset
from .folder import FolderDataset
from .mvtec import MVTecDataset

__all__ = ["open_dataset"]


def open_dataset(data: str | os.PathLike | ImageDataset, split: str, image_size: int) -> ImageDataset:
    """An MVTec-layout category folder (``train/good`` inside) or a plain folder of normal images.

    Args:
        data: the folder, or a dataset (returned as it is).
        split: ``"train"`` or ``"test"``; a plain folder has only ``"train"``.
        image_size: images are resized to this square size, in pixels.

    Raises:
        FileNotFoundError: the folder does not exist.
        ValueError: a test split asked of a plain folder.
    """
    if isinstance(data, ImageDataset):
        return data
    root = Path(data)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")
    if (root / "train").is_dir() or (root / "test").is_dir():
        return MVTecDataset(root, split=split, image_size=image_size, skip_bad=True)
    if split != "train":
        raise ValueError(f"{root} is a plain folder of normal images: it has no {split!r} split")
    return FolderDataset(root, image_size=image_size, skip_bad=True)
