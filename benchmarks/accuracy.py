"""Accuracy of every InvAD scoring variant on the same trained model, beside PatchCore- and PaDiM-style baselines.

For each category and each denoiser configuration (:data:`common.DENOISER_CONFIGS`), a detector is trained with
:func:`invert_ad.training.train_detector` under a time (or step) budget and saved in ``--runs-dir`` (a later
run re-uses it instead of training again). Its denoiser is then scored, without retraining, by:

* hybrid with the paper grid (calls at 0, 333, 666), with the official grid (0, 500, 999, terminal ab 0), and
  with 5 and 10 uniform calls; the paper-grid hybrid also with the official transductive min-max over the test
  set (parity with the official evaluation only);
* NLL alone and max-min alone on the paper grid;
* one-step IRF at t = 500 (hybrid and max of the norm map);
* the reconstruction baseline (noise to t_r with fixed noise, DDIM back in NFE calls, score = max residual
  norm) for NFE in ``--recon-nfe`` and t_r in ``--recon-timesteps``;

plus the baselines of :mod:`baselines`. Every calibration (the hybrid's normalisation) is fitted on the held-out
normal training images, never on the test set. Maps are upsampled bilinearly to 256 px with no smoothing;
metrics are exact (sort-based). Results are written after every finished (category, configuration), and a
re-run skips what the JSON already holds (``--force`` redoes it).

Commands that produced the committed results (2-core CPU shared with other jobs)::

    .venv/bin/python benchmarks/accuracy.py --configs gaussian gaussian-diag \\
        --out benchmarks/results/accuracy_gaussian.json
    .venv/bin/python benchmarks/accuracy.py --configs residual-conv-128x2 --minutes 8 --threads 1 \\
        --out benchmarks/results/accuracy_residual_conv.json
    .venv/bin/python benchmarks/accuracy.py --configs residual-mlp-256x2 --minutes 8 --threads 1 --recon-nfe 3 \\
        --out benchmarks/results/accuracy_residual_mlp.json
    .venv/bin/python benchmarks/accuracy.py --configs dit-s --minutes 8 --threads 1 --recon-nfe 3 \\
        --out benchmarks/results/accuracy_dit_s.json
    /work/bin/heavy .venv/bin/python benchmarks/accuracy.py --configs dit-s-skip --minutes 10 --threads 1 \\
        --library-planner --recon-nfe --extra-calls --data ../shared/data/mtd_magnetic_tile \\
        ../shared/data/mvtec3d_tire --out benchmarks/results/accuracy_dit_s_skip.json

(``--library-planner`` makes the training exactly ``invert-ad train --minutes 10``.)

(``--data`` defaults to every category of ``../shared/data``.)
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler
from tqdm.auto import tqdm

from invert_ad.detector import AnomalyDetector
from invert_ad.io import atomic_write_json
from invert_ad.metrics import METRIC_KEYS
from invert_ad.models import create_denoiser
from invert_ad.schedule import linear_alphas_cumprod
from invert_ad.scorer import InversionScorer
from invert_ad.scoring import HybridScorer, MaxMinScorer, MaxNormScorer, NLLScorer, Scorer
from invert_ad.training import TrainingConfig
from invert_ad.training.train import train_detector

from baselines import run_baselines
from common import (
    DEFAULT_CACHE_DIR,
    DEFAULT_RUNS_DIR,
    DENOISER_CONFIGS,
    RESULTS_DIR,
    CategoryFeatures,
    DenoiserConfig,
    add_threads_argument,
    evaluate_maps,
    load_category,
    load_json_file,
    load_results,
    markdown_table,
    parse_args,
    run_info,
    write_results,
)

TRAIN_INFO = "benchmark_train_info.json"


@dataclass(frozen=True)
class Variant:
    """One way of scoring with a trained denoiser.

    Attributes:
        name: the table row.
        latent: keyword arguments of :class:`InversionScorer` that decide the latent (grid, IRF t, ...): variants
            with equal ``latent`` share one computation.
        make_scorer: builds the scorer that reads the latent.
    """

    name: str
    latent: tuple[tuple[str, Any], ...]
    make_scorer: Callable[[], Scorer]


def _latent(**kwargs: Any) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(kwargs.items()))


def build_variants(recon_nfe: list[int], recon_timesteps: list[int], extra_calls: list[int]) -> list[Variant]:
    """The scoring variants of issue 6 (and the 5 / 10-call hybrids of issue 9)."""
    paper = _latent(timesteps="paper", scoring="hybrid")
    variants = [
        Variant("hybrid, paper grid", paper, HybridScorer),
        Variant("hybrid, paper grid, transductive min-max", paper, lambda: HybridScorer(normalization="test-minmax")),
        Variant("NLL, paper grid", paper, NLLScorer),
        Variant("max-min, paper grid", paper, MaxMinScorer),
        Variant("max norm, paper grid", paper, MaxNormScorer),
        Variant("hybrid, official grid", _latent(timesteps="official", scoring="hybrid"), HybridScorer),
    ]
    variants += [
        Variant(f"hybrid, {s} uniform calls", _latent(timesteps=s, scoring="hybrid"), HybridScorer) for s in extra_calls
    ]
    irf = _latent(scoring="irf", irf_timestep=500)
    variants += [
        Variant("IRF 1 step t=500, hybrid", irf, lambda: HybridScorer(latent="irf")),
        Variant("IRF 1 step t=500, max norm", irf, lambda: MaxNormScorer(latent="irf")),
    ]
    for nfe in recon_nfe:
        for t_r in recon_timesteps:
            if nfe > t_r:
                continue
            key = _latent(scoring="reconstruction", reconstruction_timestep=t_r, reconstruction_steps=nfe)
            variants.append(
                Variant(f"reconstruction NFE {nfe}, t_r={t_r}", key, lambda: MaxNormScorer(latent="reconstruction"))
            )
    return variants


def _num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def seconds_per_step(
    config: DenoiserConfig, category: CategoryFeatures, batch_size: int = 32, warmup: int = 3, probes: int = 8
) -> float:
    """Median seconds of one training step (forward, backward, AdamW) of a throwaway copy, after a warm-up.

    The library's own time-budget planner probes a single step after one warm-up call; on a shared machine that
    can under-plan a run several-fold (a first attempt here planned 78 steps for 8 minutes, where about 1500
    fitted), and the run then stops early. This probe is longer, and :func:`train_or_load` gives the trainer an
    explicit step plan with the time budget as a hard cap.
    """
    overrides = dict(config.overrides)
    if config.preset.startswith("gaussian"):
        overrides["features"] = category.train
    model = create_denoiser(config.preset, in_channels=category.train.shape[1], grid_size=16, **overrides).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    alphas_cumprod = linear_alphas_cumprod()
    generator = torch.Generator().manual_seed(123)
    times = []
    for _ in range(warmup + probes):
        start = time.perf_counter()
        idx = torch.randint(len(category.train), (batch_size,), generator=generator)
        t = torch.randint(len(alphas_cumprod), (batch_size,), generator=generator)
        noise = torch.randn((batch_size, *category.train.shape[1:]), generator=generator)
        a = alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
        x_t = a.sqrt() * category.train[idx] + (1 - a).sqrt() * noise
        loss = (model(x_t, t).sample - noise).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[warmup:])


@torch.inference_mode()
def denoising_loss(
    denoiser: torch.nn.Module, features: torch.Tensor, draws: int = 4, seed: int = 0, max_images: int = 128
) -> float:
    """The training objective (eps-MSE, t ~ U{0..T-1}) on given features with fixed draws: comparable across models.

    Run on the held-out normal features it tells whether a trained residual improved on its Gaussian start.
    """
    generator = torch.Generator().manual_seed(seed)
    features = features[:max_images]
    alphas_cumprod = linear_alphas_cumprod()
    total, count = 0.0, 0
    for _ in range(draws):
        for chunk in features.split(64):
            t = torch.randint(len(alphas_cumprod), (len(chunk),), generator=generator)
            noise = torch.randn(chunk.shape, generator=generator)
            a = alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
            pred = denoiser(a.sqrt() * chunk + (1 - a).sqrt() * noise, t).sample
            total += float((pred - noise).square().sum())
            count += noise.numel()
    return total / count


def train_or_load(
    category: CategoryFeatures,
    config: DenoiserConfig,
    training: TrainingConfig,
    runs_dir: Path,
    cache_dir: Path,
    retrain: bool,
    plan_steps: bool = True,
) -> tuple[AnomalyDetector, dict[str, Any]]:
    """Train (or fit) the detector of ``config`` on ``category``, or load the one saved by an earlier run.

    Args:
        category: the category (its folder is what the trainer reads).
        config: the denoiser configuration.
        training: the recipe; with ``minutes`` and no ``steps`` and ``plan_steps``, the step count is planned
            by :func:`seconds_per_step` and ``minutes`` stays the hard cap.
        runs_dir: where models live (``<runs_dir>/<category>/<config>-<budget>``).
        cache_dir: the feature cache.
        retrain: train even if the model folder holds a finished model.
        plan_steps: plan the steps here (see :func:`seconds_per_step`).

    Returns:
        The detector and a dict describing the training (steps, seconds, loss, plan).
    """
    budget = f"{training.steps}steps" if training.steps else f"{training.minutes:g}min"
    if training.autocast_dtype:  # a model trained in another precision is another model
        budget += f"-{training.autocast_dtype}"
    model_dir = runs_dir / category.name / (config.name + (f"-{budget}" if config.trained else ""))
    info_path = model_dir / TRAIN_INFO
    if info_path.is_file() and not retrain:
        detector = AnomalyDetector.from_pretrained(model_dir)
        info = load_json_file(info_path)
        info["loaded_from"] = str(model_dir)
        return detector, info
    plan: dict[str, Any] = {}
    if config.trained and plan_steps and training.steps is None and training.minutes is not None:
        per_step = seconds_per_step(config, category, training.batch_size)
        planned = max(1, int(training.minutes * 60 / per_step))
        plan = {"probe_seconds_per_step": round(per_step, 3), "planned_steps": planned}
        training = dataclasses.replace(training, steps=planned)
    start = time.perf_counter()
    summary = train_detector(
        category.root,
        model_dir,
        denoiser=config.preset,
        denoiser_overrides=config.overrides,
        training=training,
        cache_dir=cache_dir,
    )
    info = {
        "model_dir": str(model_dir),
        "steps": summary.steps,
        "train_seconds": round(summary.seconds, 1),
        "total_seconds": round(time.perf_counter() - start, 1),
        "final_loss": summary.final_loss,
        "num_parameters": _num_parameters(summary.detector.scorer.denoiser),
        "num_train": summary.num_train,
        "num_calibration": summary.num_calibration,
        "training": training.to_dict(),
        "verdict": summary.info.get("verdict"),
        "diagnostics": summary.info.get("diagnostics"),
        **plan,
    }
    atomic_write_json(info_path, info)
    return summary.detector, info


def evaluate_variants(
    denoiser: torch.nn.Module,
    scheduler: Any,
    category: CategoryFeatures,
    variants: list[Variant],
    batch_size: int = 64,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Score the test set with every variant; latents shared by several variants are computed once.

    Returns:
        One row per variant: metrics, NFE, seconds per test image for the latent and the grid.
    """
    groups: dict[tuple, list[Variant]] = {}
    for variant in variants:
        groups.setdefault(variant.latent, []).append(variant)
    rows = []
    bar = tqdm(groups.items(), desc=f"variants {category.name}", disable=not progress, unit="latent")
    for key, members in bar:
        settings = dict(key)
        bar.set_postfix_str(str(settings)[:60])
        inverter = InversionScorer(denoiser, scheduler, **settings)
        start = time.perf_counter()
        test_latents = inverter.latents(category.test, batch_size)
        seconds_per_image = (time.perf_counter() - start) / len(category.test)
        holdout_latents = None
        for variant in members:
            scorer = variant.make_scorer()
            if scorer.requires_fit:
                if holdout_latents is None:
                    holdout_latents = inverter.latents(category.holdout, batch_size)
                scorer.fit(holdout_latents)
            result = scorer.score(test_latents)
            row = {
                "category": category.name,
                "variant": variant.name,
                "nfe": inverter.nfe,
                **evaluate_maps(result.raw_score, result.raw_map, category),
                "seconds_per_image": round(seconds_per_image, 5),
                "settings": {**settings, "grid": inverter.grid.to_dict(), "scorer": repr(scorer)},
            }
            if settings.get("scoring") == "hybrid" and holdout_latents is not None:
                row["latent_std_holdout"] = float(holdout_latents.float().std())
                row["latent_std_test_normal"] = float(test_latents[torch.from_numpy(category.labels == 0)].std())
            rows.append(row)
    return rows


def accuracy_markdown(result: dict[str, Any]) -> str:
    """The report: training summary, then one table per category (variants of every config, baselines)."""
    parts = ["# Accuracy: scoring variants on the same trained denoiser, and baselines\n"]
    parts.append(
        f"Command: `{result['run']['command']}`  \ncommit `{result['run']['git_commit']}`"
        f"{' (dirty tree)' if result['run'].get('git_dirty') else ''}, {result['run']['machine']['cpu']}, "
        f"{result['run']['machine']['torch_threads']} threads, load average at start "
        f"{result['run']['machine']['load_average_1_5_15'][0]:.1f} (machine shared with other jobs).\n"
    )
    train_rows = [
        {
            "category": r["category"],
            "config": r["config"]["name"],
            "denoiser": r["config"]["note"],
            "params": r["train"].get("num_parameters"),
            "steps": r["train"].get("steps"),
            "train_s": r["train"].get("train_seconds"),
            "loss": r["train"].get("final_loss"),
            "train_loss_eval": r["train"].get("train_loss_eval"),
            "holdout_loss": r["train"].get("holdout_loss"),
            "status": (r["train"].get("diagnostics") or {}).get("status"),
        }
        for r in result["runs"]
    ]
    if train_rows:
        parts.append(
            "## Training\n\n"
            + markdown_table(
                train_rows,
                list(train_rows[0]),
                {
                    "train_s": "train s",
                    "loss": "last-20 loss",
                    "train_loss_eval": "eps-MSE train",
                    "holdout_loss": "eps-MSE held-out",
                },
            )
        )
    verdicts = [
        f"- {r['category']} / {r['config']['name']}: {r['train']['verdict']}"
        for r in result["runs"]
        if r["train"].get("verdict")
    ]
    if verdicts:
        parts.append("Training verdicts (held-out normal images):\n\n" + "\n".join(verdicts) + "\n")
    columns = ["config", "variant", "nfe", *METRIC_KEYS, "ms_per_image"]
    for name in sorted({r["category"] for r in result["runs"]} | set(result.get("baselines", {}))):
        rows = []
        for run in (r for r in result["runs"] if r["category"] == name):
            for row in run["rows"]:
                rows.append({**row, "config": run["config"]["name"], "ms_per_image": 1000 * row["seconds_per_image"]})
        for row in result.get("baselines", {}).get(name, []):
            rows.append({**row, "config": "baseline", "variant": row["method"], "ms_per_image": None})
        parts.append(
            f"## {name}\n\nms/image: latent computation on the test set at batch 64 (shared by the variants that "
            "read the same latent), noisy.\n\n"
            + markdown_table(rows, columns, {"nfe": "NFE", "ms_per_image": "ms/img"})
        )
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    """Command line."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--data", nargs="+", type=Path, default=None, help="MVTec-layout category folders")
    parser.add_argument(
        "--configs", nargs="+", default=["gaussian"], choices=sorted(DENOISER_CONFIGS), help="denoiser configurations"
    )
    parser.add_argument("--minutes", type=float, default=8.0, help="training time budget per model")
    parser.add_argument("--steps", type=int, default=None, help="training step budget (overrides --minutes)")
    parser.add_argument(
        "--library-planner",
        action="store_true",
        help="let the trainer turn --minutes into steps itself (default: plan here with a longer probe)",
    )
    parser.add_argument("--train-autocast", choices=["bfloat16"], default=None, help="train under bf16 autocast")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "accuracy.json", help="JSON result file")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help="shared feature cache")
    parser.add_argument("--runs-dir", type=Path, default=DEFAULT_RUNS_DIR, help="where trained models are kept")
    parser.add_argument("--recon-nfe", nargs="*", type=int, default=[3, 10, 50], help="reconstruction NFEs")
    parser.add_argument(
        "--recon-timesteps", nargs="*", type=int, default=[100, 300, 500, 800], help="reconstruction noise levels t_r"
    )
    parser.add_argument("--extra-calls", nargs="*", type=int, default=[5, 10], help="more uniform-grid hybrids")
    parser.add_argument("--no-baselines", action="store_true", help="skip PatchCore / PaDiM")
    parser.add_argument(
        "--baselines-json",
        type=Path,
        default=RESULTS_DIR / "baselines.json",
        help="re-use the baseline rows of this baselines.py result when it holds the category (else compute them)",
    )
    parser.add_argument("--force", action="store_true", help="redo what the JSON already holds")
    parser.add_argument("--retrain", action="store_true", help="train again even if a saved model exists")
    parser.add_argument("--batch-size", type=int, default=64, help="images per denoiser call when scoring")
    add_threads_argument(parser)
    args = parse_args(parser, argv)
    data = args.data
    training = TrainingConfig(
        minutes=None if args.steps else args.minutes, steps=args.steps, autocast_dtype=args.train_autocast
    )
    variants = build_variants(args.recon_nfe, args.recon_timesteps, args.extra_calls)
    previous = None if args.force else load_results(args.out)
    result: dict[str, Any] = {
        "benchmark": "accuracy",
        "run": run_info(),
        "settings": {
            "data": [str(d) for d in data],
            "configs": {c: DENOISER_CONFIGS[c].to_dict() for c in args.configs},
            "training": training.to_dict(),
            "variants": [v.name for v in variants],
            "batch_size": args.batch_size,
            "metric_mode": "exact",
            "maps": "feature-grid maps upsampled bilinearly (align_corners=False) to 256 px, no smoothing",
            "calibration": "hybrid normalisation fitted on the held-out 10% of train/good",
        },
        "runs": (previous or {}).get("runs", []),
        "baselines": (previous or {}).get("baselines", {}),
        "categories": (previous or {}).get("categories", {}),
    }
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", clip_sample=False
    )

    def save() -> None:
        write_results(args.out, result, accuracy_markdown(result))

    for root in data:
        category = load_category(root, args.cache_dir)
        result["categories"][category.name] = category.summary()
        if not args.no_baselines and category.name not in result["baselines"]:
            stored = load_results(args.baselines_json) or {}
            rows = [r for r in stored.get("rows", []) if r["category"] == category.name]
            result["baselines"][category.name] = rows or run_baselines(category)
            save()
        for name in args.configs:
            config = DENOISER_CONFIGS[name]
            done = next(
                (r for r in result["runs"] if r["category"] == category.name and r["config"]["name"] == name), None
            )
            if done is not None and "holdout_loss" in done["train"]:
                print(f"skip {category.name} / {name}: already in {args.out}")
                continue
            detector, info = train_or_load(
                category, config, training, args.runs_dir, args.cache_dir, args.retrain, not args.library_planner
            )
            if not torch.allclose(detector.feature_mean, category.mean, atol=1e-5):
                raise RuntimeError("the detector's standardisation differs from the benchmark's: split mismatch")
            denoiser = detector.scorer.denoiser.eval()
            losses = {k: denoising_loss(denoiser, getattr(category, k)) for k in ("train", "holdout")}
            if done is not None:  # an older result without the loss diagnostics: add them, keep the rows
                done["train"].update(holdout_loss=losses["holdout"], train_loss_eval=losses["train"])
                save()
                continue
            info.update(holdout_loss=losses["holdout"], train_loss_eval=losses["train"])
            start = time.perf_counter()
            rows = evaluate_variants(denoiser, scheduler, category, variants, args.batch_size)
            info["evaluation_seconds"] = round(time.perf_counter() - start, 1)
            result["runs"].append(
                {
                    "category": category.name,
                    "config": {**config.to_dict(), "note": config.note},
                    "train": info,
                    "rows": rows,
                }
            )
            save()
    save()
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
