"""Training settings: the paper's recipe (METHOD.md section 6) scaled to minutes on a CPU."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["TrainingConfig"]


@dataclass
class TrainingConfig:
    """How to train a feature-space epsilon model.

    Args:
        steps: optimiser steps. If ``None``, derived from ``minutes`` by timing a few steps first.
        minutes: wall-clock budget; training also stops when it runs out.
        batch_size: global batch (split over data-parallel processes).
        learning_rate: peak learning rate after linear warm-up.
        min_learning_rate: end of the cosine decay.
        warmup_fraction: share of the steps spent warming up linearly from ``min_learning_rate``.
        weight_decay: AdamW weight decay (0 in the paper).
        grad_clip: max gradient norm.
        ema_decay: decay of the exponential moving average used for inference (warmed up early on).
        autocast_dtype: ``"bfloat16"`` or ``"float16"`` to train under autocast, ``None`` for float32, or
            ``"auto"``: bfloat16 where the hardware runs it natively (a CPU with AVX512-BF16 or AMX, a CUDA device
            with bf16 support), else float32 (:func:`~invert_ad.training.loop.resolve_autocast_dtype`).
        checkpoint_every: steps between resumable checkpoints.
        seed: seeds the generator that draws batches, timesteps and noise.
    """

    steps: int | None = None
    minutes: float | None = 10.0
    batch_size: int = 32
    learning_rate: float = 5e-4
    min_learning_rate: float = 1e-5
    warmup_fraction: float = 0.05
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    autocast_dtype: str | None = "auto"
    checkpoint_every: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps is None and self.minutes is None:
            raise ValueError("give a step budget (steps) or a time budget (minutes)")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be positive, got {self.steps}")
        if self.minutes is not None and self.minutes <= 0:
            raise ValueError(f"minutes must be positive, got {self.minutes}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must lie in [0, 1), got {self.warmup_fraction}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        if self.autocast_dtype not in (None, "auto", "bfloat16", "float16"):
            raise ValueError(
                f"autocast_dtype must be None, 'auto', 'bfloat16' or 'float16', got {self.autocast_dtype!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
