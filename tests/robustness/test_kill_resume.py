"""SIGKILL a training process after its first checkpoint, resume in a new process: bit-identical to no kill.

Three processes run the same script (tiny model, fixed seed, one thread each): an uninterrupted reference,
a victim killed with SIGKILL as soon as ``checkpoint.pt`` appears, and a resumption in a fresh process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import torch

from invert_ad.io import load_torch_checkpoint
from invert_ad.training import CHECKPOINT_NAME

STEPS = 40
CHECKPOINT_EVERY = 4

SCRIPT = f"""
import sys, time
import torch
torch.set_num_threads(1)
from invert_ad.schedule import linear_alphas_cumprod
from invert_ad.training import TrainingConfig, train_denoiser

checkpoint_dir, out, delay = sys.argv[1] or None, sys.argv[2], float(sys.argv[3])


class TinyEps(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Conv2d(4, 16, 3, padding=1)
        self.out = torch.nn.Conv2d(16, 3, 3, padding=1)

    def forward(self, x, t):
        tt = (t.float() / 1000).reshape(-1, 1, 1, 1).expand(-1, 1, *x.shape[2:])
        return self.out(torch.nn.functional.silu(self.inp(torch.cat([x, tt], 1))))


torch.manual_seed(0)
model = TinyEps()
features = 2.0 + 0.3 * torch.randn(32, 3, 4, 4, generator=torch.Generator().manual_seed(1))
calls = [0]


def hook(module, args):
    calls[0] += 1
    if delay:
        time.sleep(delay)  # slow enough to be killed half-way; the arithmetic is unchanged


model.register_forward_pre_hook(hook)
config = TrainingConfig(
    steps={STEPS}, minutes=None, checkpoint_every={CHECKPOINT_EVERY}, batch_size=8, learning_rate=2e-3, seed=5
)
result = train_denoiser(model, features, linear_alphas_cumprod(), config, checkpoint_dir=checkpoint_dir, progress=False)
torch.save(
    {{
        "ema": result.model.state_dict(),
        "model": model.state_dict(),
        "losses": torch.tensor(result.losses, dtype=torch.float64),
        "steps": result.steps,
        "calls": calls[0],
    }},
    out,
)
"""


def _start(checkpoint_dir, out, delay: float) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(checkpoint_dir or ""), str(out), str(delay)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _finish(process: subprocess.Popen, timeout: float = 180) -> None:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output.decode()[-3000:]


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    reference = _start(None, tmp_path / "reference.pt", 0.0)
    victim = _start(checkpoints, tmp_path / "victim.pt", 0.1)  # 4 s in all: killed long before
    deadline = time.monotonic() + 180
    while not (checkpoints / CHECKPOINT_NAME).is_file():
        assert victim.poll() is None, "the victim ended before writing a checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 180 s"
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    assert not (tmp_path / "victim.pt").exists()
    killed_at = load_torch_checkpoint(checkpoints / CHECKPOINT_NAME)["step"]
    assert 0 < killed_at < STEPS and killed_at % CHECKPOINT_EVERY == 0

    resumed = _start(checkpoints, tmp_path / "resumed.pt", 0.0)
    _finish(resumed)
    _finish(reference)
    ref = load_torch_checkpoint(tmp_path / "reference.pt")
    res = load_torch_checkpoint(tmp_path / "resumed.pt")
    assert res["calls"] == STEPS - killed_at, "the new process did not continue from the checkpoint"
    assert ref["steps"] == res["steps"] == STEPS
    assert torch.equal(ref["losses"], res["losses"]), "losses differ from the uninterrupted run"
    for part in ("model", "ema"):
        assert ref[part].keys() == res[part].keys()
        for name, value in ref[part].items():
            assert torch.equal(value, res[part][name]), f"{part}.{name} differs from the uninterrupted run"
