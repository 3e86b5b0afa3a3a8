"""A minimal, resumable trainer for feature-space epsilon models, single-process or data-parallel.

Every random draw (batch indices, timesteps, noise) comes from one seeded generator shared by all processes:
each process takes its slice of the global batch, so N processes with DDP take the same steps as one
process with the whole batch, and a run resumed from a checkpoint continues exactly as if never stopped.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..denoiser import make_eps_fn
from ..io import atomic_torch_save, load_torch_checkpoint
from .config import TrainingConfig
from .lr_schedule import ema_decay_at, learning_rate_at

__all__ = ["CHECKPOINT_NAME", "TrainResult", "init_distributed_from_env", "rank_and_world", "train_denoiser"]

CHECKPOINT_NAME = "checkpoint.pt"
REPLAN_EVERY = 10
"""Steps between re-plans of a time-budgeted run's step count from the measured step time."""
_RESUME_KEYS = ("batch_size", "learning_rate", "min_learning_rate", "warmup_fraction", "seed", "ema_decay")


@dataclass
class TrainResult:
    """What training produced.

    Attributes:
        model: the EMA model, in eval mode, gradients off (use it for inference).
        steps: optimiser steps taken in total (including resumed ones).
        total_steps: the planned number of steps.
        losses: the training loss of every step (global batch mean on process 0).
        seconds: wall time of this call.
        autocast_dtype: the autocast dtype the steps ran under (``"auto"`` resolved; ``None``: float32).
    """

    model: torch.nn.Module
    steps: int
    total_steps: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    autocast_dtype: str | None = None


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed_from_env() -> tuple[int, int]:
    """Join the process group that ``torchrun`` describes in the environment (``WORLD_SIZE > 1``).

    Uses NCCL when CUDA is available, else gloo. Does nothing for a single process or when a group exists.

    Returns:
        ``(rank, world_size)``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return rank_and_world()


def _draw(generator: torch.Generator, features: torch.Tensor, batch_size: int, num_timesteps: int):
    idx = torch.randint(features.shape[0], (batch_size,), generator=generator)
    t = torch.randint(num_timesteps, (batch_size,), generator=generator)
    noise = torch.randn((batch_size, *features.shape[1:]), generator=generator)
    return idx, t, noise


def resolve_autocast_dtype(requested: str | None, device: torch.device) -> str | None:
    """The autocast dtype a run uses: ``"auto"`` becomes ``"bfloat16"`` where ``device`` runs bf16 natively (a CPU
    with AVX512-BF16 or AMX tiles, a CUDA device reporting bf16 support), else ``None`` (float32); other values
    are returned as given."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        native = any(getattr(torch.cpu, name, lambda: False)() for name in probes)
        return "bfloat16" if native else None
    return None


def _loss(model, features, idx, t, noise, alphas_cumprod, autocast_dtype):
    device = next(model.parameters()).device
    x0 = features[idx].to(device)
    t, noise = t.to(device), noise.to(device)
    a = alphas_cumprod.to(device)[t].float().reshape(-1, *([1] * (x0.dim() - 1)))
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    eps_fn = make_eps_fn(model, alphas_cumprod, "epsilon")
    if autocast_dtype is None:
        pred = eps_fn(x_t, t)
    else:
        with torch.autocast(device.type, dtype=getattr(torch, autocast_dtype)):
            pred = eps_fn(x_t, t)
    return (pred.float() - noise).square().mean()


def _time_per_step(model, features, config, alphas_cumprod, probes: int = 3) -> float:
    """Seconds per optimiser step, measured on a throwaway copy (no state of the run changes)."""
    trial = copy.deepcopy(model).train()
    generator = torch.Generator().manual_seed(config.seed + 1)
    _, world = rank_and_world()
    local = config.batch_size // world
    times = []
    for _ in range(probes + 1):
        start = time.perf_counter()
        idx, t, noise = _draw(generator, features, local, len(alphas_cumprod))
        _loss(trial, features, idx, t, noise, alphas_cumprod, config.autocast_dtype).backward()
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[len(times[1:]) // 2] * 1.1  # median after a warm-up call, plus optimiser overhead


def _replan(step: int, per_step: float, deadline: float, world: int) -> int:
    """The step count that ends at ``deadline`` at ``per_step`` seconds per step, at least ``step`` (agreed on
    by all processes)."""
    planned = step + max(0, int((deadline - time.perf_counter()) / per_step))
    if world > 1:
        planned_t = torch.tensor([planned], dtype=torch.int64)
        dist.all_reduce(planned_t, op=dist.ReduceOp.MIN)
        planned = int(planned_t.item())
    return planned


def train_denoiser(
    model: torch.nn.Module,
    features: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    config: TrainingConfig | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    progress: bool = True,
    on_step: Callable[[int, torch.nn.Module], None] | None = None,
) -> TrainResult:
    """Train ``model`` to predict the noise added to ``features`` (eps-MSE, t ~ U{0..T-1}).

    With a time budget and no fixed ``steps``, the step count is first planned from a few timed steps on a
    throwaway copy, then re-planned every :data:`REPLAN_EVERY` steps from the measured time per step, so the
    learning-rate schedule ends when the budget does (a probe on a loaded machine no longer ends a run early).

    Args:
        model: an epsilon network called as ``model(x_t, t)``; trained in place, on its own device.
        features: ``(N, C, h, w)`` training features (normal images only), on the CPU.
        alphas_cumprod: float64 ``(T,)`` alpha-bars of the training schedule.
        config: the recipe (defaults: :class:`TrainingConfig`).
        checkpoint_dir: where to keep ``checkpoint.pt``; a run finding one there resumes from it.
        progress: show a progress bar with the loss.
        on_step: called as ``on_step(step, ema_model)`` after every step (``step`` counts from 1), e.g. an
            evaluation for a learning curve; single-process runs only. It must not change the model; its time
            is not charged to the budget (the deadline moves by it).

    Returns:
        A :class:`TrainResult` holding the EMA model.

    Raises:
        ValueError: empty or non-finite features, a batch that does not split over the processes, ``on_step``
            with several processes, or a checkpoint made with other settings.
    """
    config = config or TrainingConfig()
    device = next(model.parameters()).device
    config = replace(config, autocast_dtype=resolve_autocast_dtype(config.autocast_dtype, device))
    if features.dim() < 2 or features.shape[0] == 0:
        raise ValueError(f"need a non-empty batch of training features, got shape {tuple(features.shape)}")
    if not torch.isfinite(features).all():
        raise ValueError("training features contain NaN or infinite values")
    rank, world = rank_and_world()
    if config.batch_size % world:
        raise ValueError(f"batch_size {config.batch_size} does not split over {world} processes")
    if on_step is not None and world > 1:
        raise ValueError("on_step is for single-process runs (processes would disagree on the deadline)")
    local = config.batch_size // world
    start_time = time.perf_counter()

    model.train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(
        trainable, lr=config.learning_rate, betas=(0.9, 0.999), weight_decay=config.weight_decay
    )
    generator = torch.Generator().manual_seed(config.seed)
    step, losses, total_steps = 0, [], config.steps

    checkpoint_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    if checkpoint_path is not None and checkpoint_path.is_file():
        state = load_torch_checkpoint(checkpoint_path)
        saved = state["config"]
        changed = {k: (saved.get(k), getattr(config, k)) for k in _RESUME_KEYS if saved.get(k) != getattr(config, k)}
        if changed:
            raise ValueError(f"{checkpoint_path} was made with other settings (saved, now): {changed}")
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        step, losses, total_steps = state["step"], list(state["losses"]), state["total_steps"]

    if total_steps is None:
        per_step = _time_per_step(model, features, config, alphas_cumprod)
        if world > 1:  # all processes must agree on the plan
            per_step_t = torch.tensor([per_step], dtype=torch.float64)
            dist.all_reduce(per_step_t, op=dist.ReduceOp.MAX)
            per_step = per_step_t.item()
        total_steps = max(1, int(config.minutes * 60 / per_step))
    replan = config.steps is None
    deadline = start_time + config.minutes * 60 if config.minutes is not None else float("inf")

    network = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        network = DistributedDataParallel(model)

    def save_checkpoint() -> None:
        if checkpoint_path is None or rank != 0:
            return
        atomic_torch_save(
            {
                "model": model.state_dict(),
                "ema": ema.state_dict(),
                "optimizer": optimizer.state_dict(),
                "generator": generator.get_state(),
                "step": step,
                "total_steps": total_steps,
                "losses": losses,
                "config": config.to_dict(),
            },
            checkpoint_path,
        )

    bar = tqdm(total=total_steps, initial=step, desc="training", disable=not progress or rank != 0, unit="step")
    first_step, step_seconds = step, 0.0
    while step < total_steps and time.perf_counter() < deadline:
        step_start = time.perf_counter()
        lr = learning_rate_at(step, total_steps, config.learning_rate, config.min_learning_rate, config.warmup_fraction)
        for group in optimizer.param_groups:
            group["lr"] = lr
        idx, t, noise = _draw(generator, features, config.batch_size, len(alphas_cumprod))
        part = slice(rank * local, (rank + 1) * local)
        loss = _loss(network, features, idx[part], t[part], noise[part], alphas_cumprod, config.autocast_dtype)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
        optimizer.step()
        with torch.no_grad():
            decay = ema_decay_at(step, config.ema_decay)
            for e, p in zip(ema.parameters(), model.parameters(), strict=True):
                e.lerp_(p.detach(), 1.0 - decay)
            for e, b in zip(ema.buffers(), model.buffers(), strict=True):
                e.copy_(b)
        loss = loss.detach()
        if world > 1:
            loss = loss.clone()
            dist.all_reduce(loss)
            loss /= world
        losses.append(loss.item())
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{lr:.1e}")
        if step % config.checkpoint_every == 0:
            save_checkpoint()
        step_seconds += time.perf_counter() - step_start
        if replan and ((step - first_step) % REPLAN_EVERY == 0 or step >= total_steps):
            total_steps = _replan(step, step_seconds / (step - first_step), deadline, world)
            bar.total = total_steps
        if on_step is not None:
            paused = time.perf_counter()
            on_step(step, ema)
            deadline += time.perf_counter() - paused
    bar.close()
    save_checkpoint()
    model.eval()
    return TrainResult(ema, step, total_steps, losses, time.perf_counter() - start_time, config.autocast_dtype)
