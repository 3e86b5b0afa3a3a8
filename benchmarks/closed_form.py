"""Where the default detector's time goes, and what the Gaussian's closed-form inversion saves.

The default detector (``invert-ad train --data CATEGORY``) on the same real test images (256 px):

* eager, per batch size: the scorer's latent by the closed form (``InversionScorer.latents``, one matrix product
  per position) and by the grid's Euler steps (``InversionScorer.invert(..., return_trajectory=True)``, which
  calls the eps at every grid point), on the same features, interleaved, with their largest difference;
* ONNX Runtime, per batch size: the bare backbone (with the standardisation) and the whole scoring path of
  :func:`invert_ad.engines.load_engine`, each traced, converted and run with the engine's own session settings.

Median of ``--rounds`` calls after a warm-up call. Run it on an otherwise idle machine.

Command that produced ``benchmarks/results/closed_form.json``::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/closed_form.py --threads 2
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from invert_ad.engines import load_engine
from invert_ad.export import onnx_bytes, trace_images
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

BATCHES = (1, 8, 32)


class _Backbone(nn.Module):
    """The detector's backbone and standardisation alone, with three outputs like the engines' graph."""

    def __init__(self, detector: Any) -> None:
        super().__init__()
        self.detector, self.extractor = detector, detector.feature_extractor

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        features = self.detector.standardize(self.extractor(images))
        return features.mean(dim=(1, 2, 3)), features[:, 0], features.amax(dim=(1, 2, 3))


def _onnxruntime_backbone(detector: Any, example: torch.Tensor, threads: int) -> Any:
    from invert_ad.engines import RAW_OUTPUT_NAMES, _onnxruntime_run

    program = trace_images(_Backbone(detector), example)
    return _onnxruntime_run(onnx_bytes(program, example, RAW_OUTPUT_NAMES, 18, {}), threads)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--category", type=Path, default=DEFAULT_DATA / "mvtec3d_tire")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "closed_form.json")
    add_threads_argument(parser)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    images = sample_images(args.category, max(BATCHES))
    with tempfile.TemporaryDirectory() as tmp:
        detector = train_detector(args.category, Path(tmp) / "m", cache_dir=args.cache_dir, progress=False).detector
    scorer = detector.scorer
    with torch.inference_mode():
        features = detector.extract(images)
        closed, steps = scorer.latents(features), scorer.invert(features, return_trajectory=True)[0]
    difference = ((closed - steps).abs().max() / steps.abs().max()).item()
    backbone = _onnxruntime_backbone(detector, images[:4], threads)
    engine = load_engine(detector, "onnxruntime", threads=threads, check_images=images[:4])
    rows = []
    for batch in BATCHES:
        f, x = features[:batch], images[:batch]
        parts = {
            "eager latent, closed form": lambda f=f: scorer.latents(f),
            "eager latent, Euler steps": lambda f=f: scorer.invert(f, return_trajectory=True),
            "onnxruntime backbone only": lambda x=x: backbone(x.numpy()),
            "onnxruntime whole detector": lambda x=x: engine(x),
        }
        for part, fn in parts.items():
            with torch.inference_mode():
                ms = 1000 * median_seconds(fn, args.rounds)
            rows.append({"part": part, "batch": batch, "ms_per_image": ms / batch})
    result = {
        "benchmark": "closed_form",
        "run": run_info(),
        "threads": threads,
        "category": args.category.name,
        "grid_call_points": list(scorer.grid.call_points),
        "max_rel_latent_diff_closed_vs_steps": difference,
        "rows": rows,
    }
    md = (
        f"# The default detector's time by part ({args.category.name}, 256 px, {threads} threads)\n\n"
        f"Grid {list(scorer.grid.call_points)} ({scorer.nfe} calls); closed form against the steps: largest latent "
        f"difference {difference:.2g} of the largest latent value.\n\n"
    )
    table = markdown_table(rows, ["part", "batch", "ms_per_image"])
    write_results(args.out, result, md + table + "\n")
    print(md + table)


if __name__ == "__main__":
    main()
