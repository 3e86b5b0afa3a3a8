"""Retrofit a DDAD-style pixel diffusion model with inversion scoring.

Trains a tiny pixel-space UNet (diffusers ``UNet2DModel``, DDAD's setting: images in [-1, 1], linear betas
1e-4 .. 0.02, T = 1000, eps-prediction) on defect-free images for a few hundred steps, then scores the same
checkpoint three ways through :class:`invert_ad.adapters.DDADAdapter`:

- reconstruction (DDAD's kind of inference: noise to t, DDIM back in S steps, per-pixel residual),
- DDIM inversion (InvAD, S = 3: NLL of the inverted latent, and the hybrid NLL + max-min calibrated on
  held-out normal images),
- one-step IRF (OSD-IRF, 1 network call).

Real images come from ``../shared/data/mvtec3d_tire`` (or ``--data``); without them the script runs on
random images so that it still executes end to end (AUROCs are then meaningless). A tiny model trained for
seconds is not a benchmark: this shows the plumbing, not the paper's numbers.

Run: ``python examples/retrofit_ddad.py [--data PATH] [--steps 200] [--size 32]``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import UNet2DModel
from PIL import Image
from sklearn.metrics import roc_auc_score

from invert_ad import InversionScorer
from invert_ad.adapters import DDADAdapter

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec3d_tire"


def load_images(paths: list[Path], size: int) -> torch.Tensor:
    """RGB images resized bilinearly to ``size``: ``(N, 3, size, size)`` in [0, 1]."""
    arrays = [np.asarray(Image.open(p).convert("RGB").resize((size, size), Image.BILINEAR)) for p in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


def load_data(root: Path, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train images, test images and test labels (1 = defective), a small subset of an MVTec-layout category."""
    if not root.is_dir():
        print(f"{root} not found: using random images (AUROCs will be meaningless)")
        train = torch.rand(64, 3, size, size, generator=generator)
        return train, torch.rand(24, 3, size, size, generator=generator), torch.tensor([0] * 12 + [1] * 12)
    train_paths = sorted((root / "train" / "good").glob("*.png"))[:96]
    good = sorted((root / "test" / "good").glob("*.png"))[:16]
    bad = [p for d in sorted((root / "test").iterdir()) if d.name != "good" for p in sorted(d.glob("*.png"))[:6]]
    labels = torch.tensor([0] * len(good) + [1] * len(bad))
    return load_images(train_paths, size), load_images(good + bad, size), labels


def train(adapter: DDADAdapter, images: torch.Tensor, steps: int, generator: torch.Generator) -> None:
    """The DDPM eps objective on ``x0 = adapter.encode(images)``, AdamW, batch 16."""
    unet = adapter.model.train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=2e-3)
    ab = adapter.alphas_cumprod.float()
    x0_all = adapter.encode(images)
    for step in range(steps):
        idx = torch.randint(len(x0_all), (16,), generator=generator)
        t = torch.randint(adapter.num_train_timesteps, (16,), generator=generator)
        noise = torch.randn(x0_all[idx].shape, generator=generator)
        a = ab[t].view(-1, 1, 1, 1)
        loss = torch.nn.functional.mse_loss(unet(a.sqrt() * x0_all[idx] + (1 - a).sqrt() * noise, t).sample, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    unet.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (1 is fastest for a model this small)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)

    train_images, test_images, labels = load_data(args.data, args.size, generator)
    print(f"train {len(train_images)}, test {len(test_images)} ({int(labels.sum())} defective), {args.size} px")
    unet = UNet2DModel(
        sample_size=args.size,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D",) * 3,
        up_block_types=("UpBlock2D",) * 3,
        norm_num_groups=8,
    )
    adapter = DDADAdapter(unet)
    fit_images, train_images = train_images[:16], train_images[16:]  # held out for IRF's hybrid calibration
    start = time.perf_counter()
    train(adapter, train_images, args.steps, generator)
    print(f"trained in {time.perf_counter() - start:.1f} s")

    methods = {
        "reconstruction (t=250)": {"scoring": "reconstruction", "reconstruction_timestep": 250},
        "inversion NLL": {"scoring": "nll", "timesteps": "paper"},
        "inversion hybrid": {"scoring": "hybrid", "timesteps": "paper"},
        "one-step IRF": {"scoring": "irf"},
    }
    print(f"{'method':<24} {'NFE':>4} {'I-AUROC':>8} {'images/s':>9}")
    for name, kwargs in methods.items():
        scorer = InversionScorer(adapter, adapter.scheduler, **kwargs)
        if scorer.requires_fit:
            scorer.fit(adapter.encode(fit_images))
        start = time.perf_counter()
        with adapter.condition(test_images) as x0:
            out = scorer.score(x0)
        rate = len(test_images) / (time.perf_counter() - start)
        auroc = roc_auc_score(labels.numpy(), out.raw_score.numpy())
        print(f"{name:<24} {scorer.nfe:>4} {auroc:>8.3f} {rate:>9.1f}")


if __name__ == "__main__":
    main()
