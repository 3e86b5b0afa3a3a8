"""Speed and memory: latency at batch 1, throughput at batch 32, the library's overhead, peak memory, bf16.

For each denoiser configuration, on real test images of one category (default ``mvtec3d_tire``):

* per-image latency at batch 1 and throughput at batch 32 of: the backbone (feature extraction), the bare
  denoiser forward, inversion S = 3 (paper grid), one-step IRF, the reconstruction baseline at NFE 50, and
  end to end (:meth:`AnomalyDetector.score`: images in, scores and 256 px maps out) with the paper grid hybrid
  and with IRF;
* the overhead ratio: end-to-end time / (bare backbone forward + the bare denoiser forwards it needs), all
  measured in the same run, interleaved round by round, medians (goal: <= 1.10 at batch 32);
* peak resident memory (CPU) of a fresh process doing end-to-end scoring at batch 32, or peak allocated memory
  on a GPU;
* the inference settings of :meth:`AnomalyDetector.optimize` (bf16 autocast of the denoiser and of the
  backbone, channels-last backbone, ``torch.compile`` default and reduce-overhead = CUDA graphs, all together):
  speed, first-call (compile) time and agreement of the scores with fp32 eager;
* for DiTs, the FLOP bound ``3 x 2 x params x tokens`` per image against the best measured rate (give the
  device's peak with ``--peak-tflops``).

Untrained networks cost exactly what trained ones do, so the learned denoisers are freshly initialised (their
zero-initialised layers filled with small noise, so that outputs and precision errors are not trivially zero);
the Gaussian ones are fitted on the category's training features.

Command that produced the committed results (2-core CPU shared with other jobs: timings are noisy, compare
ratios within one run)::

    .venv/bin/python benchmarks/speed.py --threads 2 --out benchmarks/results/speed_cpu.json

On a GPU (the paper's DiT-g; about 800 TFLOP/s dense bf16 on an H100)::

    python benchmarks/speed.py --configs gaussian dit-s dit-b dit-g --peak-tflops 800 \\
        --out benchmarks/results/speed_gpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDPMScheduler
from scipy.stats import spearmanr
from tqdm.auto import tqdm

from invert_ad.data import MVTecDataset
from invert_ad.detector import AnomalyDetector
from invert_ad.features import create_feature_extractor
from invert_ad.models import create_denoiser
from invert_ad.scorer import InversionScorer

from common import (
    DEFAULT_CACHE_DIR,
    DEFAULT_DATA,
    DENOISER_CONFIGS,
    RESULTS_DIR,
    CategoryFeatures,
    add_threads_argument,
    load_category,
    markdown_table,
    parse_args,
    peak_rss_mb,
    run_info,
    write_results,
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fill_zero_parameters_(model: torch.nn.Module, scale: float = 0.02, seed: int = 0) -> None:
    """Fill all-zero parameters (adaLN-Zero and zero-initialised output layers) with seeded noise.

    A fresh learned denoiser outputs exactly zero, which would make every precision agree trivially; trained
    ones do not. The cost of a forward pass is unchanged.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.any():
                parameter.copy_(scale * torch.randn(parameter.shape, generator=generator))


def build(
    config_name: str, category: CategoryFeatures, device: torch.device
) -> tuple[AnomalyDetector, AnomalyDetector, InversionScorer, torch.nn.Module]:
    """A detector (paper grid hybrid), its IRF twin, a reconstruction scorer (NFE 50, t_r 500) and the denoiser."""
    config = DENOISER_CONFIGS[config_name]
    overrides = dict(config.overrides)
    if config.preset.startswith("gaussian"):
        overrides["features"] = category.train
    model = create_denoiser(config.preset, in_channels=category.train.shape[1], grid_size=16, **overrides)
    fill_zero_parameters_(model)
    model = model.to(device).eval().requires_grad_(False)
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", clip_sample=False
    )
    extractor = create_feature_extractor("efficientnet_lite0").to(device)
    holdout = category.holdout.to(device)
    detectors = []
    for scoring in ("hybrid", "irf"):
        scorer = InversionScorer(model, scheduler, timesteps="paper", scoring=scoring).fit(holdout)
        detectors.append(AnomalyDetector(extractor, scorer, feature_mean=category.mean, feature_std=category.std))
    reconstruction = InversionScorer(
        model, scheduler, scoring="reconstruction", reconstruction_timestep=500, reconstruction_steps=50
    )
    return detectors[0], detectors[1], reconstruction, model


def sample_images(root: Path, count: int) -> torch.Tensor:
    """``count`` test images of a category (repeated if it has fewer), ``(count, 3, 256, 256)``."""
    dataset = MVTecDataset(root, "test", 256)
    return torch.stack([dataset[i % len(dataset)]["image"] for i in range(count)])


def measure(
    parts: dict[str, Callable[[], Any]], device: torch.device, rounds: int, progress: bool = False
) -> dict[str, list[float]]:
    """Run every part once per round (after one warm-up round), interleaved; seconds per call for each part."""
    times: dict[str, list[float]] = {name: [] for name in parts}
    for round_index in tqdm(range(rounds + 1), desc="rounds", disable=not progress, leave=False):
        for name, fn in parts.items():
            _sync(device)
            start = time.perf_counter()
            with torch.inference_mode():
                fn()
            _sync(device)
            if round_index > 0:
                times[name].append(time.perf_counter() - start)
    return times


def speed_rows(
    config_name: str, category: CategoryFeatures, images: torch.Tensor, device: torch.device, rounds: dict[int, int]
) -> list[dict[str, Any]]:
    """All timings of one configuration at batch 1 and 32."""
    detector, irf_detector, reconstruction, model = build(config_name, category, device)
    extractor = detector.feature_extractor
    rows = []
    for batch, repeats in rounds.items():
        x_img = images[:batch].to(device)
        feats = detector.extract(x_img)
        t = torch.full((batch,), 333, dtype=torch.long, device=device)
        parts: dict[str, Callable[[], Any]] = {
            "backbone forward (bare)": lambda x_img=x_img: extractor(x_img),
            "denoiser forward (bare)": lambda feats=feats, t=t: model(feats, t).sample,
            "inversion S=3": lambda feats=feats: detector.scorer.invert(feats),
            "IRF (1 step)": lambda feats=feats: irf_detector.scorer.irf(feats),
            "reconstruction NFE 50": lambda feats=feats: reconstruction.reconstruct(feats),
            "end to end, hybrid S=3": lambda x_img=x_img: detector.score(x_img),
            "end to end, IRF": lambda x_img=x_img: irf_detector.score(x_img),
        }
        times = measure(parts, device, repeats)
        med = {name: statistics.median(values) for name, values in times.items()}
        nfe = {
            "backbone forward (bare)": 0,
            "denoiser forward (bare)": 1,
            "inversion S=3": 3,
            "IRF (1 step)": 1,
            "reconstruction NFE 50": 50,
            "end to end, hybrid S=3": 3,
            "end to end, IRF": 1,
        }
        bare_e2e = med["backbone forward (bare)"] + 3 * med["denoiser forward (bare)"]
        bare_irf = med["backbone forward (bare)"] + med["denoiser forward (bare)"]
        for name, seconds in med.items():
            row = {
                "config": config_name,
                "batch": batch,
                "part": name,
                "nfe": nfe[name],
                "ms_per_image": 1000 * seconds / batch,
                "images_per_s": batch / seconds,
                "ms_per_call_min": 1000 * min(times[name]),
                "repeats": len(times[name]),
            }
            if name == "end to end, hybrid S=3":
                row["overhead_ratio"] = seconds / bare_e2e
            if name == "end to end, IRF":
                row["overhead_ratio"] = seconds / bare_irf
            if name == "inversion S=3":
                row["overhead_ratio"] = seconds / (3 * med["denoiser forward (bare)"])
            rows.append(row)
    return rows


SETTINGS: dict[str, dict[str, Any]] = {
    "fp32 eager": {},
    "bf16 denoiser": {"autocast_dtype": "bfloat16"},
    "bf16 denoiser + backbone": {"autocast_dtype": "bfloat16", "autocast_backbone": True},
    "channels-last backbone": {"channels_last": True},
    "compile default": {"compile_mode": "default"},
    "compile reduce-overhead (CUDA graphs)": {"compile_mode": "reduce-overhead"},
    "all: compile default + channels-last + bf16 denoiser": {
        "compile_mode": "default",
        "channels_last": True,
        "autocast_dtype": "bfloat16",
    },
    "all: reduce-overhead + channels-last + bf16 denoiser": {
        "compile_mode": "reduce-overhead",
        "channels_last": True,
        "autocast_dtype": "bfloat16",
    },
}
"""The inference settings compared end to end (:meth:`AnomalyDetector.optimize` keyword arguments)."""


def settings_rows(
    config_name: str,
    category: CategoryFeatures,
    images: torch.Tensor,
    device: torch.device,
    repeats: int,
    names: list[str],
) -> list[dict[str, Any]]:
    """End to end (hybrid S=3) at batch 32 under each setting: speed, compile time, agreement with fp32 eager.

    Settings are measured one after the other (a compiled function cannot be interleaved with its own
    recompilation); the first call of each (compilation, CUDA graph capture) is timed apart as ``first_call_s``.
    """
    detector = build(config_name, category, device)[0]
    x_img = images.to(device)
    with torch.inference_mode():
        reference = detector.score(x_img)
    ref_scores = reference.raw_score.double().numpy()
    rows = []
    for name in names:
        detector.optimize(**SETTINGS[name])
        _sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = detector.score(x_img)
        _sync(device)
        first_call = time.perf_counter() - start
        times = measure({name: lambda: detector.score(x_img)}, device, repeats)[name]
        seconds = statistics.median(times)
        scores = out.raw_score.double().numpy()
        rows.append(
            {
                "config": config_name,
                "batch": x_img.shape[0],
                "setting": name,
                "optimize": SETTINGS[name],
                "ms_per_image": 1000 * seconds / x_img.shape[0],
                "images_per_s": x_img.shape[0] / seconds,
                "first_call_s": first_call,
                "score_spearman": float(spearmanr(ref_scores, scores).statistic),
                "score_rel_error": float(np.linalg.norm(scores - ref_scores) / np.linalg.norm(ref_scores)),
                "map_max_abs_diff": float((out.raw_map - reference.raw_map).abs().max()),
            }
        )
        torch.compiler.reset()  # drop compiled graphs before the next setting
    detector.optimize()
    return rows


def flop_bound(
    config_name: str, model: torch.nn.Module, tokens: int, peak_tflops: float | None, measured: list[dict[str, Any]]
) -> dict[str, Any]:
    """The issue's physical limit for a DiT: ``2 x params x tokens`` FLOP per network call and image.

    With ``peak_tflops`` (the device's dense peak in the dtype used, e.g. about 800 for an H100 in bf16) the
    bound in images/s is ``peak / (3 x FLOP per call)`` for S = 3, compared with the best end-to-end hybrid S = 3
    rate measured (any batch size or inference setting).
    """
    params = sum(p.numel() for p in model.parameters())
    tflop_image = 3 * 2 * params * tokens / 1e12
    hybrid_s3 = "end to end, hybrid S=3"  # settings rows are all end to end hybrid S=3 too
    end_to_end = [r for r in measured if r["config"] == config_name and r.get("part", hybrid_s3) == hybrid_s3]
    best = max((r["images_per_s"] for r in end_to_end), default=None)
    row: dict[str, Any] = {
        "config": config_name,
        "denoiser_params": params,
        "tokens": tokens,
        "tflop_per_image_s3": tflop_image,
        "peak_tflops": peak_tflops,
        "best_images_per_s": best,
    }
    if peak_tflops:
        row["bound_images_per_s"] = peak_tflops / tflop_image
        row["fraction_of_bound"] = best / row["bound_images_per_s"] if best else None
    return row


def child_memory(config_name: str, data: Path, cache_dir: Path, batch: int, device: str) -> dict[str, Any]:
    """Run in a fresh process: memory before and after end-to-end scoring at ``batch``."""
    device_t = torch.device(device)
    category = load_category(data, cache_dir, progress=False)
    images = sample_images(data, batch)
    detector, _, _, _ = build(config_name, category, device_t)
    loaded = peak_rss_mb()
    if device_t.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device_t)
    with torch.inference_mode():
        for _ in range(2):
            detector.score(images.to(device_t))
    out = {"config": config_name, "batch": batch, "peak_rss_mb_after_setup": loaded, "peak_rss_mb": peak_rss_mb()}
    if device_t.type == "cuda":
        out["peak_allocated_mb"] = torch.cuda.max_memory_allocated(device_t) / 2**20
    return out


def memory_row(config_name: str, data: Path, cache_dir: Path, batch: int, device: str) -> dict[str, Any]:
    """:func:`child_memory` in a subprocess (so the peak belongs to that run alone)."""
    command = [sys.executable, __file__, "--memory-child", config_name, "--category", str(data)]
    command += ["--cache-dir", str(cache_dir), "--device", device, "--memory-batch", str(batch)]
    completed = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def speed_markdown(result: dict[str, Any]) -> str:
    """Tables: timings, overhead ratios, memory, autocast."""
    run = result["run"]
    parts = [
        "# Speed and memory\n",
        f"Command: `{run['command']}`  \ncommit `{run['git_commit']}`, {run['device_name']} ({run['device']}), "
        f"{run['machine']['torch_threads']} threads, fp32 unless said; load average at start "
        f"{run['machine']['load_average_1_5_15'][0]:.1f}: the machine was shared with other jobs, so absolute "
        "times are noisy; ratios come from parts measured interleaved in the same run (medians).\n",
    ]
    headers = {
        "ms_per_image": "ms/image",
        "images_per_s": "images/s",
        "overhead_ratio": "overhead",
        "nfe": "NFE",
        "ms_per_call_min": "min ms/call",
    }
    for batch in sorted({r["batch"] for r in result["timings"]}):
        rows = [r for r in result["timings"] if r["batch"] == batch]
        parts.append(
            f"## Batch {batch}\n\noverhead = end-to-end time / (bare backbone forward + NFE bare denoiser forwards); "
            "for `inversion S=3`, its time / 3 bare denoiser forwards.\n\n"
            + markdown_table(rows, ["config", "part", "nfe", "ms_per_image", "images_per_s", "overhead_ratio"], headers)
        )
    if result.get("memory"):
        parts.append(
            "## Peak memory (fresh process, end to end at batch 32)\n\n"
            + markdown_table(
                result["memory"],
                ["config", "batch", "peak_rss_mb_after_setup", "peak_rss_mb", "peak_allocated_mb"],
                {
                    "peak_rss_mb_after_setup": "RSS after setup MiB",
                    "peak_rss_mb": "peak RSS MiB",
                    "peak_allocated_mb": "peak GPU allocated MiB",
                },
            )
        )
    if result.get("settings_runs"):
        parts.append(
            "## Inference settings, end to end hybrid S=3 at batch 32 (`AnomalyDetector.optimize`)\n\n"
            "Agreement is with the fp32 eager scores of the same images; `first call s` includes compilation / "
            "CUDA-graph capture. On CPU, reduce-overhead has no CUDA graphs and behaves like default.\n\n"
            + markdown_table(
                result["settings_runs"],
                [
                    "config",
                    "setting",
                    "ms_per_image",
                    "images_per_s",
                    "first_call_s",
                    "score_spearman",
                    "score_rel_error",
                ],
                {
                    **headers,
                    "first_call_s": "first call s",
                    "score_spearman": "Spearman vs fp32",
                    "score_rel_error": "rel. score error",
                },
            )
        )
    if result.get("flop_bound"):
        parts.append(
            "## DiT FLOP bound (2 x params x tokens per call, S = 3)\n\n"
            + markdown_table(
                result["flop_bound"],
                [
                    "config",
                    "denoiser_params",
                    "tflop_per_image_s3",
                    "peak_tflops",
                    "bound_images_per_s",
                    "best_images_per_s",
                    "fraction_of_bound",
                ],
                {
                    "denoiser_params": "params",
                    "tflop_per_image_s3": "TFLOP/image",
                    "peak_tflops": "peak TFLOP/s",
                    "bound_images_per_s": "bound images/s",
                    "best_images_per_s": "best measured images/s",
                    "fraction_of_bound": "fraction",
                },
            )
        )
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    """Command line."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--category", type=Path, default=DEFAULT_DATA / "mvtec3d_tire", help="MVTec-layout folder")
    parser.add_argument(
        "--configs",
        nargs="+",
        default=[
            "gaussian",
            "gaussian-diag",
            "residual-conv-128x2",
            "residual-conv-256x4",
            "residual-mlp-256x2",
            "dit-s",
        ],
        choices=sorted(DENOISER_CONFIGS),
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds-batch1", type=int, default=7, help="timed rounds at batch 1")
    parser.add_argument("--rounds-batch32", type=int, default=3, help="timed rounds at batch 32")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument(
        "--settings",
        nargs="*",
        default=None,
        choices=sorted(SETTINGS),
        help="inference settings to compare (default: all; on CPU all but reduce-overhead); none to skip",
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "speed_cpu.json")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="device peak (e.g. 800 for H100 bf16) for the DiT FLOP bound"
    )
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--memory-batch", type=int, default=32, help=argparse.SUPPRESS)
    add_threads_argument(parser)
    args = parse_args(parser, argv, data=False)
    if args.memory_child:
        print(
            json.dumps(child_memory(args.memory_child, args.category, args.cache_dir, args.memory_batch, args.device))
        )
        return
    device = torch.device(args.device)
    category = load_category(args.category, args.cache_dir)
    images = sample_images(args.category, 32)
    result: dict[str, Any] = {
        "benchmark": "speed",
        "run": run_info(args.device),
        "settings": {k: v if isinstance(v, (int, float, list, bool)) else str(v) for k, v in vars(args).items()},
        "timings": [],
        "memory": [],
        "settings_runs": [],
        "flop_bound": [],
    }

    def save() -> None:
        write_results(args.out, result, speed_markdown(result))

    rounds = {1: args.rounds_batch1, 32: args.rounds_batch32}
    names = args.settings
    if names is None:  # without CUDA, reduce-overhead is default again: skip the duplicates
        names = [n for n in SETTINGS if device.type == "cuda" or "reduce-overhead" not in str(SETTINGS[n])]
    for name in tqdm(args.configs, desc="speed", unit="config"):
        result["timings"] += speed_rows(name, category, images, device, rounds)
        save()
        if not args.no_memory:
            result["memory"].append(memory_row(name, args.category, args.cache_dir, 32, args.device))
            save()
        if names:
            result["settings_runs"] += settings_rows(name, category, images, device, args.rounds_batch32, names)
            save()
        if DENOISER_CONFIGS[name].preset.startswith("dit"):
            with torch.device("meta"):  # parameter count only
                model = create_denoiser(DENOISER_CONFIGS[name].preset, category.train.shape[1], 16)
            measured = result["timings"] + result["settings_runs"]
            result["flop_bound"].append(flop_bound(name, model, 16 * 16, args.peak_tflops, measured))
            save()
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
