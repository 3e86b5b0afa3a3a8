"""Timestep grids for inversion and the alpha-bar schedule read from any diffusers scheduler.

A grid is a strictly increasing tuple of integer training timesteps ``t_0 < t_1 < ... < t_S`` plus an
optional terminal alpha-bar. The network is called at the first ``S`` points when a terminal alpha-bar is
given, at all but the last otherwise. Only ``alphas_cumprod`` and ``config.prediction_type`` are read from
a scheduler: its ``step`` is never used (see ``docs/concepts.md``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "BETA_SCHEDULES",
    "GRID_PRESETS",
    "SPACINGS",
    "InversionGrid",
    "alphas_cumprod_of",
    "linear_alphas_cumprod",
    "official_grid",
    "prediction_type_of",
    "resolve_grid",
    "schedule_alphas_cumprod",
    "spaced_grid",
]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

SPACINGS: dict[str, Callable[[float], float]] = {
    "uniform": lambda u: u,
    "quad": lambda u: u**2,
    "cube": lambda u: u**3,
    "exp": lambda u: (math.exp(5.0 * u) - 1.0) / (math.exp(5.0) - 1.0),
}
"""The spacings g(u) of InvAD's table 13, each mapping [0, 1] onto [0, 1] increasingly."""


@dataclass(frozen=True)
class InversionGrid:
    """Points of an Euler DDIM inversion.

    Args:
        points: strictly increasing training timesteps ``t_0 < ... < t_K``.
        terminal_alpha_bar: if ``None``, the network is called at ``points[:-1]`` and the last step lands on
            ``alpha_bar[points[-1]]`` (``K`` network calls). If a float in ``[0, 1)``, the network is called at
            every point and the last step lands on this alpha-bar (``K + 1`` calls). The official InvAD code
            uses ``points=(0, 500, 999)`` with a terminal alpha-bar of ``0``.
    """

    points: tuple[int, ...]
    terminal_alpha_bar: float | None = None

    @property
    def call_points(self) -> tuple[int, ...]:
        """Timesteps at which the network is evaluated, in order."""
        return self.points if self.terminal_alpha_bar is not None else self.points[:-1]

    @property
    def num_calls(self) -> int:
        """Number of network function evaluations (NFE)."""
        return len(self.call_points)

    def validate(self, num_train_timesteps: int) -> InversionGrid:
        """Check the grid against a schedule of ``num_train_timesteps`` steps; return ``self``.

        Raises:
            ValueError: points out of ``[0, T-1]``, not strictly increasing, fewer than one call, or a
                terminal alpha-bar outside ``[0, 1)``.
        """
        pts = self.points
        if len(pts) == 0 or not all(isinstance(p, int) for p in pts):
            raise ValueError(f"grid points must be a non-empty sequence of ints, got {pts!r}")
        if any(p < 0 or p >= num_train_timesteps for p in pts):
            raise ValueError(f"grid points {list(pts)} must lie in [0, {num_train_timesteps - 1}]")
        if any(b <= a for a, b in itertools.pairwise(pts)):
            raise ValueError(f"grid points {list(pts)} must be strictly increasing")
        if self.num_calls < 1:
            raise ValueError(f"grid {list(pts)} makes no network call: give at least two points")
        if self.terminal_alpha_bar is not None and not 0.0 <= self.terminal_alpha_bar < 1.0:
            raise ValueError(f"terminal_alpha_bar must lie in [0, 1), got {self.terminal_alpha_bar}")
        return self

    def alpha_bars(self, alphas_cumprod: torch.Tensor) -> torch.Tensor:
        """Alpha-bar at each step boundary, float64 of shape ``(num_calls + 1,)``."""
        ab = alphas_cumprod.to(torch.float64)
        values = ab[list(self.points)]
        if self.terminal_alpha_bar is not None:
            values = torch.cat([values, values.new_tensor([self.terminal_alpha_bar])])
        return values

    def to_dict(self) -> dict[str, Any]:
        return {"points": list(self.points), "terminal_alpha_bar": self.terminal_alpha_bar}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InversionGrid:
        return cls(tuple(int(p) for p in data["points"]), data.get("terminal_alpha_bar"))


def spaced_grid(num_steps: int, spacing: str = "uniform", num_train_timesteps: int = 1000) -> InversionGrid:
    """``num_steps`` inversion steps from ``0`` to ``T-1`` with points ``round(g(k / S) (T - 1))``.

    Args:
        num_steps: S, the number of network calls (>= 1).
        spacing: one of ``SPACINGS`` (``uniform``, ``quad``, ``cube``, ``exp``).
        num_train_timesteps: T.

    Raises:
        ValueError: unknown spacing, ``num_steps < 1`` or more steps than distinct timesteps.
    """
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of {sorted(SPACINGS)}")
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    if num_steps > num_train_timesteps - 1:
        raise ValueError(f"num_steps={num_steps} exceeds the {num_train_timesteps - 1} steps of the schedule")
    g = SPACINGS[spacing]
    points = [round(g(k / num_steps) * (num_train_timesteps - 1)) for k in range(num_steps + 1)]
    if any(b <= a for a, b in itertools.pairwise(points)):
        raise ValueError(
            f"spacing {spacing!r} with {num_steps} steps gives repeated timesteps {points}; use fewer steps"
        )
    return InversionGrid(tuple(points))


def official_grid(num_steps: int = 3, num_train_timesteps: int = 1000) -> InversionGrid:
    """The grid the official InvAD code inverts on for ``eval_step = S``: S calls, then alpha-bar 0.

    The official evaluation rebuilds its diffusion with ``S`` respaced steps (guided-diffusion's rule for one
    section of ``T`` steps: a stride of ``(T - 1) / (S - 1)`` accumulated from 0, each point rounded half to
    even), calls the network at each of those original timesteps and ends the last DDIM-reverse step at
    alpha-bar 0. For T = 1000: S = 3 calls at 0, 500, 999; S = 5 at 0, 250, 500, 749, 999.

    Args:
        num_steps: S, the official ``eval_step`` (>= 1).
        num_train_timesteps: T.

    Raises:
        ValueError: ``num_steps < 1`` or more steps than timesteps.
    """
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    if num_steps > num_train_timesteps:
        raise ValueError(f"num_steps={num_steps} exceeds the {num_train_timesteps} timesteps of the schedule")
    stride = 1.0 if num_steps == 1 else (num_train_timesteps - 1) / (num_steps - 1)
    points, position = [], 0.0
    for _ in range(num_steps):
        points.append(round(position))
        position += stride
    return InversionGrid(tuple(points), terminal_alpha_bar=0.0)


GRID_PRESETS: dict[str, Callable[[int], InversionGrid]] = {
    # InvAD paper: tau = [333, 666, 999], calls at 0, 333, 666 (S = 3).
    "paper": lambda T: spaced_grid(3, "uniform", T),
    # What the official code's eval_step: 3 really does: calls at 0, 500, 999, then alpha-bar 0.
    "official": lambda T: official_grid(3, T),
}


def resolve_grid(spec: Any, num_train_timesteps: int = 1000) -> InversionGrid:
    """Turn a user's grid specification into a validated :class:`InversionGrid`.

    Args:
        spec: ``"paper"``, ``"official"`` (the official code's S = 3) or ``"official:5"`` (its grid for any S,
            see :func:`official_grid`), an int S (S uniform steps), a spacing name (``"quad"``, S = 3) or
            ``"quad:10"`` (spacing and S), a sequence of points, or an :class:`InversionGrid`.
        num_train_timesteps: T of the schedule.

    Raises:
        ValueError: an unknown name or an invalid grid.
        TypeError: a spec of an unsupported type.
    """
    if isinstance(spec, InversionGrid):
        grid = spec
    elif isinstance(spec, bool):
        raise TypeError("timesteps must be a preset name, an int, a sequence of ints or an InversionGrid")
    elif isinstance(spec, int):
        grid = spaced_grid(spec, "uniform", num_train_timesteps)
    elif isinstance(spec, str):
        name, _, steps = spec.partition(":")
        if name in GRID_PRESETS and not steps:
            grid = GRID_PRESETS[name](num_train_timesteps)
        elif name in SPACINGS or name == "official":
            try:
                num_steps = int(steps) if steps else 3
            except ValueError:
                raise ValueError(f"timesteps {spec!r}: the part after ':' must be an int number of steps") from None
            if name == "official":
                grid = official_grid(num_steps, num_train_timesteps)
            else:
                grid = spaced_grid(num_steps, name, num_train_timesteps)
        else:
            choices = sorted(GRID_PRESETS) + ["official:S"] + [f"{s}[:S]" for s in sorted(SPACINGS)]
            raise ValueError(f"unknown timesteps preset {spec!r}; choose one of {choices}, an int or a list")
    elif isinstance(spec, (Sequence, torch.Tensor)):
        values = spec.tolist() if isinstance(spec, torch.Tensor) else list(spec)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise ValueError(f"explicit timesteps must be ints, got {values!r}")
        grid = InversionGrid(tuple(values))
    else:
        raise TypeError(
            f"timesteps must be a preset name, an int, a sequence of ints or an InversionGrid, got {type(spec)}"
        )
    return grid.validate(num_train_timesteps)


def alphas_cumprod_of(scheduler: Any) -> torch.Tensor:
    """The scheduler's cumulative alpha products as float64, shape ``(T,)``.

    Raises:
        TypeError: the object has no ``alphas_cumprod`` (it is not a DDPM-family scheduler).
        ValueError: the values are not a decreasing sequence in ``(0, 1]``.
    """
    ab = getattr(scheduler, "alphas_cumprod", None)
    if ab is None:
        raise TypeError(
            f"{type(scheduler).__name__} has no `alphas_cumprod`; pass a DDPM-family diffusers scheduler "
            "(DDPMScheduler, DDIMScheduler, ...)"
        )
    ab = torch.as_tensor(ab).detach().to("cpu", torch.float64).flatten()
    if ab.numel() < 2 or not torch.isfinite(ab).all() or (ab <= 0).any() or (ab > 1).any():
        raise ValueError("scheduler.alphas_cumprod must hold at least two finite values in (0, 1]")
    if (ab[1:] > ab[:-1]).any():
        raise ValueError("scheduler.alphas_cumprod must be non-increasing in t")
    return ab


def prediction_type_of(scheduler: Any) -> str:
    """The scheduler's ``config.prediction_type`` (``epsilon`` when it declares none).

    Raises:
        ValueError: a prediction type other than ``epsilon``, ``v_prediction`` or ``sample``.
    """
    config = getattr(scheduler, "config", None)
    kind = getattr(config, "prediction_type", None)
    if kind is None and isinstance(config, dict):
        kind = config.get("prediction_type")
    kind = kind or "epsilon"
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"unsupported prediction_type {kind!r}; expected one of {PREDICTION_TYPES}")
    return kind


BETA_SCHEDULES = ("linear", "scaled_linear")


def schedule_alphas_cumprod(
    num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str
) -> torch.Tensor:
    """Alpha-bar ``prod_{s<=t} (1 - beta_s)`` of a DDPM beta schedule in float64, shape ``(T,)``.

    Args:
        num_train_timesteps: T.
        beta_start: first beta.
        beta_end: last beta.
        beta_schedule: ``linear`` (betas evenly spaced) or ``scaled_linear`` (square roots evenly spaced, Stable
            Diffusion's), as in diffusers' ``DDPMScheduler``.

    Raises:
        ValueError: an unknown ``beta_schedule``.
    """
    if beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    else:
        raise ValueError(f"unknown beta_schedule {beta_schedule!r}; choose one of {BETA_SCHEDULES}")
    return torch.cumprod(1.0 - betas, dim=0)


def linear_alphas_cumprod(
    num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
) -> torch.Tensor:
    """The DDPM linear schedule's alpha-bar in float64, shape ``(T,)`` (the paper's: 1e-4 .. 0.02, T = 1000)."""
    return schedule_alphas_cumprod(num_train_timesteps, beta_start, beta_end, "linear")
