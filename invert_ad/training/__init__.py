"""A minimal trainer for feature-space diffusion: eps-MSE, AdamW, warm-up + cosine, EMA, resumable, DDP.

:func:`train_detector` (in :mod:`invert_ad.training.train`) is the main job built on it; it is imported
lazily so that the loop itself needs no backbone or dataset code.
"""

from .config import TrainingConfig
from .loop import CHECKPOINT_NAME, TrainResult, init_distributed_from_env, rank_and_world, train_denoiser
from .lr_schedule import ema_decay_at, learning_rate_at

__all__ = [
    "CHECKPOINT_NAME",
    "TrainResult",
    "TrainingConfig",
    "ema_decay_at",
    "init_distributed_from_env",
    "learning_rate_at",
    "rank_and_world",
    "train_denoiser",
]
