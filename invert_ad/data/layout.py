"""Which dataset a folder is: an MVTec-layout category, or a plain folder of normal images."""

from __future__ import annotations

import os
from pathlib import Path

from .base import ImageDataset
from .folder import FolderDataset
from .mvtec import MVTecDataset

__all__ = ["category_folders", "open_dataset"]


def _is_category(folder: Path) -> bool:
    return (folder / "train").is_dir() or (folder / "test").is_dir()


def category_folders(data: str | os.PathLike) -> list[Path]:
    """The categories a ``--data`` folder stands for: itself, or, for a dataset root (a folder holding no
    ``train``/``test`` split but MVTec-layout category folders, as MVTec AD's and VisA's downloads do), every
    such category folder in it, sorted by name."""
    root = Path(data)
    if not root.is_dir() or _is_category(root):
        return [root]
    found = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and _is_category(p))
    return found or [root]


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
    if _is_category(root):
        return MVTecDataset(root, split=split, image_size=image_size, skip_bad=True)
    if split != "train":
        raise ValueError(f"{root} is a plain folder of normal images: it has no {split!r} split")
    return FolderDataset(root, image_size=image_size, skip_bad=True)
