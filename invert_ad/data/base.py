"""The dataset base: an index of image records turned into resized tensors, problems reported, bad files skippable."""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate

from .images import ImageReadError, list_images, load_image, load_mask

__all__ = [
    "GOOD",
    "DatasetProblem",
    "ImageDataset",
    "ImageRecord",
    "Sample",
    "collate_samples",
    "masks_by_stem",
    "pair_masks",
    "usable_images",
]

GOOD = "good"  # defect_type of normal images
_MASK_SUFFIX = "_mask"


class Sample(TypedDict):
    """One item of an :class:`ImageDataset`.

    Keys:
        image: ``(3, S, S)`` float32 in [0, 1], resized bilinearly to ``S = image_size``.
        label: 0 normal, 1 anomalous.
        mask: ``(1, S, S)`` float32 in {0, 1}, nearest-resized (zeros for normal images and missing masks).
        path: the image file.
        defect_type: ``"good"`` for normal images, else the defect folder's name (or ``"anomaly"``).
        original_size: ``(2,)`` int64, ``(H, W)`` of the file before resizing.
        index: position in the dataset.
    """

    image: torch.Tensor
    label: int
    mask: torch.Tensor
    path: str
    defect_type: str
    original_size: torch.Tensor
    index: int


@dataclass(frozen=True)
class ImageRecord:
    """An indexed image: where it is, its label, its mask file (``None`` if none) and its defect type."""

    path: Path
    label: int
    defect_type: str
    mask_path: Path | None = None


@dataclass(frozen=True)
class DatasetProblem:
    """Something wrong found while indexing, reported instead of raised.

    Attributes:
        kind: ``"mask_missing"`` (anomalous image without a mask), ``"mask_without_image"``, ``"empty_file"``
            (left out of the dataset), ``"unreadable_entry"`` (a dangling link, a FIFO, ...; left out) or
            ``"image_missing"`` (listed but absent, left out).
        path: the file concerned (for ``unreadable_entry``, followed by the reason in parentheses).
    """

    kind: str
    path: str


def usable_images(folder: Path, problems: list[DatasetProblem]) -> list[Path]:
    """The images of ``folder`` (:func:`~invert_ad.data.images.list_images`) fit to index; the rest go to ``problems``.

    Empty files are reported as ``empty_file``; entries named like images that are not readable files (dangling
    or looping symbolic links, FIFOs, ...) as ``unreadable_entry``. A cheap check at indexing: undecodable
    contents are found when an image is loaded.
    """
    unreadable: list[tuple[Path, str]] = []
    kept = []
    for path in list_images(folder, unreadable):
        if path.stat().st_size == 0:
            problems.append(DatasetProblem("empty_file", str(path)))
        else:
            kept.append(path)
    problems += [DatasetProblem("unreadable_entry", f"{path} ({reason})") for path, reason in unreadable]
    return kept


def masks_by_stem(folders: Sequence[Path]) -> dict[str, Path]:
    """Mask files of the existing ``folders`` keyed by the image stem they belong to.

    ``000_mask.png`` (MVTec AD) and ``000.png`` (BTAD, MVTec 3D-AD) both belong to image ``000``; the first
    folder wins on a clash.
    """
    masks: dict[str, Path] = {}
    for folder in folders:
        if folder.is_dir():
            for path in list_images(folder):
                masks.setdefault(path.stem.removesuffix(_MASK_SUFFIX), path)
    return masks


def pair_masks(
    images: Sequence[Path], masks: dict[str, Path], defect_type: str, problems: list[DatasetProblem]
) -> list[ImageRecord]:
    """Anomalous records with their masks; images without a mask and unused masks go to ``problems``."""
    masks = dict(masks)
    records = []
    for path in images:
        mask = masks.pop(path.stem, None)
        if mask is None:
            problems.append(DatasetProblem("mask_missing", str(path)))
        records.append(ImageRecord(path, 1, defect_type, mask))
    problems += [DatasetProblem("mask_without_image", str(m)) for m in masks.values()]
    return records


class ImageDataset(Dataset):
    """Images with labels and masks as tensors; subclasses only build the index.

    Args:
        records: the indexed images.
        image_size: side S of the square output, in pixels.
        skip_bad: when True an unreadable image (or mask) gives a placeholder sample flagged with ``error`` (and a
            warning) instead of raising; :func:`collate_samples` drops those and lists them in ``skipped``.
        problems: indexing problems; a summary warning is issued when there are any.
        description: how the dataset names itself in messages.

    Attributes:
        records: the index, in order.
        problems: list of :class:`DatasetProblem` found while indexing.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        *,
        image_size: int = 256,
        skip_bad: bool = False,
        problems: Sequence[DatasetProblem] = (),
        description: str = "dataset",
    ) -> None:
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.records = list(records)
        self.image_size = int(image_size)
        self.skip_bad = skip_bad
        self.problems = list(problems)
        self.description = description
        if self.problems:
            counts = ", ".join(f"{n} {kind}" for kind, n in sorted(Counter(p.kind for p in self.problems).items()))
            warnings.warn(f"{description}: {len(self.problems)} problem(s): {counts}; see .problems", stacklevel=3)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def paths(self) -> list[str]:
        """Image paths in dataset order (no file is read)."""
        return [str(r.path) for r in self.records]

    @property
    def labels(self) -> list[int]:
        """Labels in dataset order, 0 normal and 1 anomalous (no file is read)."""
        return [r.label for r in self.records]

    def __repr__(self) -> str:
        anomalous = sum(self.labels)
        return f"{self.description}: {len(self)} images ({len(self) - anomalous} normal, {anomalous} anomalous)"

    def __getitem__(self, index: int) -> Sample | dict[str, Any]:
        """The sample at ``index`` (see :class:`Sample`).

        Raises:
            ImageReadError: the image or its mask cannot be read and ``skip_bad`` is False.
        """
        record = self.records[index]
        try:
            return self._load(record, index)
        except ImageReadError as err:
            if not self.skip_bad:
                raise
            warnings.warn(f"skipping: {err}", stacklevel=1)  # not stack 2: that is inside torch's DataLoader
            return self._placeholder(record, index, str(err))

    def _load(self, record: ImageRecord, index: int) -> Sample:
        size = self.image_size
        image = load_image(record.path)
        width, height = image.size
        resized = np.asarray(image.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
        if record.mask_path is None:
            mask = torch.zeros(1, size, size)
        else:
            mask = torch.from_numpy(load_mask(record.mask_path, size)).float()[None]
        return Sample(
            image=torch.from_numpy(resized).permute(2, 0, 1).contiguous(),
            label=record.label,
            mask=mask,
            path=str(record.path),
            defect_type=record.defect_type,
            original_size=torch.tensor([height, width]),
            index=index,
        )

    def _placeholder(self, record: ImageRecord, index: int, error: str) -> dict[str, Any]:
        size = self.image_size
        return {
            "image": torch.zeros(3, size, size),
            "label": record.label,
            "mask": torch.zeros(1, size, size),
            "path": str(record.path),
            "defect_type": record.defect_type,
            "original_size": torch.zeros(2, dtype=torch.long),
            "index": index,
            "error": error,
        }


def collate_samples(samples: list[Sample | dict[str, Any]]) -> dict[str, Any]:
    """Collate samples, dropping the placeholders of unreadable files (``skip_bad=True``).

    Use as ``DataLoader(dataset, collate_fn=collate_samples)``.

    Returns:
        The batched fields of :class:`Sample` (``image`` ``(B, 3, S, S)``, ``label`` ``(B,)``, ``mask``
        ``(B, 1, S, S)``, ``original_size`` ``(B, 2)``, ``index`` ``(B,)``, ``path`` and ``defect_type`` lists)
        for the B readable samples (B may be 0), plus ``skipped``: the paths of the dropped ones, and ``errors``:
        why each could not be read (same order).
    """
    good = [s for s in samples if "error" not in s]
    skipped = [s["path"] for s in samples if "error" in s]
    errors = [s["error"] for s in samples if "error" in s]
    if good:
        batch = default_collate(good)
    else:  # every sample unreadable: empty fields shaped like the placeholders
        batch = {k: v[:0] for k, v in default_collate(samples[:1]).items() if k != "error"}
    batch["skipped"], batch["errors"] = skipped, errors
    return batch
