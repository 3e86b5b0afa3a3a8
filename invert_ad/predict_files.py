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
from .detector import AnomalyDetector
from .io import atomic_write_text
from .scoring import upsample_maps

__all__ = ["FIELDS", "expand_inputs", "map_names", "predict_paths"]

FIELDS = (
    "path",
    "pred_score",
    "pred_label",
    "raw_score",
    "in_domain",
    "domain_score",
    "height",
    "width",
    "map_path",
    "mask_path",
    "error",
)


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


def map_names(paths: Sequence[Path]) -> list[Path]:
    """Relative names for the maps of ``paths`` that keep their folder structure and never collide.

    Each name is the image's path relative to the deepest folder common to all images, without its suffix
    (``test/crack/000.png`` and ``test/hole/000.png`` give ``crack/000`` and ``hole/000``); a name given twice
    gets ``-2``, ``-3``, ... appended.
    """
    if not paths:
        return []
    resolved = [Path(os.path.abspath(p)) for p in paths]  # links keep their own names
    root = Path(os.path.commonpath([p.parent for p in resolved]))
    names: list[Path] = []
    seen: set[Path] = set()
    for path in resolved:
        base = path.relative_to(root).with_suffix("")
        name, copy = base, 1
        while name in seen:
            copy += 1
            name = base.with_name(f"{base.name}-{copy}")
        seen.add(name)
        names.append(name)
    return names


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

    Rows carry anomalib's field names: ``pred_score`` (normalised, strictly increasing in the raw score, 0.5 at
    the threshold), ``pred_label``, the ``raw_score``, ``in_domain`` / ``domain_score`` (``False``: the image looks
    unlike the training images), the original size, and ``error``: why an image could not be read (empty,
    truncated, not an image, ...; the others are scored). Entries of input folders named like images that are
    not readable files get a row too, after the others (``"dangling symbolic link"``, ``"symbolic link loop"``,
    ``"not a regular file"``, ...). With ``maps_dir``, each image's ``anomaly_map`` (8-bit PNG of the normalised
    map at the original size, 128 = threshold) and ``pred_mask`` are saved under the image's path relative to the
    inputs' common folder (see :func:`map_names`), and the rows name them in ``map_path`` / ``mask_path``.

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
        ``{"out": ..., "num_images": N, "num_anomalous": K, "num_failed": F, "num_out_of_domain": D}``.
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
    names = dict(zip(map(str, paths), map_names(paths), strict=True))
    records = [ImageRecord(path=p, label=0, defect_type="unknown") for p in paths]
    dataset = ImageDataset(records, image_size=detector.image_size, skip_bad=True, description="inputs")
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_samples)
    rows: list[dict[str, Any]] = [{"path": str(path), "error": reason} for path, reason in problems]
    with (
        tqdm(total=len(paths), desc="predicting", unit="image", disable=not progress) as bar,
        warnings.catch_warnings(),
    ):
        warnings.filterwarnings("ignore", message="skipping: ")  # the reason goes into the row instead
        for batch in loader:
            rows.extend({"path": p, "error": e} for p, e in zip(batch["skipped"], batch["errors"], strict=True))
            if len(batch["path"]):
                rows.extend(_predict_batch(detector, batch, threshold, maps_dir, names))
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
    failed = sum(r.get("error") is not None for r in rows)
    outside = sum(r.get("in_domain") is False for r in rows)
    if outside:
        warnings.warn(
            f"{outside} of {len(rows) - failed} images look unlike the images this model was trained on "
            "(in_domain = False): is this the model for these parts?",
            UserWarning,
            stacklevel=2,
        )
    return {
        "out": str(out),
        "num_images": len(rows),
        "num_anomalous": sum(bool(r.get("pred_label")) for r in rows),
        "num_failed": failed,
        "num_out_of_domain": outside,
    }


def _predict_batch(
    detector: AnomalyDetector,
    batch: dict[str, Any],
    threshold: float | None,
    maps_dir: str | os.PathLike | None,
    names: dict[str, Path],
) -> list[dict[str, Any]]:
    """Rows (and saved maps) for the readable images of one collated batch."""
    sizes = [tuple(int(v) for v in s) for s in batch["original_size"]]
    out = detector.predict(batch["image"], threshold=0.5 if threshold is None else threshold, warn=False)
    rows = []
    for i, (path, size) in enumerate(zip(batch["path"], sizes, strict=True)):
        row = {
            "path": path,
            "pred_score": float(out.pred_score[i]),
            "pred_label": bool(out.pred_label[i]),
            "raw_score": float(out.raw_score[i]),
            "in_domain": bool(out.in_domain[i]),
            "domain_score": float(out.domain_score[i]),
            "height": size[0],
            "width": size[1],
            "error": None,
        }
        if maps_dir is not None:
            stem = Path(maps_dir) / names[path]
            anomaly_map = upsample_maps(out.anomaly_map[i : i + 1], size)[0]
            mask = upsample_maps(out.pred_mask[i : i + 1].float(), size)[0] > 0.5
            row["map_path"], row["mask_path"] = str(stem) + ".map.png", str(stem) + ".mask.png"
            _save_png((anomaly_map.clamp(0, 1).numpy() * 255).round().astype(np.uint8), Path(row["map_path"]))
            _save_png(mask.numpy().astype(np.uint8) * 255, Path(row["mask_path"]))
        rows.append(row)
    return rows
