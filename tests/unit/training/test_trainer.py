"""The trainer: learns, resumes exactly, and two gloo processes equal one process with the same global batch."""

import math
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

from invert_ad.schedule import linear_alphas_cumprod
from invert_ad.training import TrainingConfig, ema_decay_at, learning_rate_at, train_denoiser

AB = linear_alphas_cumprod()


class TinyEps(torch.nn.Module):
    def __init__(self, channels=3):
        super().__init__()
        self.inp = torch.nn.Conv2d(channels + 1, 32, 3, padding=1)
        self.out = torch.nn.Conv2d(32, channels, 3, padding=1)

    def forward(self, x, t):
        tt = (t.float() / 1000).reshape(-1, 1, 1, 1).expand(-1, 1, *x.shape[2:])
        return self.out(torch.nn.functional.silu(self.inp(torch.cat([x, tt], 1))))


def data(n=64):
    g = torch.Generator().manual_seed(0)
    return 2.0 + 0.3 * torch.randn(n, 3, 4, 4, generator=g)


def make_model():
    torch.manual_seed(0)
    return TinyEps()


def test_schedules_by_hand():
    assert learning_rate_at(0, 100, 1.0, 0.0, 0.1) == pytest.approx(0.1)
    assert learning_rate_at(9, 100, 1.0, 0.0, 0.1) == pytest.approx(1.0)
    assert learning_rate_at(10, 100, 1.0, 0.0, 0.1) == pytest.approx(1.0)
    assert learning_rate_at(55, 100, 1.0, 0.0, 0.1) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert learning_rate_at(100, 100, 1.0, 0.1, 0.1) == pytest.approx(0.1)
    assert ema_decay_at(0, 0.999) == pytest.approx(0.1)
    assert ema_decay_at(10**6, 0.999) == 0.999


def test_loss_decreases():
    result = train_denoiser(make_model(), data(), AB, TrainingConfig(steps=150, minutes=None, learning_rate=3e-3))
    first, last = sum(result.losses[:10]) / 10, sum(result.losses[-10:]) / 10
    assert result.steps == 150 and last < 0.6 * first
    assert not any(p.requires_grad for p in result.model.parameters())


def test_time_budget_plans_steps():
    result = train_denoiser(make_model(), data(), AB, TrainingConfig(minutes=0.02, checkpoint_every=10**6))
    assert 1 <= result.steps <= result.total_steps and result.seconds < 10


def test_an_under_planned_time_budget_is_re_planned(monkeypatch: pytest.MonkeyPatch) -> None:
    """A probe that over-estimates the step time 1000-fold (a loaded machine) no longer ends the run early."""
    from invert_ad.training import loop

    monkeypatch.setattr(loop, "_time_per_step", lambda *args, **kwargs: 100.0)  # plans 1 step for 2.4 s
    result = train_denoiser(make_model(), data(), AB, TrainingConfig(minutes=0.04, checkpoint_every=10**6))
    assert result.steps > 2 * loop.REPLAN_EVERY and result.total_steps >= result.steps
    assert result.seconds < 10


def test_on_step_sees_every_step_and_its_time_is_not_charged():
    seen = []

    def evaluate(step, ema):
        assert not ema.training and not any(p.requires_grad for p in ema.parameters())
        seen.append(step)

    config = TrainingConfig(steps=5, minutes=None, checkpoint_every=10**6)
    result = train_denoiser(make_model(), data(), AB, config, on_step=evaluate)
    assert seen == [1, 2, 3, 4, 5] and result.steps == 5
    slow = train_denoiser(
        make_model(), data(), AB, TrainingConfig(steps=4, minutes=0.01), on_step=lambda step, ema: time.sleep(0.4)
    )
    assert slow.steps == 4  # 1.6 s of evaluation inside a 0.6 s budget


class Interrupt(Exception):
    pass


def test_resume_after_interruption_is_exact(tmp_path):
    config = TrainingConfig(steps=24, minutes=None, checkpoint_every=8, learning_rate=1e-3)
    reference = train_denoiser(make_model(), data(), AB, config, progress=False)

    model = make_model()
    calls = {"n": 0}

    def crash(*_):
        calls["n"] += 1
        if calls["n"] == 13:
            raise Interrupt

    hook = model.register_forward_pre_hook(crash)
    with pytest.raises(Interrupt):
        train_denoiser(model, data(), AB, config, checkpoint_dir=tmp_path, progress=False)
    hook.remove()
    assert (tmp_path / "checkpoint.pt").is_file()
    resumed = train_denoiser(make_model(), data(), AB, config, checkpoint_dir=tmp_path, progress=False)
    assert resumed.steps == 24 and resumed.losses == reference.losses
    for a, b in zip(resumed.model.state_dict().values(), reference.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="other settings"):
        train_denoiser(make_model(), data(), AB, TrainingConfig(steps=24, minutes=None, seed=1), tmp_path)


def test_bad_config_and_data():
    with pytest.raises(ValueError, match="budget"):
        TrainingConfig(steps=None, minutes=None)
    with pytest.raises(ValueError, match="NaN"):
        train_denoiser(make_model(), data() * float("nan"), AB, TrainingConfig(steps=1, minutes=None))
    with pytest.raises(ValueError, match="non-empty"):
        train_denoiser(make_model(), torch.zeros(0, 3, 4, 4), AB, TrainingConfig(steps=1, minutes=None))


def _ddp_worker(rank, world, port, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        config = TrainingConfig(steps=6, minutes=None, batch_size=16, learning_rate=1e-3, autocast_dtype=None)
        result = train_denoiser(make_model(), data(), AB, config, progress=False)
        if rank == 0:
            torch.save({"state": result.model.state_dict(), "losses": result.losses}, out)
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_match_one_process(tmp_path):
    """In float32 (bf16 autocast rounds each process's half batch differently) N processes take one's steps."""
    out = tmp_path / "ddp.pt"
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=True)
    single = train_denoiser(
        make_model(),
        data(),
        AB,
        TrainingConfig(steps=6, minutes=None, batch_size=16, learning_rate=1e-3, autocast_dtype=None),
        progress=False,
    )
    for a, b in zip(ddp["state"].values(), single.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert ddp["losses"] == pytest.approx(single.losses, rel=1e-5)


def test_auto_autocast_follows_the_hardware(monkeypatch):
    from invert_ad.training.loop import resolve_autocast_dtype

    cpu = torch.device("cpu")
    assert resolve_autocast_dtype(None, cpu) is None and resolve_autocast_dtype("float16", cpu) == "float16"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert resolve_autocast_dtype("auto", cpu) is None
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert resolve_autocast_dtype("auto", cpu) == "bfloat16"
    config = TrainingConfig(steps=2, minutes=None, batch_size=4, autocast_dtype="auto")
    result = train_denoiser(make_model(), data(8), AB, config, progress=False)
    assert result.autocast_dtype == "bfloat16" and result.steps == 2  # the record holds what ran
    with pytest.raises(ValueError, match="'auto'"):
        TrainingConfig(autocast_dtype="bf16")
