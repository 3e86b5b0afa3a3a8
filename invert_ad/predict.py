"""Score files and folders with a saved detector, streaming in batches (bounded memory), skipping bad images."""

from __future__ import annotations

import csv
import io
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .data import IMAGE_EXTENSIONS, ImageDataset, ImageRecord, collate_samples, list_images
from .io import atomic_write_text
from .pipeline import AnomalyDetector

__all__ = ["expand_inputs", "predict_paths"]

FIELDS = ("path", "pred_score", "pred_label", "raw_score", "height", "width", "error")


def expand_inputs(inputs: Sequence[str | os.PathLike], problems: list[tuple[Path, str]] | None = None) -> list[Path]:
    """Files as given, folders expanded to the images directly inside them, in order.

    Args:
        inputs: files and folders.
        problems: if given, entries named like images inside the folders that are not readable files (a
            dangling symbolic link, ...) are appended to it as ``(path, reason)``; they are left out either way
            (see :func:`~invert_ad.data.list_images`).

    Raises:
        FileNotFoundError: a path that does not exist.
    """
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths.extend(list_images(item, problems))
        elif item.is_file():
            paths.append(item)
        else:
            raise FileNotFoundError(f"no such file or folder: {item}")
    return paths


def _save_png(array: np.ndarray, path: Path) -> None:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(buffer.getvalue())
        os.replace(tmp, path)
    finally:  # a failed write or rename leaves no partial file behind
        tmp.unlink(missing_ok=True)


def predict_paths(
    model: str | os.PathLike | AnomalyDetector,
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    maps_dir: str | os.PathLike | None = None,
    threshold: float | None = None,
    batch_size: int = 16,
    device: str = "cpu",
    progress: bool = True,
    optimize: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Predict every image under ``inputs`` and write one row per image to ``out`` (``.json`` or ``.csv``).

    Rows carry anomalib's field names (``pred_score`` normalised to [0, 1] with the threshold at 0.5,
    ``pred_label``), the ``raw_score``, the original size and ``error`` for images that could not be read
    (those are reported and skipped; the rest are scored). Entries of input folders named like images that are
    not readable files get a row too, after the others, whose ``error`` says why (``"dangling symbolic link"``,
    ``"symbolic link loop"``, ``"not a regular file"``, ...). With ``maps_dir``, each image's ``anomaly_map``
    (8-bit PNG of the normalised map at the original size, 128 = threshold) and ``pred_mask`` are saved.

    Args:
        model: a model folder, a Hub repo id or a loaded detector.
        inputs: image files and folders (see :func:`expand_inputs`).
        out: the results file, ``.json`` or ``.csv``.
        maps_dir: where to save the maps and masks (none saved without it).
        threshold: the normalised threshold (default 0.5).
        batch_size: images per network call.
        device: where a model loaded from ``model`` runs.
        progress: a progress bar.
        optimize: keyword arguments of :meth:`AnomalyDetector.optimize` (``compile_mode``, ``channels_last``,
            ``autocast_dtype``, ``autocast_backbone``), applied before scoring; ``None`` leaves the detector as
            it is. A detector passed as ``model`` keeps these settings afterwards. With ``compile_mode`` and
            without ``compile_batch_size``, ``batch_size`` is used as the compiled batch size, so a last, smaller
            batch (or one shortened by unreadable images) is padded instead of compiled again.

    Returns:
        ``{"out": ..., "num_images": N, "num_anomalous": K, "num_failed": F}``.
    """
    out = Path(out)
    if out.suffix.lower() not in (".json", ".csv"):
        raise ValueError(f"--out must end in .json or .csv, got {out.name}")
    detector = model if isinstance(model, AnomalyDetector) else AnomalyDetector.from_pretrained(model, device=device)
    if optimize is not None:
        detector.optimize(**{"compile_batch_size": batch_size, **optimize})
    problems: list[tuple[Path, str]] = []
    paths = expand_inputs(inputs, problems)
    if not paths and not problems:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found in {list(map(str, inputs))}")
    records = [ImageRecord(path=p, label=0, defect_type="unknown") for p in paths]
    dataset = ImageDataset(records, image_size=detector.image_size, skip_bad=True, description="inputs")
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_samples)
    rows: list[dict[str, Any]] = []
    for path, reason in problems:
        warnings.warn(f"skipping: {path}: {reason}", stacklevel=2)
        rows.append({"path": str(path), "error": reason})
    with tqdm(total=len(paths), desc="predicting", unit="image", disable=not progress) as bar:
        for batch in loader:
            rows.extend({"path": p, "error": "unreadable image"} for p in batch["skipped"])
            if len(batch["path"]):
                sizes = [tuple(int(v) for v in s) for s in batch["original_size"]]
                for path, size, pred in zip(
                    batch["path"], sizes, detector.predict(batch["image"], sizes, threshold), strict=True
                ):
                    rows.append(
                        {
                            "path": path,
                            "pred_score": pred.pred_score,
                            "pred_label": pred.pred_label,
                            "raw_score": pred.raw_score,
                            "height": size[0],
                            "width": size[1],
                            "error": None,
                        }
                    )
                    if maps_dir is not None:
                        stem = Path(maps_dir) / Path(path).stem
                        _save_png(
                            (pred.anomaly_map.numpy() * 255).round().astype(np.uint8), stem.with_suffix(".map.png")
                        )
                        _save_png(pred.pred_mask.numpy().astype(np.uint8) * 255, stem.with_suffix(".mask.png"))
            bar.update(len(batch["path"]) + len(batch["skipped"]))
    order = {str(p): i for i, p in enumerate(paths)}
    rows.sort(key=lambda r: order.get(r["path"], len(order)))
    if out.suffix.lower() == ".json":
        atomic_write_text(out, json.dumps(rows, indent=2) + "\n")
    else:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows({k: r.get(k) for k in FIELDS} for r in rows)
        atomic_write_text(out, buffer.getvalue())
    failed = sum(r["error"] is not None for r in rows)
    return {
        "out": str(out),
        "num_images": len(rows),
        "num_anomalous": sum(bool(r.get("pred_label")) for r in rows),
        "num_failed": failed,
    }
