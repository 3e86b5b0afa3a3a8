"""Thresholds and the domain check of the default detector (issue 18): normal images flagged, masks on images
labelled normal, the ranking of ``pred_score``, and another product's images flagged as out of the domain.

Trains the default detector (``gaussian``, out-of-fold calibration) on one category and predicts its test split
and another category's. Command that produced ``benchmarks/results/thresholds.json``::

    .venv/bin/python benchmarks/thresholds.py --threads 1 --out benchmarks/results/thresholds.json
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from sklearn.metrics import roc_auc_score

from invert_ad.data import open_dataset
from invert_ad.training.train import train_detector

from common import DEFAULT_CACHE_DIR, DEFAULT_DATA, RESULTS_DIR, add_threads_argument, run_info, write_results


def predict_split(detector, root: Path) -> dict:
    dataset = open_dataset(root, "test", detector.image_size)
    images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    labels = torch.tensor([r.label for r in dataset.records])
    out = detector.predict(images, warn=False)
    normal = labels == 0
    return {
        "data": root.name,
        "num_normal": int(normal.sum()),
        "num_anomalous": int((~normal).sum()),
        "normal_flagged": int(out.pred_label[normal].sum()),
        "anomalous_flagged": int(out.pred_label[~normal].sum()),
        "normal_with_mask": int(out.pred_mask[normal].flatten(1).any(1).sum()),
        "image_auroc_raw_score": float(roc_auc_score(labels, out.raw_score)),
        "image_auroc_pred_score": float(roc_auc_score(labels, out.pred_score)),
        "out_of_domain": int((~out.in_domain).sum()),
        "num_images": len(labels),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=Path, default=DEFAULT_DATA / "mvtec3d_tire")
    parser.add_argument("--other", type=Path, default=DEFAULT_DATA / "mtd_magnetic_tile")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "thresholds.json")
    add_threads_argument(parser)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        summary = train_detector(args.train, Path(tmp) / "model", cache_dir=args.cache_dir, progress=False)
    detector = summary.detector
    rows = [predict_split(detector, args.train), predict_split(detector, args.other)]
    data = {"run": run_info(), "calibration": detector.calibration.to_dict(), "rows": rows}
    lines = [
        "| test data | normal flagged | anomalous flagged | normal with a mask | I-AUROC raw / pred | out of domain |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['data']} | {r['normal_flagged']} / {r['num_normal']} | {r['anomalous_flagged']} / "
            f"{r['num_anomalous']} | {r['normal_with_mask']} | {r['image_auroc_raw_score']:.4f} / "
            f"{r['image_auroc_pred_score']:.4f} | {r['out_of_domain']} / {r['num_images']} |"
        )
    write_results(
        args.out, data, f"# Thresholds of a detector trained on {args.train.name}\n\n" + "\n".join(lines) + "\n"
    )


if __name__ == "__main__":
    main()
