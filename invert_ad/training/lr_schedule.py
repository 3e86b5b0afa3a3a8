"""Learning-rate and EMA schedules: pure functions of the step."""

from __future__ import annotations

import math

__all__ = ["ema_decay_at", "learning_rate_at"]


def learning_rate_at(step: int, total_steps: int, peak: float, floor: float, warmup_fraction: float) -> float:
    """Linear warm-up from ``floor`` to ``peak``, then cosine decay to ``floor`` at ``total_steps``."""
    warmup = int(warmup_fraction * total_steps)
    if step < warmup:
        return floor + (peak - floor) * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))


def ema_decay_at(step: int, decay: float) -> float:
    """``min(decay, (1 + step) / (10 + step))``: the average follows the weights closely at first."""
    return min(decay, (1.0 + step) / (10.0 + step))
