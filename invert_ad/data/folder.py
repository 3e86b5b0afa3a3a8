"""Plain folders: normal images for training; normal and anomalous folders (and masks) for testing."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from .base import GOOD, DatasetProblem, ImageDataset, ImageRecord, masks_by_stem, pair_masks, usable_images

__all__ = ["FolderDataset"]


def _folder_images(folder: str | os.PathLike, role: str, problems: list[DatasetProblem]) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{role} folder {folder} does not exist")
    return usable_images(folder, problems)


class FolderDataset(ImageDataset):
    """Images from plain folders (files directly inside, not recursive).

    Args:
        normal_dir: normal images, the ``"train"`` split.
        abnormal_dir: anomalous test images (label 1, defect type = the folder's name).
        mask_dir: masks of the anomalous images, matched by name: ``<stem>.*`` or ``<stem>_mask.*``. Without it
            anomalous images get all-zero masks and no problem is reported.
        test_normal_dir: normal test images (label 0).
        split: ``"train"`` (``normal_dir``) or ``"test"`` (``test_normal_dir`` then ``abnormal_dir``).
        image_size: side S of the square tensors, in pixels.
        skip_bad: return flagged placeholders for unreadable files instead of raising.

    Attributes:
        problems: with ``mask_dir``, anomalous images without a mask and masks without an image; empty files
            (left out). Each a :class:`~invert_ad.data.DatasetProblem`.

    Raises:
        FileNotFoundError: a folder that is needed does not exist.
        ValueError: unknown ``split``, or ``split="test"`` without ``test_normal_dir`` or ``abnormal_dir``.
    """

    def __init__(
        self,
        normal_dir: str | os.PathLike,
        abnormal_dir: str | os.PathLike | None = None,
        mask_dir: str | os.PathLike | None = None,
        test_normal_dir: str | os.PathLike | None = None,
        *,
        split: Literal["train", "test"] = "train",
        image_size: int = 256,
        skip_bad: bool = False,
    ) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        self.split = split
        problems: list[DatasetProblem] = []
        records: list[ImageRecord] = []
        if split == "train":
            records = [ImageRecord(p, 0, GOOD) for p in _folder_images(normal_dir, "normal", problems)]
        elif test_normal_dir is None and abnormal_dir is None:
            raise ValueError("split='test' needs test_normal_dir and/or abnormal_dir")
        else:
            if test_normal_dir is not None:
                records += [ImageRecord(p, 0, GOOD) for p in _folder_images(test_normal_dir, "normal test", problems)]
            if abnormal_dir is not None:
                records += self._anomalous(Path(abnormal_dir), mask_dir, problems)
        super().__init__(
            records,
            image_size=image_size,
            skip_bad=skip_bad,
            problems=problems,
            description=f"FolderDataset({str(normal_dir)!r}, split={split!r})",
        )

    @staticmethod
    def _anomalous(
        abnormal_dir: Path, mask_dir: str | os.PathLike | None, problems: list[DatasetProblem]
    ) -> list[ImageRecord]:
        images = _folder_images(abnormal_dir, "anomalous", problems)
        if mask_dir is None:
            return [ImageRecord(p, 1, abnormal_dir.name) for p in images]
        if not Path(mask_dir).is_dir():
            raise FileNotFoundError(f"mask folder {mask_dir} does not exist")
        return pair_masks(images, masks_by_stem([Path(mask_dir)]), abnormal_dir.name, problems)
