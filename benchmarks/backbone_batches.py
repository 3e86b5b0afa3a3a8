"""Why the eager CPU backbone runs in calls of a few images: time per image of EfficientNet-Lite0 by call size.

The same 32 real test images (256 px) go through the bare backbone in calls of 1, 2, 4, 8, 16 and 32 images
(median of ``--rounds`` passes over all 32, after a warm-up pass), then through the default detector's
``score`` at batch 32 with ``backbone_batch_size=None`` (one 32-image call) and ``"auto"``
(``CPU_BACKBONE_BATCH``-image calls), interleaved. Run it on an otherwise idle machine.

Command that produced ``benchmarks/results/backbone_batches.json``::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/backbone_batches.py --threads 2
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from invert_ad.defaults import CPU_BACKBONE_BATCH
from invert_ad.features import create_feature_extractor
from invert_ad.training.train import train_detector
from speed import sample_images

from common import (
    DEFAULT_CACHE_DIR,
    DEFAULT_DATA,
    RESULTS_DIR,
    add_threads_argument,
    markdown_table,
    median_seconds,
    run_info,
    write_results,
)

CALL_SIZES = (1, 2, 4, 8, 16, 32)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--category", type=Path, default=DEFAULT_DATA / "mvtec3d_tire")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "backbone_batches.json")
    add_threads_argument(parser)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    images = sample_images(args.category, 32)
    extractor = create_feature_extractor("efficientnet_lite0").eval()
    rows = []
    with torch.inference_mode():
        for size in CALL_SIZES:
            seconds = median_seconds(lambda s=size: [extractor(c) for c in images.split(s)], args.rounds)
            rows.append({"part": "backbone", "call_size": size, "ms_per_image": 1000 * seconds / len(images)})
    with tempfile.TemporaryDirectory() as tmp:
        detector = train_detector(args.category, Path(tmp) / "m", cache_dir=args.cache_dir, progress=False).detector
    for setting in (None, "auto"):
        detector.optimize(backbone_batch_size=setting)
        seconds = median_seconds(lambda: detector.score(images, batch_size=32), args.rounds)
        size = CPU_BACKBONE_BATCH if setting == "auto" else len(images)
        rows.append(
            {
                "part": f"detector.score, backbone_batch_size={setting}",
                "call_size": size,
                "ms_per_image": 1000 * seconds / len(images),
            }
        )
    result = {"benchmark": "backbone_batches", "run": run_info(), "threads": torch.get_num_threads(), "rows": rows}
    md = "# Eager CPU time per image by backbone call size (32 tire test images, 256 px)\n\n"
    write_results(args.out, result, md + markdown_table(rows, ["part", "call_size", "ms_per_image"]) + "\n")
    print(md + markdown_table(rows, ["part", "call_size", "ms_per_image"]))


if __name__ == "__main__":
    main()
