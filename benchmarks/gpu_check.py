"""The prepared GPU check: speed of the default detector and of DiT-b / DiT-g, and a short DiT training.

One command, under 6 minutes on a CUDA device, JSON written after every stage (and every measurement)::

    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.json --data ../shared/data/mvtec3d_tire

Stages, each in its own process with a hard time box (one failing, hanging or running out of memory loses only
its own unfinished measurements; the others still run and are written):

* ``environment``: torch / CUDA versions, the device, and a measured dense bf16 / fp32 matmul rate (the
  practical peak the FLOP bounds use, next to the nominal peak of known devices);
* ``default_detector``: the default detector (EfficientNet-Lite0 features, Gaussian denoiser fitted on random
  features: its cost does not depend on the values, hybrid on the paper grid, S = 3) end to end, images/s;
* ``dit-b``, ``dit-g``: the same detector with a DiT denoiser (random weights: the cost of trained ones):
  fp32 eager, bf16 autocast, bf16 + ``torch.compile``, bf16 + CUDA graphs (``reduce-overhead``), each with
  the agreement of its scores with fp32 and the ratio to the FLOP bound ``peak / (3 x 2 x params x tokens)``;
* ``training``: :func:`~invert_ad.training.train_detector` with a DiT on one category for about a minute, then
  :func:`~invert_ad.evaluation.evaluate_detector`: its image and pixel AUROC.

``--dry-run`` runs every stage on the CPU at tiny sizes (64 px images, 4 x 4 grid, one-layer DiTs, a synthetic
MVTec-layout category, two training steps) in this process, so that a test can exercise all the code in
seconds (``tests/unit/export/test_gpu_check.py``) and GPU minutes are not spent on a typo.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch._dynamo

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DEFAULT_DATA, RESULTS_DIR, run_info

STAGES: dict[str, float] = {
    "environment": 15.0,
    "default_detector": 45.0,
    "dit-b": 75.0,
    "dit-g": 110.0,
    "training": 85.0,
}
"""Stage name -> hard time box in seconds (330 s in all, plus process start-up: under 6 minutes)."""

NOMINAL_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0}
"""Dense bf16 tensor-core peaks (no sparsity) by a substring of the device name, from the vendors' data sheets."""

SETTINGS: dict[str, dict[str, Any]] = {
    "fp32 eager": {},
    "bf16 eager": {"autocast_dtype": "bfloat16"},
    "bf16 CUDA graphs": {"autocast_dtype": "bfloat16", "compile_mode": "reduce-overhead", "channels_last": True},
    "bf16 compiled": {"autocast_dtype": "bfloat16", "compile_mode": "default", "channels_last": True},
}
"""Inference settings of the DiT stages (:meth:`AnomalyDetector.optimize` keyword arguments)."""


class Sizes:
    """The sizes of a real run, or the tiny ones of ``--dry-run``."""

    def __init__(self, dry_run: bool) -> None:
        self.dry_run = dry_run
        self.image_size = 64 if dry_run else 256
        self.grid = 4 if dry_run else 16
        self.batch = (
            {"default_detector": 2, "dit-b": 2, "dit-g": 2}
            if dry_run
            else {
                "default_detector": 128,
                "dit-b": 128,
                "dit-g": 64,
            }
        )
        self.dit_overrides: dict[str, Any] = {"hidden_size": 32, "depth": 1, "num_heads": 2} if dry_run else {}
        self.min_seconds = 0.0 if dry_run else 1.0  # time each setting for at least this long
        self.train_minutes = 1.0
        self.train_steps = 2 if dry_run else None


# ----------------------------------------------------------------------------------------------- helpers
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device, min_seconds: float) -> tuple[float, float]:
    """``(first_call_s, median seconds per call)``: one untimed-as-steady first call, then repeats."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - start
    times: list[float] = []
    while len(times) < 3 or (sum(times) < min_seconds and len(times) < 50):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


class Recorder:
    """A stage's results, written atomically to ``path`` after every measurement."""

    def __init__(self, path: Path, deadline: float) -> None:
        self.path, self.deadline, self.data = path, deadline, {"rows": [], "errors": []}

    def save(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        os.replace(tmp, self.path)

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    @contextlib.contextmanager
    def step(self, name: str, needs_s: float = 0.0) -> Iterator[dict[str, Any]]:
        """One measurement: skipped if less than ``needs_s`` is left, its error recorded instead of raised."""
        row: dict[str, Any] = {"name": name}
        if self.time_left() < needs_s:
            row["skipped"] = f"time box: {self.time_left():.0f} s left, about {needs_s:.0f} s needed"
            self.data["rows"].append(row)
            self.save()
            yield row
            return
        try:
            yield row
        except Exception as err:
            row["error"] = f"{type(err).__name__}: {err}"
            self.data["errors"].append({"step": name, "traceback": traceback.format_exc(limit=8)})
        finally:
            self.data["rows"].append(row)
            self.save()


def _detector(denoiser_name: str, sizes: Sizes, device: torch.device) -> tuple[Any, torch.nn.Module]:
    """A calibrated-enough detector: lite0 at ``image_size``, the denoiser (random or fitted on noise), hybrid S=3."""
    from diffusers import DDPMScheduler

    from invert_ad.detector import AnomalyDetector
    from invert_ad.features import create_feature_extractor
    from invert_ad.models import create_denoiser
    from invert_ad.scorer import InversionScorer
    from speed import fill_zero_parameters_

    extractor = create_feature_extractor("efficientnet_lite0", image_size=sizes.image_size, grid=sizes.grid)
    channels = extractor.channels
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(64, channels, sizes.grid, sizes.grid, generator=generator)
    overrides = {"features": features} if denoiser_name.startswith("gaussian") else dict(sizes.dit_overrides)
    model = create_denoiser(denoiser_name, channels, sizes.grid, **overrides)
    fill_zero_parameters_(model)
    model = model.to(device).eval().requires_grad_(False)
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", clip_sample=False
    )
    scorer = InversionScorer(model, scheduler, timesteps="paper", scoring="hybrid")
    detector = AnomalyDetector(extractor.to(device), scorer)
    detector.fit(normal_features=features.to(device), folds=None, batch_size=32)
    return detector, model


def _images(count: int, size: int, device: torch.device) -> torch.Tensor:
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)


# ----------------------------------------------------------------------------------------------- stages
def stage_environment(rec: Recorder, sizes: Sizes, device: torch.device) -> None:
    rec.data["run"] = run_info(str(device))
    rec.data["torch"] = torch.__version__
    rec.data["cuda"] = torch.version.cuda
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        rec.data["device"] = {
            "name": props.name,
            "memory_gib": props.total_memory / 2**30,
            "sm": props.multi_processor_count,
        }
        rec.data["nominal_bf16_tflops"] = next((v for k, v in NOMINAL_BF16_TFLOPS.items() if k in props.name), None)
    n = 256 if sizes.dry_run else 8192
    for dtype in (torch.bfloat16, torch.float32):
        with rec.step(f"matmul {str(dtype).removeprefix('torch.')} {n}", needs_s=3) as row:
            if "skipped" in row:
                continue
            a = torch.randn(n, n, device=device, dtype=dtype)
            b = torch.randn(n, n, device=device, dtype=dtype)
            _, seconds = _timed(lambda a=a, b=b: a @ b, device, sizes.min_seconds)
            row["tflops"] = 2 * n**3 / seconds / 1e12
            rec.data[f"measured_{str(dtype).removeprefix('torch.')}_tflops"] = row["tflops"]


def _end_to_end(
    rec: Recorder,
    name: str,
    detector: Any,
    images: torch.Tensor,
    device: torch.device,
    sizes: Sizes,
    settings: dict[str, dict[str, Any]],
    needs_s: float,
) -> None:
    """images/s of ``detector.score`` under each setting, with agreement with the fp32 eager scores."""
    from scipy.stats import spearmanr

    reference = None
    for setting, kwargs in settings.items():
        with rec.step(f"{name}: {setting}", needs_s=needs_s) as row:
            if "skipped" in row:
                continue
            row.update({"config": name, "setting": setting, "optimize": kwargs, "batch": len(images)})
            detector.optimize(**kwargs)
            with torch.inference_mode():
                first, seconds = _timed(lambda: detector.score(images), device, sizes.min_seconds)
                scores = detector.score(images).raw_score.double().numpy()
            row.update({"first_call_s": first, "ms_per_batch": 1000 * seconds, "images_per_s": len(images) / seconds})
            if reference is None and not kwargs:
                reference = scores
            if reference is not None:
                row["spearman_vs_fp32"] = float(spearmanr(reference, scores).statistic) if len(scores) > 2 else None
                row["rel_score_error_vs_fp32"] = float(np.linalg.norm(scores - reference) / np.linalg.norm(reference))
            if device.type == "cuda":
                row["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    detector.optimize()
    torch.compiler.reset()


def stage_default_detector(rec: Recorder, sizes: Sizes, device: torch.device) -> None:
    detector, _ = _detector("gaussian", sizes, device)
    batch = sizes.batch["default_detector"]
    for count in (1, batch):
        images = _images(count, sizes.image_size, device)
        _end_to_end(
            rec,
            f"gaussian batch {count}",
            detector,
            images,
            device,
            sizes,
            {"fp32 eager": {}, "fp32 CUDA graphs": {"compile_mode": "reduce-overhead", "channels_last": True}},
            needs_s=8,
        )


def _dit_stage(name: str, rec: Recorder, sizes: Sizes, device: torch.device) -> None:
    detector, model = _detector(name, sizes, device)
    params = sum(p.numel() for p in model.parameters())
    tokens = sizes.grid * sizes.grid  # patch size 1 on the feature grid
    tflop_per_image = 3 * 2 * params * tokens / 1e12
    rec.data.update({"denoiser": name, "params": params, "tokens": tokens, "tflop_per_image_s3": tflop_per_image})
    rec.save()
    images = _images(sizes.batch[name], sizes.image_size, device)
    _end_to_end(rec, name, detector, images, device, sizes, SETTINGS, needs_s=15)
    best = max((r.get("images_per_s", 0.0) for r in rec.data["rows"]), default=0.0)
    rec.data["best_images_per_s"] = best
    env = _load(rec.path.with_name("environment.json")) or {}
    for key in ("nominal_bf16_tflops", "measured_bfloat16_tflops"):
        peak = env.get(key)
        if peak:
            rec.data[f"bound_images_per_s_{key}"] = peak / tflop_per_image
            rec.data[f"fraction_of_bound_{key}"] = best / (peak / tflop_per_image)


def stage_dit_b(rec: Recorder, sizes: Sizes, device: torch.device) -> None:
    _dit_stage("dit-b", rec, sizes, device)


def stage_dit_g(rec: Recorder, sizes: Sizes, device: torch.device) -> None:
    _dit_stage("dit-g", rec, sizes, device)


def _synthetic_category(root: Path, size: int) -> Path:
    """A tiny MVTec-layout category of noise images (for ``--dry-run``): 8 train, 2 good and 2 defective tests."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train/good", 8), ("test/good", 2), ("test/cut", 2)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / split / f"{i:03d}.png")
    (root / "ground_truth/cut").mkdir(parents=True, exist_ok=True)
    for i in range(2):
        mask = np.zeros((size, size), dtype=np.uint8)
        mask[: size // 2] = 255
        Image.fromarray(mask).save(root / "ground_truth/cut" / f"{i:03d}_mask.png")
    return root


def stage_training(rec: Recorder, sizes: Sizes, device: torch.device, data: Path, denoiser: str) -> None:
    from invert_ad.evaluation import evaluate_detector
    from invert_ad.training import TrainingConfig
    from invert_ad.training.train import train_detector

    with tempfile.TemporaryDirectory() as tmp:
        if sizes.dry_run:
            data = _synthetic_category(Path(tmp) / "category", sizes.image_size)
        if not (data / "train").is_dir():
            raise FileNotFoundError(f"no MVTec-layout category at {data} (give --data)")
        minutes = min(sizes.train_minutes, max(0.1, (rec.time_left() - 35) / 60))
        config = TrainingConfig(steps=sizes.train_steps, minutes=minutes, batch_size=2 if sizes.dry_run else 64)
        with rec.step(f"train {denoiser} on {data.name}") as row:
            start = time.perf_counter()
            summary = train_detector(
                data,
                Path(tmp) / "model",
                denoiser=denoiser,
                denoiser_overrides=sizes.dit_overrides or None,
                training=config,
                image_size=sizes.image_size,
                cache_dir=Path(tmp) / "cache",
                device=str(device),
                progress=False,
            )
            row.update(
                {
                    "config": denoiser,
                    "steps": summary.steps,
                    "train_s": summary.seconds,
                    "final_loss": summary.final_loss,
                    "wall_s": time.perf_counter() - start,
                }
            )
        if "steps" not in row:
            return
        with rec.step("evaluate", needs_s=10) as row:
            if "skipped" in row:
                return
            report = evaluate_detector(
                summary.detector, data, batch_size=32, timing=False, cache_dir=Path(tmp) / "cache", progress=False
            )
            row.update({k: report.get(k) for k in ("image_auroc", "pixel_auroc", "aupro", "num_images")})


# ----------------------------------------------------------------------------------------------- driver
def _load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_stage(name: str, folder: Path, args: argparse.Namespace) -> None:
    """Run one stage in this process, writing ``folder / f"{name}.json"`` as it goes."""
    sizes = Sizes(args.dry_run)
    device = torch.device("cpu" if args.dry_run else args.device)
    if args.dry_run:  # torch.compile runs the code path without compiling (seconds instead of minutes)
        torch._dynamo.config.disable = True
    rec = Recorder(folder / f"{name}.json", time.monotonic() + STAGES[name] - 5)
    rec.data["stage"] = name
    rec.save()
    start = time.perf_counter()
    try:
        if name == "training":
            stage_training(rec, sizes, device, args.data, args.train_denoiser)
        else:
            {
                "environment": stage_environment,
                "default_detector": stage_default_detector,
                "dit-b": stage_dit_b,
                "dit-g": stage_dit_g,
            }[name](rec, sizes, device)
        rec.data["status"] = "ok"
    except Exception as err:
        rec.data["status"] = f"failed: {type(err).__name__}: {err}"
        rec.data["errors"].append({"step": name, "traceback": traceback.format_exc(limit=8)})
    rec.data["seconds"] = time.perf_counter() - start
    rec.save()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line; returns the merged results (also written to ``--out``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "gpu_check.json")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA / "mvtec3d_tire", help="category for training")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    parser.add_argument("--train-denoiser", default="dit-b", help="the DiT preset of the training stage")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU, to test the script")
    parser.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="each stage in its own time-boxed process (default: yes, except with --dry-run)",
    )
    parser.add_argument("--stage-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--stage-dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage_child:
        run_stage(args.stage_child, args.stage_dir, args)
        return {}
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or use --dry-run to test the script on the CPU")
    isolate = (not args.dry_run) if args.isolate is None else args.isolate
    result: dict[str, Any] = {"benchmark": "gpu_check", "dry_run": args.dry_run, "command": sys.argv, "stages": {}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name in args.stages:
            start = time.perf_counter()
            if isolate:
                command = [
                    sys.executable,
                    __file__,
                    "--stage-child",
                    name,
                    "--stage-dir",
                    str(folder),
                    "--data",
                    str(args.data),
                    "--device",
                    args.device,
                    "--train-denoiser",
                    args.train_denoiser,
                ]
                command += ["--dry-run"] if args.dry_run else []
                try:
                    done = subprocess.run(command, capture_output=True, text=True, timeout=STAGES[name])
                    status = None if done.returncode == 0 else f"exit {done.returncode}: {done.stderr[-2000:]}"
                except subprocess.TimeoutExpired:
                    status = f"killed at the {STAGES[name]:.0f} s time box"
            else:
                run_stage(name, folder, args)
                status = None
            stage = _load(folder / f"{name}.json") or {"rows": []}
            if status is not None:
                stage["status"] = status
            stage["wall_s"] = time.perf_counter() - start
            result["stages"][name] = stage
            tmp_out = args.out.with_name(f".{args.out.name}.tmp")
            tmp_out.write_text(json.dumps(result, indent=2, default=str))
            os.replace(tmp_out, args.out)
            print(f"{name}: {stage.get('status')} in {stage['wall_s']:.1f} s", flush=True)
    return result


if __name__ == "__main__":
    main()
