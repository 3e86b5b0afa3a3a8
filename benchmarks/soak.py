"""Soak test: score the same folder over and over for N minutes; report throughput drift and memory per round.

A long-running inspection service must not slow down or grow. This script builds a small real detector
(EfficientNet-Lite0 at ``--image-size`` px with its offline ImageNet weights, a per-position Gaussian denoiser
fitted on real mvtec3d_tire features when ``../shared/data`` is present, otherwise on generated textures,
hybrid scores, calibrated thresholds), writes a folder of ``--images`` generated PNGs (two of them broken, so
the skip path runs too) unless ``--folder`` is given, then calls :func:`invert_ad.predict_files.predict_paths` on it
round after round until ``--minutes`` have passed.

Per round it records wall time, images per second, the peak RSS during the round (sampled every 10 ms) and
the RSS after it, and a digest of the scores (they must be identical every round). Round 0 is a warm-up and
is left out of the drift figures. Results go to ``benchmarks/results/soak.json`` (rewritten atomically after
every round, so a stopped run keeps what it measured).

Usage::

    python benchmarks/soak.py                 # 3 minutes
    python benchmarks/soak.py --minutes 2 --images 500 --threads 1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from diffusers import DDPMScheduler
from PIL import Image

from invert_ad import __version__
from invert_ad.data import list_images, load_image
from invert_ad.detector import AnomalyDetector, channel_statistics
from invert_ad.features import create_feature_extractor
from invert_ad.io import atomic_write_json
from invert_ad.models import create_denoiser
from invert_ad.predict_files import predict_paths
from invert_ad.scorer import InversionScorer

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "soak.json"
TRAIN_FOLDER = REPO_ROOT.parent / "shared" / "data" / "mvtec3d_tire" / "train" / "good"
MB = 2**20


def texture(seed: int, size: int) -> np.ndarray:
    """A smooth random RGB texture ``(size, size, 3)`` uint8."""
    coarse = np.random.default_rng(seed).integers(60, 200, (4, 4, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BILINEAR))


def training_images(count: int, size: int) -> tuple[torch.Tensor, str]:
    """``(count, 3, size, size)`` in [0, 1] and where they came from."""
    if TRAIN_FOLDER.is_dir() and len(list_images(TRAIN_FOLDER)) >= count:
        pictures, source = [load_image(p) for p in list_images(TRAIN_FOLDER)[:count]], str(TRAIN_FOLDER)
    else:
        pictures, source = [Image.fromarray(texture(1000 + i, 4 * size)) for i in range(count)], "generated textures"
    arrays = [np.asarray(p.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32) / 255 for p in pictures]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous(), source


def build_detector(image_size: int, grid: int) -> tuple[AnomalyDetector, str]:
    """lite0 + Gaussian denoiser fitted on 8 images' standardised features + hybrid scorer + calibration on 4."""
    extractor = create_feature_extractor("efficientnet_lite0", image_size=image_size, grid=grid)
    images, source = training_images(12, image_size)
    with torch.inference_mode():
        raw = extractor(images)
    mean, std = channel_statistics(raw[:8])
    features = (raw - mean.reshape(1, -1, 1, 1)) / std.reshape(1, -1, 1, 1)
    denoiser = create_denoiser("gaussian", in_channels=features.shape[1], grid_size=grid, features=features[:8])
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", clip_sample=False
    )
    scorer = InversionScorer(denoiser.eval(), scheduler, timesteps="paper", scoring="hybrid")
    detector = AnomalyDetector(extractor, scorer, feature_mean=mean, feature_std=std)
    return detector.fit(normal_features=features[8:], folds=None), source


def write_folder(folder: Path, count: int, side: int) -> None:
    """``count`` PNGs of ``side`` x ``side`` (16 distinct textures, cycled), two of them broken."""
    variants = []
    for seed in range(16):
        path = folder / f"variant{seed}.png"
        Image.fromarray(texture(seed, side)).save(path)
        variants.append(path.read_bytes())
        path.unlink()
    for i in range(count):
        data = variants[i % len(variants)]
        if i == 1:
            data = data[: len(data) // 2]  # truncated
        elif i == count // 2:
            data = b"not an image"
        (folder / f"{i:06d}.png").write_bytes(data)


class PeakRss:
    """Highest RSS of this process while the block runs (sampled in a thread)."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        process = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, process.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> PeakRss:
        self.peak = psutil.Process().memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def machine_info(threads: int) -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "pillow": Image.__version__,
        "invert_ad": __version__,
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": threads,
        "memory_total_mb": round(psutil.virtual_memory().total / MB),
        "load_average_start": [round(v, 2) for v in os.getloadavg()],
        "device": "cpu",
    }


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Drift and growth over the measured rounds (round 0, the warm-up, left out)."""
    measured = rounds[1:] or rounds
    third = max(1, len(measured) // 3)
    first, last = measured[:third], measured[-third:]
    speed = [r["images_per_s"] for r in measured]
    elapsed = np.array([r["ended_s"] for r in measured])
    slope = float(np.polyfit(elapsed / 60, speed, 1)[0]) if len(measured) >= 3 else 0.0
    first_speed = statistics.fmean(r["images_per_s"] for r in first)
    last_speed = statistics.fmean(r["images_per_s"] for r in last)
    return {
        "measured_rounds": len(measured),
        "images_scored": sum(r["images"] for r in measured),
        "images_per_s_mean": round(statistics.fmean(speed), 2),
        "images_per_s_min": round(min(speed), 2),
        "images_per_s_max": round(max(speed), 2),
        "images_per_s_first_third": round(first_speed, 2),
        "images_per_s_last_third": round(last_speed, 2),
        "throughput_drift_percent": round(100 * (last_speed - first_speed) / first_speed, 2),
        "throughput_slope_percent_per_minute": round(100 * slope / statistics.fmean(speed), 2),
        "peak_rss_mb_first_measured_round": measured[0]["peak_rss_mb"],
        "peak_rss_mb_last_round": measured[-1]["peak_rss_mb"],
        "peak_rss_mb_max": max(r["peak_rss_mb"] for r in measured),
        "peak_rss_growth_mb_first_to_last_third": round(
            statistics.fmean(r["peak_rss_mb"] for r in last) - statistics.fmean(r["peak_rss_mb"] for r in first), 1
        ),
        "rss_after_round_growth_mb": round(measured[-1]["rss_after_mb"] - measured[0]["rss_after_mb"], 1),
        "scores_identical_every_round": len({r["scores_sha256"] for r in rounds}) == 1,
        "failed_per_round": sorted({r["failed"] for r in rounds}),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="how long to keep scoring (default 3)")
    parser.add_argument("--images", type=int, default=500, help="generated images in the folder (default 500)")
    parser.add_argument("--side", type=int, default=128, help="side of the generated images in px (default 128)")
    parser.add_argument("--folder", type=Path, default=None, help="score this folder instead of generated images")
    parser.add_argument("--image-size", type=int, default=32, help="detector input size in px (default 32)")
    parser.add_argument("--grid", type=int, default=2, help="feature grid side (default 2)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.images < 3:
        parser.error("--minutes must be positive and --images at least 3")
    torch.set_num_threads(args.threads)

    started = time.perf_counter()
    detector, source = build_detector(args.image_size, args.grid)
    build_seconds = time.perf_counter() - started
    with tempfile.TemporaryDirectory(prefix="invert_ad_soak_") as tmp:
        folder = args.folder
        if folder is None:
            folder = Path(tmp) / "images"
            folder.mkdir()
            write_folder(folder, args.images, args.side)
        report = Path(tmp) / "report.json"
        result: dict[str, Any] = {
            "benchmark": "soak",
            "settings": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}},
            "detector": {
                "backbone": "efficientnet_lite0",
                "denoiser": "gaussian",
                "scoring": "hybrid",
                "grid": "paper",
                "fitted_on": source,
                "build_seconds": round(build_seconds, 2),
            },
            "machine": machine_info(args.threads),
            "rounds": [],
        }
        clock = time.perf_counter()
        deadline = clock + args.minutes * 60
        print(f"{'round':>5} {'s':>7} {'img/s':>8} {'peak MB':>8} {'after MB':>8}", flush=True)
        while not result["rounds"] or time.perf_counter() < deadline:
            start = time.perf_counter()
            with PeakRss() as memory:
                summary = predict_paths(detector, [folder], report, batch_size=args.batch_size, progress=False)
            seconds = time.perf_counter() - start
            rows = json.loads(report.read_text())
            digest = hashlib.sha256(json.dumps([r.get("raw_score") for r in rows]).encode()).hexdigest()
            record = {
                "round": len(result["rounds"]),
                "seconds": round(seconds, 3),
                "ended_s": round(time.perf_counter() - clock, 2),
                "images": summary["num_images"],
                "failed": summary["num_failed"],
                "images_per_s": round(summary["num_images"] / seconds, 2),
                "peak_rss_mb": round(memory.peak / MB, 1),
                "rss_after_mb": round(psutil.Process().memory_info().rss / MB, 1),
                "scores_sha256": digest[:16],
            }
            result["rounds"].append(record)
            print(
                f"{record['round']:>5} {seconds:>7.2f} {record['images_per_s']:>8.1f} "
                f"{record['peak_rss_mb']:>8.1f} {record['rss_after_mb']:>8.1f}",
                flush=True,
            )
            result["summary"] = summarize(result["rounds"])
            result["machine"]["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
            atomic_write_json(args.out, result)
    print(json.dumps(result["summary"], indent=2))
    return result


if __name__ == "__main__":
    main()
