"""What a user would pick instead of a diffusion model, on the SAME standardised backbone features.

* PatchCore-style: every test patch feature's Euclidean distance to its nearest neighbour in a memory bank of
  training patch features (optionally a greedy k-center coreset of it); image score = the largest patch
  distance; anomaly map = the patch distances, upsampled bilinearly like every map in these benchmarks.
* PaDiM-style: a Gaussian per grid position (mean and Ledoit-Wolf or ``+ eps I`` regularised covariance);
  anomaly map = the Mahalanobis distance of each test patch; image score = its maximum.

Neither applies the Gaussian blur of the original papers, so the maps are post-processed exactly as the
inversion maps are (bilinear upsampling, no smoothing). Both are fitted on the training part of the split
used by :func:`invert_ad.training.train_detector` (the held-out normal images are left out, as they are for
the denoisers). They live here, not in the library.

Command that produced ``benchmarks/results/baselines.json``::

    .venv/bin/python benchmarks/baselines.py --out benchmarks/results/baselines.json

(``--data`` defaults to every category of ``../shared/data``.)
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from invert_ad.metrics import METRIC_KEYS
from invert_ad.models.gaussian import ledoit_wolf

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

__all__ = [
    "BaselineOutput",
    "greedy_coreset",
    "nearest_distances",
    "padim",
    "patchcore",
    "run_baselines",
]


@dataclass
class BaselineOutput:
    """Scores of one baseline on a test set.

    Attributes:
        name: the row name in tables.
        image_scores: ``(N,)`` higher is more anomalous.
        maps: ``(N, h, w)`` on the feature grid.
        fit_seconds: time to build the memory bank or the Gaussians.
        score_seconds: time to score the test set.
        settings: the baseline's arguments.
    """

    name: str
    image_scores: torch.Tensor
    maps: torch.Tensor
    fit_seconds: float
    score_seconds: float
    settings: dict[str, Any] = field(default_factory=dict)


def _patches(features: torch.Tensor) -> torch.Tensor:
    """``(N, C, h, w) -> (N * h * w, C)``, image-major, positions row-major."""
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1]).contiguous()


def greedy_coreset(
    points: torch.Tensor, size: int, projection_dim: int | None = 128, seed: int = 0, progress: bool = False
) -> torch.Tensor:
    """Indices of a greedy k-center coreset (each new point is the one farthest from those chosen).

    Distances are computed after a random Gaussian projection to ``projection_dim`` dimensions (keeps
    distances approximately, Johnson-Lindenstrauss), as PatchCore does to make the selection affordable.

    Args:
        points: ``(M, C)``.
        size: how many points to keep (``<= M``).
        projection_dim: dimensions of the random projection; ``None`` or ``>= C`` uses the points as they are.
        seed: seeds the projection and the first point.
        progress: show a progress bar.

    Returns:
        ``(size,)`` int64 indices into ``points``.
    """
    m, c = points.shape
    if not 0 < size <= m:
        raise ValueError(f"coreset size must lie in [1, {m}], got {size}")
    generator = torch.Generator().manual_seed(seed)
    x = points.float()
    if projection_dim is not None and projection_dim < c:
        projection = torch.randn(c, projection_dim, generator=generator) / projection_dim**0.5
        x = x @ projection
    squared_norms = x.square().sum(1)
    chosen = torch.empty(size, dtype=torch.long)
    chosen[0] = torch.randint(m, (1,), generator=generator)

    def squared_distances(i: torch.Tensor) -> torch.Tensor:  # ||x - x_i||^2 as one matrix-vector product
        return (squared_norms - 2.0 * (x @ x[i]) + squared_norms[i]).clamp_min(0)

    min_distance = squared_distances(chosen[0])
    for i in tqdm(range(1, size), desc="coreset", disable=not progress, unit="pt", mininterval=2.0):
        chosen[i] = torch.argmax(min_distance)
        torch.minimum(min_distance, squared_distances(chosen[i]), out=min_distance)
    return chosen


def nearest_distances(queries: torch.Tensor, bank: torch.Tensor, chunk_size: int = 4096) -> torch.Tensor:
    """Euclidean distance of each query to its nearest bank row, ``(Q, C), (M, C) -> (Q,)``, in chunks.

    Uses ``||q||^2 - 2 q.b + ||b||^2`` in float32 (clamped at zero) for speed.
    """
    bank = bank.float()
    bank_sq = bank.square().sum(1)
    out = torch.empty(queries.shape[0])
    for start in range(0, queries.shape[0], chunk_size):
        q = queries[start : start + chunk_size].float()
        d2 = q.square().sum(1, keepdim=True) - 2.0 * q @ bank.T + bank_sq
        out[start : start + chunk_size] = d2.amin(dim=1).clamp_min(0).sqrt()
    return out


def patchcore(
    train: torch.Tensor,
    test: torch.Tensor,
    coreset_ratio: float = 0.01,
    projection_dim: int | None = 128,
    seed: int = 0,
    progress: bool = False,
) -> BaselineOutput:
    """PatchCore-style nearest-neighbour scoring.

    Args:
        train: ``(N, C, h, w)`` training features (normal images only).
        test: ``(B, C, h, w)`` features to score.
        coreset_ratio: share of the training patches kept by the greedy coreset (1.0: the whole bank).
        projection_dim: random projection used only for the coreset selection.
        seed: coreset seed.
        progress: progress bars.

    Returns:
        A :class:`BaselineOutput`: image score = max patch distance, map = patch distances.
    """
    start = time.perf_counter()
    bank = _patches(train)
    if coreset_ratio < 1.0:
        size = max(1, round(coreset_ratio * bank.shape[0]))
        bank = bank[greedy_coreset(bank, size, projection_dim, seed, progress)]
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    b, _, h, w = test.shape
    maps = nearest_distances(_patches(test), bank).reshape(b, h, w)
    name = "PatchCore-style kNN" + ("" if coreset_ratio >= 1.0 else f" (coreset {coreset_ratio:g})")
    return BaselineOutput(
        name,
        maps.flatten(1).amax(1),
        maps,
        fit_seconds,
        time.perf_counter() - start,
        {"coreset_ratio": coreset_ratio, "projection_dim": projection_dim, "seed": seed, "bank_size": len(bank)},
    )


def _position_precisions(
    train: torch.Tensor, covariance: str, epsilon: float, chunk_size: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position means ``(P, C)`` and precision matrices ``(P, C, C)`` in float64, batched over positions."""
    samples = train.to(torch.float64).flatten(2).permute(2, 0, 1)  # (P, N, C)
    means = samples.mean(dim=1)
    precisions = []
    for chunk in samples.split(chunk_size):
        if covariance == "ledoit_wolf":
            cov = ledoit_wolf(chunk)[0]
        elif covariance == "regularized":
            centred = chunk - chunk.mean(dim=1, keepdim=True)
            cov = centred.mT @ centred / (chunk.shape[1] - 1)
            cov = cov + epsilon * torch.eye(chunk.shape[2], dtype=cov.dtype)
        else:
            raise ValueError(f"covariance must be 'ledoit_wolf' or 'regularized', got {covariance!r}")
        # Cholesky, not LU: the covariances are SPD, and this torch build's multi-threaded batched LU (MKL
        # getrf) fails on them ("Parameter 6 was incorrect on entry to DLASWP").
        precisions.append(torch.cholesky_inverse(torch.linalg.cholesky(cov)))
    return means, torch.cat(precisions)


def padim(
    train: torch.Tensor, test: torch.Tensor, covariance: str = "ledoit_wolf", epsilon: float = 0.01
) -> BaselineOutput:
    """PaDiM-style per-position Gaussian scoring.

    Args:
        train: ``(N, C, h, w)`` training features.
        test: ``(B, C, h, w)`` features to score.
        covariance: ``ledoit_wolf`` (Ledoit-Wolf shrinkage, the estimate of ``sklearn.covariance.LedoitWolf``
            computed batched by :func:`invert_ad.models.gaussian.ledoit_wolf`) or ``regularized`` (unbiased
            sample covariance ``+ epsilon I``, as in the PaDiM paper).
        epsilon: the ridge of ``regularized``.

    Returns:
        A :class:`BaselineOutput`: map = per-position Mahalanobis distance, image score = its maximum.
    """
    start = time.perf_counter()
    means, precisions = _position_precisions(train, covariance, epsilon)
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    b, _, h, w = test.shape
    deviation = test.to(torch.float64).flatten(2).permute(0, 2, 1) - means  # (B, P, C)
    squared = torch.einsum("bpi,pij,bpj->bp", deviation, precisions, deviation).clamp_min(0)
    maps = squared.sqrt().reshape(b, h, w).float()
    label = "Ledoit-Wolf" if covariance == "ledoit_wolf" else f"cov + {epsilon:g} I"
    return BaselineOutput(
        f"PaDiM-style Gaussian ({label})",
        maps.flatten(1).amax(1),
        maps,
        fit_seconds,
        time.perf_counter() - start,
        {"covariance": covariance, "epsilon": epsilon if covariance == "regularized" else None},
    )


def run_baselines(category: CategoryFeatures, which: list[str] | None = None, progress: bool = True) -> list[dict]:
    """Fit and score the baselines on one category; one row (metrics, timings, settings) per baseline.

    Args:
        category: the category's features.
        which: any of ``patchcore`` (coreset 0.01, PatchCore's 1% setting), ``patchcore-full`` (whole bank),
            ``padim`` (Ledoit-Wolf) and ``padim-reg`` (``cov + 0.01 I``); default: all four.
        progress: progress bars.
    """
    which = which or ["patchcore", "patchcore-full", "padim", "padim-reg"]
    runners = {
        "patchcore": lambda: patchcore(category.train, category.test, 0.01, progress=progress),
        "patchcore-full": lambda: patchcore(category.train, category.test, 1.0),
        "padim": lambda: padim(category.train, category.test, "ledoit_wolf"),
        "padim-reg": lambda: padim(category.train, category.test, "regularized", 0.01),
    }
    rows = []
    for key in tqdm(which, desc=f"baselines {category.name}", disable=not progress, unit="baseline"):
        out = runners[key]()
        metrics = evaluate_maps(out.raw_score, out.maps, category)
        rows.append(
            {
                "category": category.name,
                "method": out.name,
                "key": key,
                "nfe": 0,
                **metrics,
                "fit_seconds": round(out.fit_seconds, 2),
                "score_seconds": round(out.score_seconds, 2),
                "settings": out.settings,
            }
        )
    return rows


def baseline_markdown(rows: list[dict], title: str = "Baselines on standardised lite0 192x16x16 features") -> str:
    """A Markdown section for baseline rows."""
    columns = ["category", "method", *METRIC_KEYS, "fit_seconds", "score_seconds"]
    headers = {"fit_seconds": "fit s", "score_seconds": "score s"}
    return f"## {title}\n\n" + markdown_table(rows, columns, headers)


def main(argv: list[str] | None = None) -> None:
    """Command line: fit and evaluate the baselines on every category given."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--data", nargs="+", type=Path, default=None, help="MVTec-layout category folders")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "baselines.json", help="JSON result file")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help="shared feature cache")
    parser.add_argument(
        "--which",
        nargs="+",
        default=["patchcore", "patchcore-full", "padim", "padim-reg"],
        choices=["patchcore", "patchcore-full", "padim", "padim-reg"],
    )
    add_threads_argument(parser)
    args = parse_args(parser, argv)
    data = args.data
    result: dict[str, Any] = {"benchmark": "baselines", "run": run_info(), "settings": vars(args) | {}, "rows": []}
    result["settings"] = {k: [str(x) for x in v] if isinstance(v, list) else str(v) for k, v in vars(args).items()}
    for root in data:
        category = load_category(root, args.cache_dir)
        result.setdefault("categories", []).append(category.summary())
        result["rows"] += run_baselines(category, args.which)
        write_results(args.out, result, "# Baselines\n\n" + baseline_markdown(result["rows"]))
    print(np.array2string(np.array([[r["image_auroc"], r["aupro"]] for r in result["rows"]]), precision=3))


if __name__ == "__main__":
    main()
