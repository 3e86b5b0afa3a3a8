"""Deterministic DDIM (Euler) integration of the probability-flow ODE: inversion, one-step IRF, denoising.

Pure tensor functions. ``eps_fn(x, t)`` takes ``x`` of shape ``(B, ...)`` and integer timesteps ``t`` of
shape ``(B,)`` and returns the predicted noise with the shape of ``x``. Alpha-bars are float64 tensors; the
step coefficients are computed in float64 and applied in the dtype of ``x``. Nothing is clipped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["EpsFn", "add_noise", "ddim_coefficients", "ddim_integrate", "ddim_step", "one_step_irf"]

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def ddim_coefficients(alpha_bar: float, alpha_bar_next: float) -> tuple[float, float]:
    """``(c_x, c_eps)`` of the DDIM step ``x_next = c_x x + c_eps eps`` from ``alpha_bar`` to ``alpha_bar_next``.

    ``x0hat = (x - sqrt(1 - a) eps) / sqrt(a)`` and ``x_next = sqrt(a_next) x0hat + sqrt(1 - a_next) eps``, so
    ``c_x = sqrt(a_next / a)`` and ``c_eps = sqrt(1 - a_next) - c_x sqrt(1 - a)``, as Python floats (float64).
    """
    a, a_next = float(alpha_bar), float(alpha_bar_next)
    scale = (a_next / a) ** 0.5
    return scale, (1.0 - a_next) ** 0.5 - scale * (1.0 - a) ** 0.5


def ddim_step(x: torch.Tensor, eps: torch.Tensor, alpha_bar: float, alpha_bar_next: float) -> torch.Tensor:
    """One deterministic DDIM step from alpha-bar ``alpha_bar`` to ``alpha_bar_next``.

    ``x_next = c_x x + c_eps eps`` with the coefficients of :func:`ddim_coefficients` (float64).

    Args:
        x: the state at alpha-bar ``alpha_bar``, any shape.
        eps: the predicted noise, shape of ``x``.
        alpha_bar: source alpha-bar in ``(0, 1]``.
        alpha_bar_next: destination alpha-bar in ``[0, 1]``.

    Returns:
        The state at ``alpha_bar_next``, shape and dtype of ``x``.
    """
    scale, c_eps = ddim_coefficients(alpha_bar, alpha_bar_next)
    return x * scale + eps.to(x.dtype) * c_eps


def ddim_integrate(
    eps_fn: EpsFn,
    x: torch.Tensor,
    call_points: Sequence[int],
    alpha_bars: torch.Tensor,
    return_trajectory: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """Integrate the DDIM ODE through ``call_points``, evaluating ``eps_fn`` once at each source point.

    Increasing points with decreasing alpha-bars invert (data to noise); decreasing points denoise.

    Args:
        eps_fn: the noise predictor ``eps(x, t)``.
        x: the state at ``call_points[0]``, shape ``(B, ...)``.
        call_points: the ``K`` timesteps at which ``eps_fn`` is called (``K`` network calls).
        alpha_bars: float64 tensor of shape ``(K + 1,)``: the alpha-bar at each call point, then the
            destination alpha-bar of the last step.
        return_trajectory: also return the ``K + 1`` states visited (the input first).

    Returns:
        The final state, shape of ``x`` (and the trajectory if asked).
    """
    if len(alpha_bars) != len(call_points) + 1:
        raise ValueError(f"need {len(call_points) + 1} alpha-bars for {len(call_points)} calls, got {len(alpha_bars)}")
    trajectory = [x] if return_trajectory else []
    ab = alpha_bars.tolist()
    for k, t in enumerate(call_points):
        timestep = torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)
        eps = eps_fn(x, timestep)
        x = ddim_step(x, eps, ab[k], ab[k + 1])
        if return_trajectory:
            trajectory.append(x)
    return (x, trajectory) if return_trajectory else x


def one_step_irf(eps_fn: EpsFn, x0: torch.Tensor, timestep: int, alpha_bar: float) -> torch.Tensor:
    """OSD-IRF's inverse residual field: ``eps(sqrt(alpha_bar_t) x0, t)``, one call, no added noise.

    Args:
        eps_fn: the noise predictor.
        x0: clean samples, shape ``(B, ...)``.
        timestep: t (OSD-IRF uses 500 of 1000).
        alpha_bar: alpha-bar at ``timestep``.

    Returns:
        The predicted noise on the mean path, shape of ``x0``.
    """
    t = torch.full((x0.shape[0],), int(timestep), dtype=torch.long, device=x0.device)
    return eps_fn(x0 * float(alpha_bar) ** 0.5, t)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    """The forward process ``sqrt(ab) x0 + sqrt(1 - ab) noise``, shape of ``x0``."""
    a = float(alpha_bar)
    return x0 * a**0.5 + noise.to(x0.dtype) * (1.0 - a) ** 0.5
