"""Learning curves: image AUROC, pixel AUROC and AU-PRO against training steps, plain DiT-S against its skip forms.

For each category and each denoiser preset, one run of :func:`invert_ad.training.train_denoiser` with a fixed
step budget (so its cosine learning-rate schedule is that of the longest point) is evaluated at the steps of
``--eval-at`` through the trainer's ``on_step`` hook: the EMA model scores the test set with the hybrid score on
the paper grid (calls at 0, 333, 666), its normalisation fitted on the held-out normal images, and
:func:`invert_ad.training.diagnostics.diagnose_denoiser` gives the per-t eps-MSE, latent statistics and verdict
at the same point, so the verdict can be checked against the metrics. Step 0 is the untrained model (zero for
the plain preset, the trivial predictor ``sqrt(1 - ab_t) x_t`` for the skip and EDM presets). The training-free
``gaussian`` default is scored on the same test images as the reference line. Evaluation time is not charged
to training; ``--test-stride`` keeps every k-th test image (the same images for every model) to bound it.

Command that produced the committed results (2-core CPU shared with other jobs, 1 thread)::

    /work/bin/heavy .venv/bin/python benchmarks/learning_curves.py --threads 1 --steps 100 \\
        --eval-at 0 25 50 100 --data ../shared/data/mvtec3d_tire ../shared/data/mtd_magnetic_tile \\
        --test-stride 1 4 --out benchmarks/results/learning_curves.json

(stopped after tire's ``dit-s-skip`` and ``dit-s-edm`` for want of CPU time: a re-run resumes from the JSON.)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDPMScheduler

from invert_ad.models import GaussianDenoiser, create_denoiser
from invert_ad.schedule import alphas_cumprod_of
from invert_ad.scorer import InversionScorer
from invert_ad.training import TrainingConfig, train_denoiser
from invert_ad.training.diagnostics import diagnose_denoiser, judge

from common import (
    DEFAULT_CACHE_DIR,
    RESULTS_DIR,
    CategoryFeatures,
    add_threads_argument,
    evaluate_maps,
    load_category,
    load_results,
    markdown_table,
    parse_args,
    run_info,
    write_results,
)

METRICS = ("image_auroc", "pixel_auroc", "aupro")


def subsample(category: CategoryFeatures, stride: int) -> CategoryFeatures:
    """Every ``stride``-th test image (masks, labels and defect types alike)."""
    if stride == 1:
        return category
    keep = np.arange(0, len(category.labels), stride)
    category.test = category.test[torch.from_numpy(keep)]
    category.labels, category.masks = category.labels[keep], category.masks[keep]
    category.defect_types = [category.defect_types[i] for i in keep]
    return category


def evaluate(model: Any, scheduler: Any, category: CategoryFeatures, gaussian: GaussianDenoiser) -> dict[str, Any]:
    """Hybrid score on the paper grid (fitted on the held-out normals) plus the diagnostics, for one model."""
    start = time.perf_counter()
    scorer = InversionScorer(model, scheduler, timesteps="paper", scoring="hybrid").fit(category.holdout)
    out = scorer.score(category.test, batch_size=64)
    metrics = evaluate_maps(out.raw_score, out.raw_map, category)
    diagnostics = diagnose_denoiser(model, category.holdout, alphas_cumprod_of(scheduler), gaussian=gaussian)
    return {
        **{k: metrics[k] for k in METRICS},
        "status": diagnostics["status"],
        "verdict": diagnostics["verdict"],
        "diagnostics": diagnostics,
        "eval_seconds": round(time.perf_counter() - start, 1),
    }


def run_curve(
    preset: str,
    category: CategoryFeatures,
    gaussian: GaussianDenoiser,
    scheduler: Any,
    training: TrainingConfig,
    eval_at: list[int],
) -> list[dict[str, Any]]:
    """Train ``preset`` once on ``category`` and evaluate its EMA at the steps of ``eval_at`` (0: untrained)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(training.seed)
        model = create_denoiser(preset, category.train.shape[1], tuple(category.train.shape[2:]))
    rows: list[dict[str, Any]] = []
    if 0 in eval_at:
        rows.append(
            {"preset": preset, "step": 0, "train_seconds": 0.0, **evaluate(model.eval(), scheduler, category, gaussian)}
        )
    start, paused_total = time.perf_counter(), 0.0

    def on_step(step: int, ema: torch.nn.Module) -> None:
        nonlocal paused_total
        if step not in eval_at:
            return
        paused = time.perf_counter()
        seconds = round(paused - start - paused_total, 1)
        rows.append(
            {"preset": preset, "step": step, "train_seconds": seconds, **evaluate(ema, scheduler, category, gaussian)}
        )
        print(
            f"{category.name} {preset} step {step}: " + ", ".join(f"{k} {rows[-1][k]:.3f}" for k in METRICS), flush=True
        )
        paused_total += time.perf_counter() - paused

    train_denoiser(
        model.train(), category.train, alphas_cumprod_of(scheduler), training, progress=False, on_step=on_step
    )
    return rows


def curves_markdown(result: dict[str, Any]) -> str:
    """One table per category: a row per (preset, step), the Gaussian reference first."""
    run = result["run"]
    parts = [
        "# Learning curves: DiT-S plain against the trivial-predictor skip and EDM preconditioning\n",
        f"Command: `{run['command']}`  \ncommit `{run['git_commit']}`{' (dirty tree)' * bool(run.get('git_dirty'))}, "
        f"{run['machine']['cpu']}, {run['machine']['torch_threads']} thread(s), load average at start "
        f"{run['machine']['load_average_1_5_15'][0]:.1f} (machine shared with other jobs). One training run per "
        f"preset (batch {result['settings']['training']['batch_size']}, cosine schedule over "
        f"{result['settings']['training']['steps']} steps), its EMA evaluated at the listed steps; hybrid score, "
        "paper grid (calls at 0, 333, 666). eps-MSE columns: the model's at t = 333 and 666, then the fitted "
        "Gaussian's (held-out normal features). `status`: the training verdict at that point.\n",
    ]
    for name, entry in result["categories"].items():
        rows = []
        for row in entry["rows"]:
            mse = row["diagnostics"]["eps_mse"]
            rows.append(
                {
                    **row,
                    "mse333": mse["model"]["333"],
                    "mse666": mse["model"]["666"],
                    "g333": mse["gaussian"]["333"],
                    "g666": mse["gaussian"]["666"],
                    "lstd": row["diagnostics"]["latent"]["model"]["std"],
                    "ratio": row["diagnostics"]["output_scale_ratio"]["model"],
                }
            )
        headers = {
            "preset": "denoiser",
            "step": "step",
            "mse333": "eps-MSE 333",
            "mse666": "eps-MSE 666",
            "g333": "Gaussian 333",
            "g666": "Gaussian 666",
            "lstd": "latent std",
            "ratio": "scale ratio 666",
            "train_seconds": "train s",
        }
        columns = ["preset", "step", *METRICS, "mse333", "mse666", "g333", "g666", "lstd", "ratio", "status"]
        parts.append(
            f"## {name}\n\n{entry['num_test']} test images (stride {entry['test_stride']}).\n\n"
            + markdown_table(rows, columns, headers)
        )
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    """Command line."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--data", nargs="+", type=Path, default=None, help="MVTec-layout category folders")
    parser.add_argument("--presets", nargs="+", default=["dit-s-skip", "dit-s-edm", "dit-s"], help="denoisers")
    parser.add_argument("--steps", type=int, default=100, help="training steps of each run")
    parser.add_argument("--eval-at", nargs="+", type=int, default=[0, 25, 50, 100], help="steps to evaluate at")
    parser.add_argument("--batch-size", type=int, default=32, help="training batch")
    parser.add_argument(
        "--test-stride", nargs="+", type=int, default=[1], help="keep every k-th test image, one k per category"
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "learning_curves.json", help="JSON result file")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help="shared feature cache")
    add_threads_argument(parser)
    args = parse_args(parser, argv)
    strides = args.test_stride * len(args.data) if len(args.test_stride) == 1 else args.test_stride
    if len(strides) != len(args.data):
        parser.error(f"--test-stride takes one value or one per category ({len(args.data)})")
    training = TrainingConfig(steps=args.steps, minutes=None, batch_size=args.batch_size, checkpoint_every=10**9)
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", clip_sample=False
    )
    previous = load_results(args.out) or {}
    for entry in previous.get("categories", {}).values():  # verdicts of earlier rows by the current rule
        for row in entry["rows"]:
            row["diagnostics"].setdefault("trained", row["preset"] != "gaussian")
            row["diagnostics"].update(judge(row["diagnostics"]))
            row["status"], row["verdict"] = row["diagnostics"]["status"], row["diagnostics"]["verdict"]
    result: dict[str, Any] = {
        "benchmark": "learning_curves",
        "run": previous.get("run") or run_info(),  # the run that measured the rows; a resumed one is "last_run"
        "last_run": run_info(),
        "settings": {
            "presets": args.presets,
            "eval_at": args.eval_at,
            "training": training.to_dict(),
            "scoring": "hybrid, paper grid, normalisation fitted on the held-out normal images",
            "metric_mode": "exact",
        },
        "categories": previous.get("categories", {}),
    }

    def save() -> None:
        write_results(args.out, result, curves_markdown(result))

    for root, stride in zip(args.data, strides, strict=True):
        category = subsample(load_category(root, args.cache_dir, progress=False), stride)
        entry = result["categories"].setdefault(
            category.name, {"test_stride": stride, "num_test": len(category.labels), "rows": []}
        )
        gaussian = GaussianDenoiser.fit(category.train)
        if not any(r["preset"] == "gaussian" for r in entry["rows"]):
            entry["rows"].append({"preset": "gaussian", "step": 0, **evaluate(gaussian, scheduler, category, gaussian)})
            save()
        for preset in args.presets:
            if any(r["preset"] == preset for r in entry["rows"]):
                print(f"skip {category.name} / {preset}: already in {args.out}")
                continue
            rows = run_curve(preset, category, gaussian, scheduler, training, args.eval_at)
            entry["rows"].extend(rows)
            save()
    save()
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
