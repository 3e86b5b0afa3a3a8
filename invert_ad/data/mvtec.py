"""MVTec AD layout (also MPDD, BTAD, MVTec 3D-AD RGB, and folders copied into that layout).

::

    CATEGORY/train/good/*.png                      normal training images (BTAD: ``ok``)
    CATEGORY/validation/good/*.png                 optional
    CATEGORY/test/good/*.png                       normal test images
    CATEGORY/test/<defect_type>/*.png              anomalous test images
    CATEGORY/ground_truth/<defect_type>/<stem>_mask.png   masks (BTAD: ``<stem>.png``)

MVTec 3D-AD's own layout is read too: images in ``<split>/<type>/rgb/`` and masks in ``test/<type>/gt/<stem>.png``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from .base import GOOD, DatasetProblem, ImageDataset, ImageRecord, masks_by_stem, pair_masks, usable_images
from .images import IMAGE_EXTENSIONS, list_images

__all__ = ["MVTecDataset"]

_NORMAL_FOLDERS = ("good", "ok")
_SPLITS = ("train", "validation", "test")
_RGB_FOLDER = "rgb"
_GT_FOLDER = "gt"


def _image_folder(folder: Path) -> Path:
    """MVTec 3D-AD keeps the RGB images one level down, in ``rgb/``."""
    return folder / _RGB_FOLDER if (folder / _RGB_FOLDER).is_dir() else folder


def _normal_folder(split_dir: Path) -> Path:
    for name in _NORMAL_FOLDERS:
        if (split_dir / name).is_dir():
            return split_dir / name
    raise FileNotFoundError(
        f"expected normal images in {split_dir / 'good'} (MVTec AD layout: CATEGORY/train/good/*.png, "
        f"CATEGORY/test/<defect_type>/*.png, CATEGORY/ground_truth/<defect_type>/<name>_mask.png)"
    )


def _index_normal(split_dir: Path, problems: list[DatasetProblem]) -> list[ImageRecord]:
    folder = _image_folder(_normal_folder(split_dir))
    images = usable_images(folder, problems)
    if not images:
        raise FileNotFoundError(f"no usable images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
    return [ImageRecord(path, 0, GOOD) for path in images]


def _index_test(root: Path, split_dir: Path, problems: list[DatasetProblem]) -> list[ImageRecord]:
    type_dirs = sorted(d for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not type_dirs:
        raise FileNotFoundError(f"no defect-type folders (good, <defect_type>, ...) in {split_dir}")
    records: list[ImageRecord] = []
    for type_dir in type_dirs:
        images = usable_images(_image_folder(type_dir), problems)
        if type_dir.name in _NORMAL_FOLDERS:
            records += [ImageRecord(path, 0, GOOD) for path in images]
            continue
        masks = masks_by_stem([root / "ground_truth" / type_dir.name, type_dir / _GT_FOLDER])
        records += pair_masks(images, masks, type_dir.name, problems)
    known = {d.name for d in type_dirs}
    gt_root = root / "ground_truth"
    if gt_root.is_dir():
        for orphan_dir in sorted(d for d in gt_root.iterdir() if d.is_dir() and d.name not in known):
            problems += [DatasetProblem("mask_without_image", str(p)) for p in list_images(orphan_dir)]
    return records


class MVTecDataset(ImageDataset):
    """One category in the MVTec AD layout (MVTec AD, MPDD, BTAD, MVTec 3D-AD RGB).

    Args:
        root: the category folder (holding ``train/``, ``test/``, ``ground_truth/``).
        split: ``"train"`` (``train/good``), ``"validation"`` (``validation/good``) or ``"test"`` (every folder
            of ``test/``; ``good`` / ``ok`` are normal, the others anomalous with masks from ``ground_truth/``).
        image_size: side S of the square tensors, in pixels.
        skip_bad: return flagged placeholders for unreadable files instead of raising (see
            :func:`~invert_ad.data.collate_samples`).

    Attributes:
        problems: anomalous images without a mask, masks without an image and empty files (left out), each
            a :class:`~invert_ad.data.DatasetProblem`; a warning summarises them.

    Raises:
        FileNotFoundError: ``root``, the split folder or its normal folder (``train/good``) is missing, or holds
            no images.
        ValueError: unknown ``split``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: Literal["train", "validation", "test"] = "train",
        image_size: int = 256,
        *,
        skip_bad: bool = False,
    ) -> None:
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
        self.root = Path(root)
        self.split = split
        if not self.root.is_dir():
            raise FileNotFoundError(f"dataset folder {self.root} does not exist")
        split_dir = self.root / split
        if not split_dir.is_dir():
            where = split_dir / "good" if split != "test" else split_dir
            raise FileNotFoundError(f"expected {where} in the MVTec AD layout, but {split_dir} does not exist")
        problems: list[DatasetProblem] = []
        test = split == "test"
        records = _index_test(self.root, split_dir, problems) if test else _index_normal(split_dir, problems)
        super().__init__(
            records,
            image_size=image_size,
            skip_bad=skip_bad,
            problems=problems,
            description=f"MVTecDataset({str(self.root)!r}, split={split!r})",
        )
