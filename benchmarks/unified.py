"""One detector for many products (issue 15): unified vs one model per category, beside PaDiM / PatchCore.

Categories: both of ``../shared/data`` (tire, magnetic tiles) and ELPV's monocrystalline and polycrystalline
cells (from its PyPI package) as two more. For each denoiser (``gaussian``: one Gaussian over the union, the
baseline to beat; ``gaussian-mixture``: one Gaussian per category, chosen by the exact mixture eps without being
told the category), a *joint* unified detector is trained on the normal images of all categories together (one
standardisation, pooled out-of-fold calibration) and evaluated on each test split without its category; a
*routed* unified detector (``--routed`` denoisers) keeps one detector per category behind a router
(:class:`invert_ad.RoutedDetector`, per-category thresholds) and is evaluated the same way, with the router's
choices recorded (``routed_to``); a *per-category* detector is trained on each alone. The library's PaDiM- and
PatchCore-style baselines (``baselines.py``) are fitted on the same union of standardised features. Exact
metrics; ELPV has no masks, so its pixel metrics are empty and the pixel means run over tire and magnetic tiles.

Command that produced ``benchmarks/results/unified.json``::

    .venv/bin/python benchmarks/unified.py --threads 1 --out benchmarks/results/unified.json
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from invert_ad.data import ImageDataset, cached_features, load_mask, open_dataset
from invert_ad.data.elpv import elpv_dataset
from invert_ad.evaluation import evaluate_detector
from invert_ad.metrics import METRIC_KEYS, METRIC_NAMES, evaluate_metrics
from invert_ad.scoring import upsample_maps
from invert_ad.training.train import train_detector

from baselines import padim, patchcore
from common import DEFAULT_CACHE_DIR, DEFAULT_DATA, RESULTS_DIR, add_threads_argument, run_info, write_results

KEYS = ("image_auroc", "pixel_auroc", "aupro")


def categories(data: Path) -> dict[str, tuple[Any, Any]]:
    """``name -> (train source, test source)``: MVTec folders, and ELPV's two cell kinds as datasets."""
    found = {p.name: (p, p) for p in sorted(data.iterdir()) if (p / "train").is_dir()}
    for kind in ("mono", "poly"):
        found[f"elpv_{kind}"] = (elpv_dataset("train", kind=kind), elpv_dataset("test", kind=kind))
    return found


def mean_of(rows: dict[str, dict[str, float | None]]) -> dict[str, float | None]:
    """Mean over categories of each metric (``None`` entries, e.g. pixel metrics without masks, left out)."""
    out = {}
    for key in METRIC_KEYS:
        values = [r[key] for r in rows.values() if r.get(key) is not None]
        out[key] = float(np.mean(values)) if values else None
    return out


def evaluate_library(detector: Any, tests: dict[str, Any], cache: Path) -> dict[str, dict[str, Any]]:
    """Each category's evaluation report (exact metrics, no timing)."""
    return {
        name: evaluate_detector(detector, test, timing=False, cache_dir=cache, progress=False)
        for name, test in tests.items()
    }


def test_arrays(dataset: ImageDataset, paths: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
    by_path = {str(r.path): r for r in dataset.records}
    records = [by_path[p] for p in paths]
    labels = np.array([r.label for r in records])
    if not any(r.mask_path is not None for r in records):
        return labels, None
    size = dataset.image_size
    masks = np.zeros((len(records), size, size), dtype=bool)
    for i, record in enumerate(records):
        if record.mask_path is not None:
            masks[i] = load_mask(record.mask_path, size)
    return labels, masks


def run_baselines(detector: Any, trains: dict[str, Any], tests: dict[str, Any], cache: Path) -> list[dict[str, Any]]:
    """PaDiM- and PatchCore-style on the union of standardised training features, per test category."""
    from invert_ad.data import FeatureCache

    extractor, store = detector.feature_extractor, FeatureCache(cache)
    size = detector.image_size

    def features(source: Any, split: str) -> tuple[torch.Tensor, ImageDataset, list[str]]:
        dataset = open_dataset(source, split, size)
        raw, paths = cached_features(extractor, dataset, store, progress=False)
        return detector.standardize(raw), dataset, paths

    union = torch.cat([features(source, "train")[0] for source in trains.values()])
    methods = {
        "PaDiM-style (union)": lambda test: padim(union, test),
        "PatchCore-style (union, coreset 0.01)": lambda test: patchcore(union, test, coreset_ratio=0.01),
    }
    results = []
    for method, run in methods.items():
        start, rows = time.perf_counter(), {}
        for name, source in tests.items():
            test, dataset, paths = features(source, "test")
            out = run(test)
            labels, masks = test_arrays(dataset, paths)
            maps = upsample_maps(out.maps.float(), (size, size)).numpy() if masks is not None else None
            rows[name] = evaluate_metrics(out.image_scores.double().numpy(), labels, maps, masks, mode="exact")
        results.append(
            {
                "setting": "unified",
                "method": method,
                "categories": rows,
                "mean": mean_of(rows),
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
    return results


def markdown(results: list[dict[str, Any]], names: list[str]) -> str:
    head = "| setting | method | " + " | ".join(f"{n} {METRIC_NAMES[k]}" for n in names for k in KEYS)
    head += " | mean " + " | mean ".join(METRIC_NAMES[k] for k in KEYS) + " | seconds |"
    lines = [head, "|---" * (2 + len(names) * len(KEYS) + len(KEYS) + 1) + "|"]

    def cell(value: float | None) -> str:
        return "—" if value is None else f"{value:.3f}"

    for r in results:
        cells = [cell(r["categories"][n][k]) for n in names for k in KEYS] + [cell(r["mean"][k]) for k in KEYS]
        lines.append(f"| {r['setting']} | {r['method']} | " + " | ".join(cells) + f" | {r['seconds']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of MVTec-layout categories")
    parser.add_argument("--denoisers", nargs="+", default=["gaussian", "gaussian-mixture"])
    parser.add_argument(
        "--routed", nargs="*", default=["gaussian"], help="denoisers also run as a RoutedDetector (one per category)"
    )
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("--runs", type=Path, default=Path("/tmp/invert_ad_unified_runs"))
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "unified.json")
    add_threads_argument(parser)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    found = categories(args.data)
    names = list(found)
    trains = {n: train for n, (train, _) in found.items()}
    tests = {n: test for n, (_, test) in found.items()}
    results: list[dict[str, Any]] = []
    detector = None
    for denoiser in args.denoisers:
        for unified in ("joint", "routed"):
            if unified == "routed" and denoiser not in args.routed:
                continue
            start = time.perf_counter()
            summary = train_detector(
                list(trains.values()),
                args.runs / f"unified-{unified}-{denoiser}",
                denoiser=denoiser,
                cache_dir=args.cache_dir,
                progress=False,
                unified=unified,
            )
            fit_seconds = time.perf_counter() - start
            detector = detector or summary.detector
            reports = evaluate_library(summary.detector, tests, args.cache_dir)
            size = sum(p.stat().st_size for p in (args.runs / f"unified-{unified}-{denoiser}").rglob("*.safetensors"))
            results.append(
                {
                    "setting": f"unified ({unified})",
                    "method": denoiser,
                    "categories": {name: {k: r[k] for k in METRIC_KEYS} for name, r in reports.items()},
                    "mean": mean_of(reports),
                    "seconds": round(time.perf_counter() - start, 1),
                    "fit_seconds": round(fit_seconds, 1),
                    "model_megabytes": round(size / 2**20, 1),
                    "nfe": summary.detector.scorer.nfe,
                    "routed_to": {name: r.get("routed_to") for name, r in reports.items()},
                }
            )
        start, rows = time.perf_counter(), {}
        for name in names:
            single = train_detector(
                trains[name],
                args.runs / f"{name}-{denoiser}",
                denoiser=denoiser,
                cache_dir=args.cache_dir,
                progress=False,
            )
            report = evaluate_library(single.detector, {name: tests[name]}, args.cache_dir)[name]
            rows[name] = {k: report[k] for k in METRIC_KEYS}
        results.append(
            {
                "setting": "per category",
                "method": denoiser,
                "categories": rows,
                "mean": mean_of(rows),
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
        print(*(r["setting"] + " " + str(r["mean"]) for r in results[-3:]), sep="\n", flush=True)
    results += run_baselines(detector, trains, tests, args.cache_dir)
    shutil.rmtree(args.runs, ignore_errors=True)
    data = {"run": run_info(), "command": "benchmarks/unified.py", "categories": names, "results": results}
    write_results(args.out, data, "# Unified vs per-category\n\n" + markdown(results, names) + "\n")


if __name__ == "__main__":
    main()
