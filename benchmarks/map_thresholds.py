"""Pixel thresholds of the default detector by map prior: out of fold (what ``fit`` does) against in sample.

For each map prior, the default detector is trained on one category as ``invert-ad train --map-prior PRIOR`` does
(the map statistic and the Gaussian fitted on every training image, 5-fold out-of-fold calibration) and predicts
that category's test split. Beside the calibrated pixel threshold, the threshold the same rule gives on the
training images' *in-sample* maps (the statistic scoring the images it was fitted on; what ``fit`` used before the
maps were calibrated out of fold), and how many test images of each kind get a non-empty mask at each threshold.

Command that produced ``benchmarks/results/map_thresholds.json``::

    .venv/bin/python benchmarks/map_thresholds.py --threads 2
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from invert_ad.calibration import fit_calibration
from invert_ad.data import open_dataset
from invert_ad.training.train import train_detector

from common import (
    DEFAULT_CACHE_DIR,
    DEFAULT_DATA,
    RESULTS_DIR,
    add_threads_argument,
    markdown_table,
    run_info,
    write_results,
)


def _images(root: Path, split: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    dataset = open_dataset(root, split, size)
    labels = torch.tensor([r.label for r in dataset.records])
    return torch.stack([dataset[i]["image"] for i in range(len(dataset))]), labels


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", type=Path, nargs="+", default=[DEFAULT_DATA / "mvtec3d_tire", DEFAULT_DATA / "mtd_magnetic_tile"]
    )
    parser.add_argument("--priors", nargs="+", default=["shared", "position"])
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "map_thresholds.json")
    add_threads_argument(parser)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for root in args.data:
        for prior in args.priors:
            with tempfile.TemporaryDirectory() as tmp:
                detector = train_detector(
                    root, Path(tmp) / "model", cache_dir=args.cache_dir, progress=False, map_prior=prior
                ).detector
            train, _ = _images(root, "train", detector.image_size)
            test, labels = _images(root, "test", detector.image_size)
            with torch.inference_mode():
                in_sample_out = detector.score(train)
                test_maps = detector.score(test).raw_map
            calibration = detector.calibration
            in_sample = fit_calibration(in_sample_out.raw_score, in_sample_out.raw_map, calibration.fpr)
            peaks = test_maps.flatten(1).amax(dim=1)  # maps at S x S, as pred_mask compares them
            normal = labels == 0
            row = {"data": root.name, "map_prior": prior, "fpr": calibration.fpr}
            thresholds = {"out_of_fold": calibration.pixel_threshold, "in_sample": in_sample.pixel_threshold}
            for name, threshold in thresholds.items():
                masked = peaks > threshold
                row[f"pixel_threshold_{name}"] = threshold
                row[f"normal_with_mask_{name}"] = f"{int(masked[normal].sum())} / {int(normal.sum())}"
                row[f"anomalous_with_mask_{name}"] = f"{int(masked[~normal].sum())} / {int((~normal).sum())}"
            rows.append(row)
            print(row, flush=True)
            columns = list(rows[0])
            md = "# Pixel thresholds by map prior: out of fold (calibrated) and in sample\n\n"
            write_results(args.out, {"run": run_info(), "rows": rows}, md + markdown_table(rows, columns) + "\n")


if __name__ == "__main__":
    main()
