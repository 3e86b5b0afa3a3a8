"""VisA (Zou et al., ECCV 2022), read through its split CSV.

The CSV (``split_csv/1cls.csv`` in the VisA release) has the columns ``object,split,label,image,mask``; ``label`` is
``normal`` or ``anomaly`` and ``image`` / ``mask`` are paths relative to the dataset root.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Literal

from .base import GOOD, DatasetProblem, ImageDataset, ImageRecord

__all__ = ["VisADataset"]

_COLUMNS = ("object", "split", "label", "image", "mask")
_LABELS = {"normal": 0, "anomaly": 1}
_ANOMALY = "anomaly"
_DEFAULT_SPLIT_FILE = Path("split_csv") / "1cls.csv"


def _read_rows(split_file: Path) -> list[dict[str, str]]:
    if not split_file.is_file():
        raise FileNotFoundError(
            f"VisA split file {split_file} not found (the release has split_csv/1cls.csv; pass split_file=...)"
        )
    with split_file.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in _COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"{split_file} lacks the columns {missing} (expected {', '.join(_COLUMNS)})")
        return [{k: (v or "").strip() for k, v in row.items() if k is not None} for row in reader]


class VisADataset(ImageDataset):
    """One VisA category and split, as listed in the split CSV.

    Args:
        root: the VisA root (paths in the CSV are relative to it).
        category: the ``object`` column value, e.g. ``"candle"``.
        split: ``"train"`` or ``"test"`` (the ``split`` column).
        image_size: side S of the square tensors, in pixels.
        split_file: the CSV; defaults to ``root/split_csv/1cls.csv``.
        skip_bad: return flagged placeholders for unreadable files instead of raising.

    Attributes:
        problems: listed images that are absent or empty (left out), anomalous rows without a mask or whose mask file is
            absent, each a :class:`~invert_ad.data.DatasetProblem`.

    Raises:
        FileNotFoundError: the CSV is missing.
        ValueError: missing columns, an unknown label, or no rows for ``category`` and ``split`` (the message
            lists the categories and splits present).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        category: str,
        split: Literal["train", "test"] = "train",
        image_size: int = 256,
        *,
        split_file: str | os.PathLike | None = None,
        skip_bad: bool = False,
    ) -> None:
        self.root = Path(root)
        self.category = category
        self.split = split
        self.split_file = Path(split_file) if split_file is not None else self.root / _DEFAULT_SPLIT_FILE
        rows = _read_rows(self.split_file)
        selected = [r for r in rows if r["object"] == category and r["split"] == split]
        if not selected:
            present = sorted({(r["object"], r["split"]) for r in rows})
            raise ValueError(
                f"no rows for object={category!r}, split={split!r} in {self.split_file}; present: {present}"
            )
        records: list[ImageRecord] = []
        problems: list[DatasetProblem] = []
        for row in selected:
            if row["label"] not in _LABELS:
                raise ValueError(
                    f"{self.split_file}: label {row['label']!r} of {row['image']} is not one of {list(_LABELS)}"
                )
            image = self.root / row["image"]
            if not image.is_file():
                problems.append(DatasetProblem("image_missing", str(image)))
                continue
            if image.stat().st_size == 0:
                problems.append(DatasetProblem("empty_file", str(image)))
                continue
            label = _LABELS[row["label"]]
            mask = self.root / row["mask"] if row["mask"] and label == 1 else None
            if label == 1 and (mask is None or not mask.is_file()):
                problems.append(DatasetProblem("mask_missing", str(image)))
                mask = None
            records.append(ImageRecord(image, label, _ANOMALY if label else GOOD, mask))
        super().__init__(
            records,
            image_size=image_size,
            skip_bad=skip_bad,
            problems=problems,
            description=f"VisADataset({str(self.root)!r}, {category!r}, split={split!r})",
        )
