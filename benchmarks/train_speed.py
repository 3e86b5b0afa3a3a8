"""Training throughput on this machine: steps per minute of a denoiser under float32 and bf16 autocast.

For each ``--autocast`` setting, :func:`invert_ad.training.train_denoiser` takes ``--steps`` fixed steps of the
preset on one category's training features (batch ``--batch-size``) and the wall time gives steps per minute;
the first step (allocation, kernel selection) is excluded. bf16 numerics are checked on one batch: the relative
error of the bf16-autocast eps prediction and the loss against float32, with the same weights. A last run with
a time budget (``--budget-minutes``) shows how much of it the planner turns into steps.

Command that produced the committed results (2-core CPU shared with other jobs)::

    /work/bin/heavy .venv/bin/python benchmarks/train_speed.py --threads 1 --preset dit-s-edm \\
        --out benchmarks/results/train_speed.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from invert_ad.models import create_denoiser
from invert_ad.schedule import linear_alphas_cumprod
from invert_ad.training import TrainingConfig, train_denoiser

from common import (
    DEFAULT_CACHE_DIR,
    RESULTS_DIR,
    add_threads_argument,
    load_category,
    markdown_table,
    parse_args,
    run_info,
    write_results,
)


def cpu_flags() -> list[str]:
    """The bf16-relevant CPU flags of this machine (``avx512_bf16``, ``amx_bf16``, ...)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(f for f in flags if "bf16" in f or f in ("avx512f", "avx2", "amx_tile"))


def bf16_error(preset: str, features: torch.Tensor, batch_size: int) -> dict[str, float]:
    """Relative error of bf16 autocast against float32 on one batch, for randomly perturbed weights."""
    torch.manual_seed(0)
    model = create_denoiser(preset, features.shape[1], tuple(features.shape[2:])).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ab = linear_alphas_cumprod()
    g = torch.Generator().manual_seed(0)
    t = torch.randint(1000, (batch_size,), generator=g)
    noise = torch.randn((batch_size, *features.shape[1:]), generator=g)
    a = ab[t].float().reshape(-1, 1, 1, 1)
    x_t = a.sqrt() * features[:batch_size] + (1 - a).sqrt() * noise
    with torch.no_grad():
        full = model(x_t, t).sample
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(x_t, t).sample.float()
    loss_full, loss_half = (full - noise).square().mean(), (half - noise).square().mean()
    return {
        "eps_relative_error": float((half - full).norm() / full.norm()),
        "loss_float32": float(loss_full),
        "loss_bf16": float(loss_half),
    }


def main(argv: list[str] | None = None) -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", nargs="+", type=Path, default=None, help="category folder (the first is used)")
    parser.add_argument("--preset", default="dit-s-edm")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--budget-minutes", type=float, default=1.0, help="time-budgeted run (0: skip)")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "train_speed.json")
    add_threads_argument(parser)
    args = parse_args(parser, argv)
    features = load_category(args.data[0], args.cache_dir, progress=False).train
    ab = linear_alphas_cumprod()
    rows: list[dict[str, Any]] = []
    for autocast in (None, "bfloat16"):
        torch.manual_seed(0)
        model = create_denoiser(args.preset, features.shape[1], tuple(features.shape[2:]))
        stamps: list[float] = []
        config = TrainingConfig(
            steps=args.steps, minutes=None, batch_size=args.batch_size, autocast_dtype=autocast, checkpoint_every=10**9
        )
        train_denoiser(
            model,
            features,
            ab,
            config,
            progress=False,
            on_step=lambda s, e, stamps=stamps: stamps.append(time.perf_counter()),
        )
        per_step = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
        rows.append(
            {
                "run": f"{args.steps} steps",
                "autocast": autocast or "float32",
                "s_per_step": per_step,
                "steps_per_min": 60 / per_step,
            }
        )
    if args.budget_minutes:
        torch.manual_seed(0)
        model = create_denoiser(args.preset, features.shape[1], tuple(features.shape[2:]))
        config = TrainingConfig(minutes=args.budget_minutes, batch_size=args.batch_size, checkpoint_every=10**9)
        result = train_denoiser(model, features, ab, config, progress=False)
        rows.append(
            {
                "run": f"--minutes {args.budget_minutes:g}",
                "autocast": "float32",
                "steps": result.steps,
                "seconds": result.seconds,
                "s_per_step": result.seconds / result.steps,
                "steps_per_min": 60 * result.steps / result.seconds,
            }
        )
    numerics = bf16_error(args.preset, features, args.batch_size)
    data = {
        "benchmark": "train_speed",
        "run": run_info(),
        "settings": {"preset": args.preset, "batch_size": args.batch_size, "data": str(args.data[0])},
        "cpu_flags": cpu_flags(),
        "rows": rows,
        "bf16_numerics": numerics,
    }
    markdown = (
        f"# Training throughput: {args.preset}, batch {args.batch_size}\n\nCommand: `{data['run']['command']}`, "
        f"{data['run']['machine']['cpu']}, {data['run']['machine']['torch_threads']} thread(s), load average "
        f"{data['run']['machine']['load_average_1_5_15'][0]:.1f} (shared machine: timings are noisy). CPU flags: "
        f"{', '.join(data['cpu_flags']) or 'none'}.\n\n"
        + markdown_table(rows, ["run", "autocast", "steps", "seconds", "s_per_step", "steps_per_min"])
        + f"\nbf16 autocast against float32 on one batch: eps relative error {numerics['eps_relative_error']:.4f}, "
        f"loss {numerics['loss_float32']:.4f} (float32) vs {numerics['loss_bf16']:.4f} (bf16).\n"
    )
    write_results(args.out, data, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
