"""Which statistic should form the anomaly map, and which the image score? An exploration on cached features.

For every category and feature grid (16 x 16: lite0 blocks 1..4 resized to stride 16, today's default;
32 x 32: the same blocks resized to stride 8) this fits, on the training split of
:func:`invert_ad.training.train_detector`, Gaussian priors of three kinds:

* ``position``: one Gaussian per grid position (:class:`~invert_ad.models.GaussianDenoiser`, today's default);
* ``window<k>``: per position, with statistics pooled over a ``k x k`` neighbourhood
  (:func:`~invert_ad.models.shared_gaussian.fit_neighbourhood_gaussian`);
* ``shared``: one Gaussian for all positions (:class:`~invert_ad.models.SharedGaussianDenoiser`);

and reads two statistics from each:

* ``mahalanobis``: the channel norm of the whitened features (no network call): the PaDiM statistic for
  ``position``; image score = the map's maximum;
* ``inversion``: DDIM inversion with the prior's exact eps on the paper grid (3 calls); image score = the hybrid
  (calibrated on the held-out normal images), map = the latent's channel norm.

Then it pairs image scores and maps of different statistics (``image from A, map from B``), and adds sums of
image scores standardised on the held-out normal images. Maps are upsampled bilinearly to 256 px and scored with
the library's exact metrics (:func:`invert_ad.metrics.evaluate_metrics`), masks at 256 px.

Commands that produced ``benchmarks/results/maps_*.json`` (one category per run, both at once on 2 cores)::

    /work/bin/heavy .venv/bin/python benchmarks/maps.py --threads 1 --data ../shared/data/mvtec3d_tire \
        --grids 16 32 --pools 1 3 --priors position window3 shared --out benchmarks/results/maps_mvtec3d_tire.json
    /work/bin/heavy .venv/bin/python benchmarks/maps.py --threads 1 --data ../shared/data/mtd_magnetic_tile \
        --grids 16 32 --pools 1 3 --priors position window3 shared \
        --out benchmarks/results/maps_mtd_magnetic_tile.json
    /work/bin/heavy .venv/bin/python benchmarks/maps.py --threads 1 --grids 16 --priors --image-grids 1 2 3 4 5 \
        paper official quad:2 quad:3 quad:4 quad:5 cube:3 cube:4 cube:5 exp:2 exp:3 exp:4 exp:5 \
        --out benchmarks/results/maps_image_grids.json
    /work/bin/heavy .venv/bin/python benchmarks/maps.py --threads 1 --grids 16 --priors position shared \
        --heldout-nll --timing --out benchmarks/results/maps_timing.json

A window-5 prior was measured too at 16 x 16 (``--priors position window3 window5 shared``): it sits between
window 3 and shared (within 0.001) on every metric (``maps_window5_*16.md``, an earlier run of this script
without the map sums).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDPMScheduler

from invert_ad.metrics import evaluate_metrics
from invert_ad.models import GaussianDenoiser
from invert_ad.models.shared_gaussian import SharedGaussianDenoiser, fit_neighbourhood_gaussian, whiten
from invert_ad.scorer import InversionScorer
from invert_ad.scoring import norm_map
from invert_ad.scoring.feature_maps import local_average

from common import (
    DEFAULT_CACHE_DIR,
    RESULTS_DIR,
    CategoryFeatures,
    add_threads_argument,
    evaluate_maps,
    load_category,
    markdown_table,
    parse_args,
    run_info,
    write_results,
)

IMAGE_KEYS = ("image_auroc", "image_ap", "image_f1max")
PIXEL_KEYS = ("pixel_auroc", "pixel_ap", "pixel_f1max", "aupro")


def fit_prior(kind: str, train: torch.Tensor) -> torch.nn.Module:
    """``position``, ``shared`` or ``window<k>`` Gaussian prior fitted on ``train`` ``(N, C, h, w)``."""
    if kind == "position":
        return GaussianDenoiser.fit(train)
    if kind == "shared":
        return SharedGaussianDenoiser.fit(train)
    if kind.startswith("window"):
        return fit_neighbourhood_gaussian(train, int(kind.removeprefix("window")))
    raise ValueError(f"unknown prior {kind!r}")


def pooled(category: CategoryFeatures, kernel: int) -> CategoryFeatures:
    """PatchCore's neighbourhood aggregation (:func:`~invert_ad.scoring.feature_maps.local_average`) applied to
    the training, held-out and test features."""
    return dataclasses.replace(
        category,
        train=local_average(category.train, kernel),
        holdout=local_average(category.holdout, kernel),
        test=local_average(category.test, kernel),
    )


def standardised(score: torch.Tensor, holdout: torch.Tensor) -> torch.Tensor:
    """``score`` z-scored with the mean and standard deviation of the held-out normal images' scores."""
    return (score - holdout.mean()) / holdout.std().clamp_min(1e-12)


def explore(
    category: CategoryFeatures, grid: str, priors: list[str], combine: list[str], map_combine: list[str]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows (metrics and timings) of every statistic and pairing on one category and grid."""
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", clip_sample=False
    )
    images: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}  # name -> (test, holdout scores, calls)
    maps: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name -> (test, holdout maps)
    seconds: dict[str, float] = {}
    for kind in priors:
        start = time.perf_counter()
        prior = fit_prior(kind, category.train)
        seconds[f"fit {kind}"] = time.perf_counter() - start

        start = time.perf_counter()
        test_map = norm_map(whiten(prior, category.test))
        holdout_map = norm_map(whiten(prior, category.holdout))
        seconds[f"{kind}/mahalanobis"] = time.perf_counter() - start
        maps[f"{kind}/mahalanobis"] = (test_map, holdout_map)
        images[f"{kind}/mahalanobis max"] = (test_map.flatten(1).amax(1), holdout_map.flatten(1).amax(1), 0)

        start = time.perf_counter()
        scorer = InversionScorer(prior, scheduler, timesteps="paper", scoring="hybrid").fit(category.holdout)
        out = scorer.score(category.test, batch_size=64)
        held = scorer.score(category.holdout, batch_size=64)
        seconds[f"{kind}/inversion"] = time.perf_counter() - start
        maps[f"{kind}/inversion"] = (out.raw_map, held.raw_map)
        images[f"{kind}/inversion hybrid"] = (out.raw_score, held.raw_score, scorer.nfe)
        images[f"{kind}/inversion max"] = (out.raw_map.flatten(1).amax(1), held.raw_map.flatten(1).amax(1), 3)
        del prior, scorer

    for spec in map_combine:  # "a+b": sum of maps standardised with the held-out maps' pixel values
        parts = spec.split("+")
        if all(p in maps for p in parts):
            test = sum(standardised(maps[p][0].double(), maps[p][1].double()).float() for p in parts)
            held = sum(standardised(maps[p][1].double(), maps[p][1].double()).float() for p in parts)
            maps[spec] = (test, held)
            images[f"{spec} max"] = (test.flatten(1).amax(1), held.flatten(1).amax(1), 3)
    for spec in combine:  # "a+b": sum of standardised image scores
        parts = spec.split("+")
        if not all(p in images for p in parts):
            continue
        test = sum(standardised(images[p][0].double(), images[p][1].double()) for p in parts)
        held = sum(standardised(images[p][1].double(), images[p][1].double()) for p in parts)
        images[spec] = (test, held, max(images[p][2] for p in parts))

    labels = category.labels
    image_metrics = {name: evaluate_metrics(score.double().numpy(), labels) for name, (score, _, _) in images.items()}
    pixel_metrics = {}
    for name, (grid_maps, _) in maps.items():
        values = evaluate_maps(torch.zeros(len(labels)), grid_maps, category)
        pixel_metrics[name] = {k: values[k] for k in PIXEL_KEYS}

    rows = []
    for image_name, (_, _, calls) in images.items():
        for map_name in maps:
            metrics = {**{k: image_metrics[image_name][k] for k in IMAGE_KEYS}, **pixel_metrics[map_name]}
            rows.append(
                {
                    "category": category.name,
                    "grid": grid,
                    "image score": image_name,
                    "map": map_name,
                    "calls": calls,
                    **metrics,
                }
            )
    timing = {"category": category.name, "grid": grid, **{k: round(v, 2) for k, v in seconds.items()}}
    return rows, timing


def image_grid_sweep(category: CategoryFeatures, grids: list[str]) -> list[dict[str, Any]]:
    """Image AUROC of the per-position Gaussian's hybrid for each inversion grid (the map is left to a map
    statistic, so the grid only has to serve detection)."""
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", clip_sample=False
    )
    prior = GaussianDenoiser.fit(category.train)
    rows = []
    for spec in grids:
        start = time.perf_counter()
        scorer = InversionScorer(prior, scheduler, timesteps=spec, scoring="hybrid").fit(category.holdout)
        out = scorer.score(category.test, batch_size=64)
        metrics = evaluate_metrics(out.raw_score.double().numpy(), category.labels)
        rows.append(
            {
                "category": category.name,
                "timesteps": spec,
                "calls": scorer.nfe,
                **{k: metrics[k] for k in IMAGE_KEYS},
                "seconds": round(time.perf_counter() - start, 2),
            }
        )
    return rows


def heldout_nll(category: CategoryFeatures, priors: list[str]) -> list[dict[str, Any]]:
    """Mean Gaussian NLL (nats per position vector, without the ``C/2 log 2 pi`` constant) of the held-out normal
    features under each prior: a normal-images-only criterion one might hope picks the map prior."""
    rows = []
    for kind in priors:
        prior = fit_prior(kind, category.train)
        z = whiten(prior, category.holdout)
        log_det = prior.eigenvalues.log().sum(-1).reshape(1, -1)  # (1, P) or (1, 1)
        nll = 0.5 * (z.square().sum(1).flatten(1) + log_det).mean()
        rows.append({"category": category.name, "prior": kind, "heldout_nll": float(nll)})
    return rows


PRESETS: dict[str, dict[str, Any]] = {
    "today (gaussian, paper grid, latent map)": {"grid": 16, "timesteps": "paper", "map": None},
    "gaussian, exp:3, shared map": {"grid": 16, "timesteps": "exp:3", "map": ("shared", 1)},
    "gaussian, 1 call, shared map": {"grid": 16, "timesteps": 1, "map": ("shared", 1)},
    "32x32 gaussian, exp:3, shared map pool 3": {"grid": 32, "timesteps": "exp:3", "map": ("shared", 3)},
}
"""Detector presets timed end to end by :func:`time_presets`."""


def time_presets(root: Path, cache_dir: Path, num_images: int = 32, batch_size: int = 16) -> list[dict[str, Any]]:
    """Milliseconds per image of :meth:`AnomalyDetector.score` (backbone + standardisation + inversion + maps,
    images already decoded) for each of :data:`PRESETS`, best of three passes over ``num_images`` test images."""
    from invert_ad.data import MVTecDataset, collate_samples
    from invert_ad.detector import AnomalyDetector
    from invert_ad.features import create_feature_extractor
    from invert_ad.scoring import MahalanobisMap

    test = MVTecDataset(root, "test", 256)
    images = collate_samples([test[i] for i in range(min(num_images, len(test)))])["image"]
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", clip_sample=False
    )
    rows = []
    for name, preset in PRESETS.items():
        category = load_category(root, cache_dir, grid=preset["grid"], progress=False)
        prior = GaussianDenoiser.fit(category.train)
        statistic = None
        if preset["map"] is not None:
            statistic = MahalanobisMap.fit(category.train, prior=preset["map"][0], pool=preset["map"][1])
        scorer = InversionScorer(prior, scheduler, timesteps=preset["timesteps"], map_statistic=statistic)
        scorer.fit(category.holdout)
        extractor = create_feature_extractor("efficientnet_lite0", grid=preset["grid"])
        detector = AnomalyDetector(extractor, scorer, feature_mean=category.mean, feature_std=category.std)
        passes = []
        for _ in range(3):
            start = time.perf_counter()
            for chunk in images.split(batch_size):
                detector.score(chunk)
            passes.append(time.perf_counter() - start)
        rows.append(
            {
                "category": root.name,
                "preset": name,
                "calls": scorer.nfe,
                "ms_per_image": round(1000 * min(passes) / len(images), 1),
                "threads": torch.get_num_threads(),
            }
        )
    return rows


def markdown(result: dict[str, Any]) -> str:
    """The report: one table per category and grid."""
    lines = [
        "# Map and image statistics on cached lite0 features",
        "",
        f"Command: `{result['run']['command']}`  ",
        f"commit `{result['run']['git_commit']}`, {result['run']['machine']['torch_threads']} thread(s).",
        "",
        "Every image score is paired with every map; I-AUROC depends on the image score only, P-AUROC and",
        "AU-PRO on the map only. `+` sums image scores z-scored on the held-out normal images.",
        "",
    ]
    for key in sorted({(r["category"], r["grid"]) for r in result["rows"]}):
        rows = [r for r in result["rows"] if (r["category"], r["grid"]) == key]
        lines += [f"## {key[0]}, grid {key[1]}", ""]
        maps = sorted({r["map"] for r in rows})
        lines += [
            "Maps:",
            "",
            markdown_table([_first(rows, m) for m in maps], ["map", "pixel_auroc", "aupro", "pixel_ap"]),
        ]
        scores = sorted({r["image score"] for r in rows})
        lines += [
            "Image scores:",
            "",
            markdown_table(
                [_first(rows, None, s) for s in scores], ["image score", "calls", "image_auroc", "image_ap"]
            ),
        ]
    if result.get("image_grids"):
        lines += [
            "## Image score only: per-position Gaussian hybrid by inversion grid",
            "",
            markdown_table(result["image_grids"], ["category", "timesteps", "calls", "image_auroc", "image_ap"]),
        ]
    if result.get("heldout_nll"):
        lines += [
            "## Held-out normal NLL per position vector under each prior (nats, lower = better fit)",
            "",
            markdown_table(result["heldout_nll"], ["category", "prior", "heldout_nll"]),
        ]
    if result.get("timing"):
        lines += [
            "## End-to-end time per image (decoded images, batch 16, best of 3)",
            "",
            markdown_table(result["timing"], ["category", "preset", "calls", "ms_per_image", "threads"]),
        ]
    lines += ["## Seconds (fit, score test + held-out)", ""]
    for timing in result["timings"]:
        lines.append(
            f"- {timing['category']} {timing['grid']}: "
            + ", ".join(f"{k} {v}" for k, v in timing.items() if k not in ("category", "grid"))
        )
    return "\n".join(lines) + "\n"


def _first(rows: list[dict[str, Any]], map_name: str | None, score: str | None = None) -> dict[str, Any]:
    for r in rows:
        if (map_name is None or r["map"] == map_name) and (score is None or r["image score"] == score):
            return r
    raise KeyError(map_name or score)


def main(argv: list[str] | None = None) -> None:
    """Command line: explore every category and grid given."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", nargs="+", type=Path, default=None, help="MVTec-layout category folders")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "maps.json", help="JSON result file")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help="shared feature cache")
    parser.add_argument("--grids", nargs="+", type=int, default=[16, 32], help="feature grid sides")
    parser.add_argument(
        "--pools", nargs="+", type=int, default=[1], help="local averaging windows of the features (1: none)"
    )
    parser.add_argument(
        "--priors", nargs="*", default=["position", "window3", "window5", "shared"], help="Gaussian priors"
    )
    parser.add_argument(
        "--combine",
        nargs="*",
        default=[
            "position/inversion hybrid+shared/mahalanobis max",
            "position/inversion hybrid+position/mahalanobis max",
            "position/mahalanobis max+shared/mahalanobis max",
        ],
        help="sums of standardised image scores",
    )
    parser.add_argument(
        "--map-combine",
        nargs="*",
        default=["position/inversion+shared/mahalanobis", "position/mahalanobis+shared/mahalanobis"],
        help="sums of maps standardised on the held-out maps",
    )
    parser.add_argument(
        "--image-grids",
        nargs="*",
        default=[],
        help="inversion grids for the per-position hybrid image score on the first --grids grid (e.g. exp:3 1)",
    )
    parser.add_argument("--timing", action="store_true", help="time the detector presets end to end")
    parser.add_argument("--heldout-nll", action="store_true", help="held-out NLL of each --priors prior")
    add_threads_argument(parser)
    args = parse_args(parser, argv)
    result: dict[str, Any] = {
        "benchmark": "maps",
        "run": run_info(),
        "settings": {k: [str(x) for x in v] if isinstance(v, list) else str(v) for k, v in vars(args).items()},
        "rows": [],
        "timings": [],
        "categories": [],
    }
    for root in args.data if args.heldout_nll else []:
        loaded = load_category(root, args.cache_dir, grid=args.grids[0], progress=False)
        result.setdefault("heldout_nll", []).extend(heldout_nll(loaded, args.priors))
        write_results(args.out, result, markdown(result))
    for root in args.data if args.timing else []:
        result.setdefault("timing", []).extend(time_presets(root, args.cache_dir))
        write_results(args.out, result, markdown(result))
    for root in args.data if args.image_grids else []:
        loaded = load_category(root, args.cache_dir, grid=args.grids[0], progress=False)
        specs = [int(g) if g.isdigit() else g for g in args.image_grids]
        result.setdefault("image_grids", []).extend(image_grid_sweep(loaded, specs))
        write_results(args.out, result, markdown(result))
    explore_grids = args.grids if args.priors and not args.heldout_nll else []
    for grid in explore_grids:
        for root in args.data:
            loaded = load_category(root, args.cache_dir, grid=grid, progress=False)
            result["categories"].append({**loaded.summary(), "grid": grid})
            for kernel in args.pools:
                label = f"{grid}" if kernel == 1 else f"{grid}, pool {kernel}"
                rows, timing = explore(pooled(loaded, kernel), label, args.priors, args.combine, args.map_combine)
                result["rows"] += rows
                result["timings"].append(timing)
                write_results(args.out, result, markdown(result))
                print(markdown(result).split("## Seconds")[0][-2500:], flush=True)
            del loaded
    print(np.array([len(result["rows"])]))


if __name__ == "__main__":
    main()
