"""ELPV (electroluminescence images of solar cells, Deitsch et al.), installed from PyPI as ``elpv-dataset``.

The built-in data of ``invert-ad demo``: 300x300 grayscale cells with a defect probability from experts
(0, 1/3, 2/3, 1). Normal = probability 0, anomalous = probability 1; the uncertain middle grades are left
out. No pixel masks. Split: normal cells sorted by file name, every 5th to the test set (as for MTD in
``../shared/data``); a subset can be drawn for a quick demo.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from .base import ImageDataset, ImageRecord

__all__ = ["elpv_dataset", "elpv_root"]


def elpv_root() -> Path:
    """The folder holding ``labels.csv`` and ``images/`` inside the installed package."""
    try:
        import elpv_dataset
    except ImportError as err:
        raise ImportError("the demo data come from PyPI: pip install elpv-dataset (or 'invert_ad[demo]')") from err
    return Path(elpv_dataset.__file__).parent / "data"


def _records(kind: str | None = None) -> tuple[list[Path], list[Path]]:
    root = elpv_root()
    normal, defective = [], []
    for line in (root / "labels.csv").read_text().splitlines():
        if not line.strip():
            continue
        name, probability, cell_kind = line.split()
        if kind is not None and cell_kind != kind:
            continue
        if float(probability) == 0.0:
            normal.append(root / name)
        elif float(probability) == 1.0:
            defective.append(root / name)
    return sorted(normal), sorted(defective)


def elpv_dataset(
    split: Literal["train", "test"],
    image_size: int = 256,
    max_train: int | None = 600,
    max_test_per_class: int | None = 150,
    kind: Literal["mono", "poly"] | None = None,
) -> ImageDataset:
    """The ELPV train (normal only) or test (normal + defective) split.

    Args:
        split: ``"train"`` or ``"test"``.
        image_size: side S of the square tensors.
        max_train: keep at most this many training cells (evenly spaced by name), ``None`` for all 1206.
        max_test_per_class: at most this many normal and this many defective test cells, ``None`` for all.
        kind: only monocrystalline (``"mono"``) or polycrystalline (``"poly"``) cells: two products for the
            unified setting; ``None``: both.

    Raises:
        ValueError: an unknown split or kind.
    """
    if kind not in (None, "mono", "poly"):
        raise ValueError(f"kind must be 'mono', 'poly' or None, got {kind!r}")
    normal, defective = _records(kind)
    test_normal = normal[::5]
    train_normal = [p for i, p in enumerate(normal) if i % 5]

    def thin(paths: list[Path], limit: int | None) -> list[Path]:
        if limit is None or len(paths) <= limit:
            return paths
        step = len(paths) / limit
        return [paths[int(i * step)] for i in range(limit)]

    if split == "train":
        records = [ImageRecord(p, 0, "good") for p in thin(train_normal, max_train)]
    elif split == "test":
        records = [ImageRecord(p, 0, "good") for p in thin(test_normal, max_test_per_class)]
        records += [ImageRecord(p, 1, "defect") for p in thin(defective, max_test_per_class)]
    else:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    name = "ELPV" if kind is None else f"ELPV {kind}"
    return ImageDataset(records, image_size=image_size, skip_bad=True, description=f"{name} {split}")
