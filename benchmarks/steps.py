"""Inversion steps S and grid spacings g(u): does NLL's reverse scoring appear, does the hybrid stay stable?

InvAD's table 4 reports that with a learned DiT the NLL of the inverted latent stops ranking anomalies first as S
grows (96.9 image AUROC at S = 3, 59.5 at S = 1000) while norm-based scores stay at 96-98; table 13 compares
the spacings g(u) (uniform, quad, cube, exp). This script measures both on ONE denoiser per category (trained,
or loaded from ``--runs-dir`` when :mod:`accuracy` trained it with the same budget): for every S the inverted
latents are computed once and scored by NLL, max-min, hybrid and max norm (hybrid normalisation fitted on the
held-out normal images).

The issue's S = 1000 is run as S = 999: with points ``round(k (T - 1) / S)`` on a T = 1000 schedule, 999 steps
already visit every timestep (the official code's extra call to alpha-bar 0 is the ``official`` grid, not this
sweep). Cost: S = 999 means 999 network calls per image. Steps above ``--full-max`` are run on a seeded random subset of
the test images (``--subset`` of them, and ``--subset-holdout`` held-out images for the hybrid's calibration);
the subset table repeats every S on that subset, so its rows compare with each other (not with the full-set
table).

Commands that produced the committed results (2-core CPU shared with other jobs)::

    .venv/bin/python benchmarks/steps.py --config gaussian --threads 1 --out benchmarks/results/steps_gaussian.json
    .venv/bin/python benchmarks/steps.py --config residual-mlp-256x2 --minutes 8 --threads 1 --full-max 100 \\
        --subset 128 --subset-holdout 40 --out benchmarks/results/steps_residual_mlp.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDPMScheduler
from tqdm.auto import tqdm

from invert_ad.scorer import InversionScorer
from invert_ad.scoring import HybridScorer, MaxMinScorer, MaxNormScorer, NLLScorer
from invert_ad.training import TrainingConfig

from accuracy import train_or_load
from common import (
    DEFAULT_CACHE_DIR,
    DEFAULT_RUNS_DIR,
    DENOISER_CONFIGS,
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

SCORERS = {"nll": NLLScorer, "maxmin": MaxMinScorer, "hybrid": HybridScorer, "max": MaxNormScorer}


def subset(category: CategoryFeatures, size: int, holdout_size: int, seed: int = 0) -> CategoryFeatures:
    """A seeded random subset of the test images (both classes kept) and of the held-out normal images."""
    generator = torch.Generator().manual_seed(seed)
    n = len(category.labels)
    order = torch.randperm(n, generator=generator).numpy()
    pick = np.sort(order[: min(size, n)])
    if len(set(category.labels[pick])) < 2:  # make sure both classes are present
        normal = np.flatnonzero(category.labels == 0)[:1]
        pick = np.sort(np.unique(np.concatenate([pick[:-1], normal])))
    holdout = torch.randperm(len(category.holdout), generator=generator)[: min(holdout_size, len(category.holdout))]
    return CategoryFeatures(
        name=category.name,
        root=category.root,
        train=category.train,
        holdout=category.holdout[holdout.sort().values],
        test=category.test[torch.from_numpy(pick)],
        labels=category.labels[pick],
        masks=category.masks[pick],
        defect_types=[category.defect_types[i] for i in pick],
        mean=category.mean,
        std=category.std,
        image_size=category.image_size,
        info={**category.info, "subset_of_test": len(pick), "subset_of_holdout": len(holdout), "subset_seed": seed},
    )


def score_grid(
    denoiser: torch.nn.Module, scheduler: Any, category: CategoryFeatures, timesteps: Any, batch_size: int = 64
) -> list[dict[str, Any]]:
    """Invert the test and held-out features along one grid; one row per scorer."""
    inverter = InversionScorer(denoiser, scheduler, timesteps=timesteps, scoring="hybrid")
    start = time.perf_counter()
    test_latents = inverter.latents(category.test, batch_size)
    seconds = time.perf_counter() - start
    holdout_latents = inverter.latents(category.holdout, batch_size)
    normal = torch.from_numpy(category.labels == 0)
    rows = []
    for name, cls in SCORERS.items():
        scorer = cls()
        if scorer.requires_fit:
            scorer.fit(holdout_latents)
        out = scorer.score(test_latents)
        rows.append(
            {
                "category": category.name,
                "scoring": name,
                "nfe": inverter.nfe,
                "points": list(inverter.grid.points),
                **evaluate_maps(out.raw_score, out.raw_map, category),
                "latent_std_test_normal": float(test_latents[normal].std()),
                "latent_std_test_anomalous": float(test_latents[~normal].std()),
                "seconds_per_image": round(seconds / len(category.test), 5),
            }
        )
    return rows


def _pivot(rows: list[dict[str, Any]], key: str, metric: str) -> list[dict[str, Any]]:
    """One line per ``key`` value, one column per scorer, cells = ``metric``."""
    table: dict[Any, dict[str, Any]] = {}
    for row in rows:
        line = table.setdefault(row[key], {key: row[key], "std": row["latent_std_test_normal"]})
        line[row["scoring"]] = row[metric]
    return list(table.values())


def steps_markdown(result: dict[str, Any]) -> str:
    """Pivot tables: image AUROC and AU-PRO by S (and by spacing) for NLL / max-min / hybrid / max."""
    run = result["run"]
    parts = [
        f"# Inversion steps and spacings ({result['settings']['config']})\n",
        f"Command: `{run['command']}`  \ncommit `{run['git_commit']}`, {run['machine']['cpu']}, "
        f"{run['machine']['torch_threads']} threads, machine shared with other jobs. `std` = standard deviation of "
        "the inverted latents of the normal test images (1 for a perfect model at the end of the schedule).\n",
    ]
    columns = ["std", *SCORERS]
    for name, entry in result["categories"].items():
        for table, label in (("steps_full", "full test set"), ("steps_subset", "subset"), ("spacings", "spacings")):
            rows = entry.get(table) or []
            if not rows:
                continue
            key = "label" if table == "spacings" else "nfe"
            where = label
            if table == "steps_subset":
                info = entry.get("subset_info", {})
                where = f"subset of {info.get('subset_of_test')} test / {info.get('subset_of_holdout')} held-out images"
            for metric, title in (("image_auroc", "image AUROC"), ("aupro", "AU-PRO")):
                parts.append(
                    f"## {name}: {title} by {'spacing' if table == 'spacings' else 'S'} ({where})\n\n"
                    + markdown_table(_pivot(rows, key, metric), [key, *columns], {"nfe": "S", "label": "grid"})
                )
    return "\n".join(parts)


def save_plot(result: dict[str, Any], path: Path) -> Path | None:
    """Image AUROC and AU-PRO against S (log scale) for every scorer and category, as a PNG (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    categories = list(result["categories"].items())
    fig, axes = plt.subplots(2, len(categories), figsize=(5 * len(categories), 7), squeeze=False)
    for column, (name, entry) in enumerate(categories):
        for row_index, metric in enumerate(("image_auroc", "aupro")):
            ax = axes[row_index][column]
            for table, style in (("steps_full", "-o"), ("steps_subset", ":x")):
                rows = entry.get(table) or []
                for colour, scoring in enumerate(SCORERS):
                    points = sorted((r["nfe"], r[metric]) for r in rows if r["scoring"] == scoring)
                    if points:
                        label = f"{scoring} ({'full' if table == 'steps_full' else 'subset'})"
                        ax.plot(*zip(*points, strict=True), style, color=f"C{colour}", label=label, markersize=4)
            ax.set_xscale("log")
            ax.set_xlabel("inversion steps S (network calls)")
            ax.set_ylabel("image AUROC" if metric == "image_auroc" else "AU-PRO")
            ax.set_title(f"{name} ({result['settings']['config']})")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    """Command line."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--data", nargs="+", type=Path, default=None, help="MVTec-layout category folders")
    parser.add_argument("--config", default="gaussian", choices=sorted(DENOISER_CONFIGS), help="denoiser config")
    parser.add_argument("--minutes", type=float, default=8.0, help="training budget (if the model is not saved yet)")
    parser.add_argument("--steps-list", nargs="+", type=int, default=[1, 2, 3, 5, 10, 50, 100, 999])
    parser.add_argument("--spacings", nargs="+", default=["uniform", "quad", "cube", "exp"])
    parser.add_argument("--spacing-steps", nargs="+", type=int, default=[3, 10])
    parser.add_argument("--full-max", type=int, default=1000, help="largest S run on the whole test set")
    parser.add_argument("--subset", type=int, default=64, help="test images for S > --full-max")
    parser.add_argument("--subset-holdout", type=int, default=24, help="held-out images for S > --full-max")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "steps.json")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("--runs-dir", type=Path, default=DEFAULT_RUNS_DIR)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--force", action="store_true", help="recompute what the JSON already holds")
    add_threads_argument(parser)
    args = parse_args(parser, argv)
    data = args.data
    previous = None if args.force else load_results(args.out)
    result: dict[str, Any] = {
        "benchmark": "steps",
        "run": run_info(),
        "settings": {k: v if isinstance(v, (int, float, list)) else str(v) for k, v in vars(args).items()},
        "categories": (previous or {}).get("categories", {}),
    }
    result["settings"]["data"] = [str(d) for d in data]
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", clip_sample=False
    )
    config = DENOISER_CONFIGS[args.config]
    training = TrainingConfig(minutes=args.minutes)

    def save() -> None:
        write_results(args.out, result, steps_markdown(result))

    for root in data:
        category = load_category(root, args.cache_dir)
        entry = result["categories"].setdefault(category.name, {"summary": category.summary()})
        detector, info = train_or_load(category, config, training, args.runs_dir, args.cache_dir, retrain=False)
        entry["train"] = info
        denoiser = detector.scorer.denoiser.eval()
        small = subset(category, args.subset, args.subset_holdout)
        entry["subset_info"] = small.info
        jobs: list[tuple[str, Any, Any, CategoryFeatures]] = []
        for s in args.steps_list:
            if s <= args.full_max:
                jobs.append(("steps_full", s, s, category))
            if any(t > args.full_max for t in args.steps_list):
                jobs.append(("steps_subset", s, s, small))
        jobs += [("spacings", f"{g}:{s}", f"{g}, S={s}", category) for s in args.spacing_steps for g in args.spacings]
        for table, spec, label, features in tqdm(jobs, desc=f"steps {category.name}", unit="grid"):
            done = entry.setdefault(table, [])
            if any(r["label"] == label for r in done):
                continue
            rows = score_grid(denoiser, scheduler, features, spec, args.batch_size)
            done += [{**r, "label": label, "timesteps": spec} for r in rows]
            save()
    plot = save_plot(result, args.out.with_suffix(".png"))
    if plot is not None:
        result["plot"] = plot.name
    save()
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
