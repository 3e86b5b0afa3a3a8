"""Training cost of the DiT presets at the paper's scale: seconds per step on EfficientNet-B4-sized features.

InvAD trains a DiT on EfficientNet-B4 features (272 x 16 x 16) with batch 8 per GPU for 300 epochs (unified;
METHOD.md section 6). This times one training step (forward and backward of a batch of 8, plus 10 % for the
optimiser: the trainer's own planner estimate, ``invert_ad.training.loop``) of each preset on random features of
that shape, in float32 and under bf16 autocast, on this machine, and converts it to time per epoch of MVTec AD's
3,629 training images. Presets too large for the machine (DiT-g: about 19 GB of weights, gradients and AdamW
state) are left out and say so.

Command that produced ``benchmarks/results/paper_scale.json``::

    .venv/bin/python benchmarks/paper_scale.py --threads 1
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from diffusers import DDPMScheduler

from invert_ad.models import create_denoiser
from invert_ad.schedule import alphas_cumprod_of
from invert_ad.training import TrainingConfig
from invert_ad.training.loop import _time_per_step

from common import RESULTS_DIR, add_threads_argument, markdown_table, run_info, write_results

MVTEC_TRAIN_IMAGES = 3629
BATCH = 8
EPOCHS = 300


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["dit-s", "dit-b"])
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "paper_scale.json")
    add_threads_argument(parser)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    features = torch.randn(64, 272, 16, 16)
    alphas_cumprod = alphas_cumprod_of(DDPMScheduler())
    steps_per_epoch = math.ceil(MVTEC_TRAIN_IMAGES / BATCH)
    rows = []
    for preset in args.presets:
        model = create_denoiser(preset, 272, 16)
        params = sum(p.numel() for p in model.parameters())
        for dtype in (None, "bfloat16"):
            config = TrainingConfig(steps=10, batch_size=BATCH, autocast_dtype=dtype)
            seconds = _time_per_step(model, features, config, alphas_cumprod, probes=2)
            rows.append(
                {
                    "preset": preset,
                    "parameters": params,
                    "dtype": dtype or "float32",
                    "seconds_per_step": seconds,
                    "hours_per_epoch": seconds * steps_per_epoch / 3600,
                    "hours_for_300_epochs": seconds * steps_per_epoch * EPOCHS / 3600,
                }
            )
            print(rows[-1], flush=True)
    result = {"benchmark": "paper_scale", "run": run_info(), "steps_per_epoch": steps_per_epoch, "rows": rows}
    md = (
        f"# DiT training cost at the paper's scale (272 x 16 x 16 features, batch {BATCH}, "
        f"{steps_per_epoch} steps per MVTec AD epoch)\n\n"
        + markdown_table(rows, list(rows[0]))
        + "\n\nDiT-g (1.2e9 parameters) is not timed here: its weights, gradients and AdamW state (about 19 GB) "
        "do not fit beside the rest of this machine's work; it is a GPU preset.\n"
    )
    write_results(args.out, result, md)


if __name__ == "__main__":
    main()
