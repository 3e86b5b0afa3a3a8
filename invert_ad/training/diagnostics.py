"""Is a trained denoiser ready? Per-timestep checks on held-out normal features, against known predictors.

A t-averaged eps-MSE hides what inversion needs: the average is dominated by small t, while the last inversion
step hands the network's output almost straight to the latent (on the paper grid, 666 -> 999 has
``c_eps = 0.94``). :func:`diagnose_denoiser` therefore measures, at the grid's call points only:

- the eps-MSE of the model, of the trivial predictor ``sqrt(1 - ab_t) x_t`` (the exact eps for standardised
  ``N(0, I)`` features; its MSE on any data with unit second moment is ``ab_t``) and, if given, of a fitted
  Gaussian (:class:`~invert_ad.models.GaussianDenoiser`), all on the same noise draws (a paired comparison);
- the mean and standard deviation of the held-out latents after inversion, beside those the two reference
  predictors give on the same grid (with few Euler steps even the exact predictor does not reach std 1: the
  trivial predictor on ``N(0, I)`` data ends at std 0.50 on the paper grid);
- the output-scale ratio at the last call: ``|eps(x / 2, t)| / |eps(x, t)|`` for the inversion state ``x`` at
  the last call point; 0.5 for the trivial predictor (and nearly so for the Gaussian), near 1 for a network
  whose output ignores its input's scale (the failure of undertrained plain DiTs).

and returns them with a one-line verdict. The trainer does not read any of it.
"""

from __future__ import annotations

from typing import Any

import torch

from ..denoiser import make_eps_fn
from ..inversion import ddim_integrate
from ..models import GaussianDenoiser
from ..schedule import resolve_grid

__all__ = [
    "BROKEN_FACTOR",
    "BROKEN_RATIO",
    "RELATIVE_TOLERANCE",
    "diagnose_denoiser",
    "diagnose_training",
    "judge",
]

RELATIVE_TOLERANCE = 0.01
"""A model counts as behind a reference at ``t`` when its eps-MSE exceeds the reference's by more than this
share (plus ``1e-4`` absolute, for ``t`` near ``T`` where every MSE tends to 0)."""


def _trivial_eps(alphas_cumprod: torch.Tensor):
    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        scale = (1 - alphas_cumprod.to(x.device)[t]).sqrt().to(x.dtype)
        return scale.reshape(-1, *([1] * (x.dim() - 1))) * x

    return eps


def _latent_stats(eps_fn, x0: torch.Tensor, grid, alphas_cumprod: torch.Tensor) -> tuple[dict[str, float], Any]:
    latent, trajectory = ddim_integrate(eps_fn, x0, grid.call_points, grid.alpha_bars(alphas_cumprod), True)
    return {"mean": float(latent.mean()), "std": float(latent.std())}, trajectory[-2]


BROKEN_FACTOR = 1.1
"""At the last call point, an eps-MSE above this multiple of the trivial predictor's (plus ``1e-4``) marks the
latents unreliable (the issue's undertrained plain DiT: 0.070 against 0.011 at t = 666)."""

BROKEN_RATIO = 0.2
"""An output-scale ratio farther than this from the ideal 0.5 marks the latents unreliable too."""

_NAMES = {"gaussian": "the Gaussian", "trivial": "the trivial predictor"}


@torch.inference_mode()
def diagnose_denoiser(
    denoiser: Any,
    features: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    *,
    gaussian: torch.nn.Module | None = None,
    grid: Any = "paper",
    draws: int = 2,
    max_images: int = 64,
    seed: int = 0,
    trained: bool | None = None,
) -> dict[str, Any]:
    """Per-timestep readiness checks of an eps model on held-out normal features, with a verdict.

    Args:
        denoiser: the eps model (an ``invert_ad.models`` denoiser, a diffusers model, or ``f(x, t) -> eps``),
            in eval mode, on the device of ``features``.
        features: standardised held-out normal features ``(N, C, h, w)`` (the first ``max_images`` are used).
        alphas_cumprod: float64 ``(T,)`` alpha-bars of the training schedule.
        gaussian: a Gaussian fitted on the training features, as a second reference (optional).
        grid: the inversion grid (:func:`invert_ad.schedule.resolve_grid` spec or an ``InversionGrid``); its
            call points are where eps-MSE is measured.
        draws: noise draws per image and timestep.
        max_images: cap on the held-out images used.
        seed: seeds the noise draws (the same draws serve every predictor).
        trained: whether ``denoiser`` was trained (default: it has parameters); a fitted-only model gets a
            verdict that says so.

    Returns:
        A JSON-serialisable dict: ``call_points``; ``eps_mse`` (``model``, ``trivial`` and, with ``gaussian``,
        ``gaussian``: each ``{t: mse}``); ``latent`` (``model``, ``trivial``, ``gaussian``: each ``{"mean",
        "std"}`` over all latent values); ``output_scale_ratio`` (``{"t", "model", "ideal": 0.5}``);
        ``trained``; ``behind`` (``{t: reference}`` where the model is worse than the better reference);
        ``status`` and
        ``verdict`` (one line). ``status`` is ``"fitted"`` (nothing trained), ``"behind_trivial"`` (worse than
        the trivial predictor at the last call by :data:`BROKEN_FACTOR`, an output-scale ratio off by more than
        :data:`BROKEN_RATIO`, or behind the trivial predictor where it is the better reference: latents are not
        to be trusted), ``"behind_gaussian"`` (sound, but behind the Gaussian somewhere: the benchmark decides)
        or ``"ready"`` (ahead of both everywhere).

    Raises:
        ValueError: ``features`` not ``(N, C, h, w)`` with ``N >= 1``, or ``draws < 1``.
    """
    if features.dim() != 4 or features.shape[0] == 0:
        raise ValueError(f"features must have shape (N, C, h, w) with N >= 1, got {tuple(features.shape)}")
    if draws < 1:
        raise ValueError(f"draws must be positive, got {draws}")
    alphas_cumprod = alphas_cumprod.to(torch.float64)
    grid = resolve_grid(grid, len(alphas_cumprod)) if not hasattr(grid, "call_points") else grid
    x0 = features[:max_images]
    predictors = {"model": make_eps_fn(denoiser, alphas_cumprod, "epsilon"), "trivial": _trivial_eps(alphas_cumprod)}
    if gaussian is not None:
        predictors["gaussian"] = make_eps_fn(gaussian, alphas_cumprod, "epsilon")
    generator = torch.Generator().manual_seed(seed)
    sums = {name: {int(t): 0.0 for t in grid.call_points} for name in predictors}
    for t in grid.call_points:
        a = float(alphas_cumprod[t])
        timesteps = torch.full((x0.shape[0],), int(t), dtype=torch.long, device=x0.device)
        for _ in range(draws):
            noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device, x0.dtype)
            x_t = a**0.5 * x0 + (1 - a) ** 0.5 * noise
            for name, eps_fn in predictors.items():
                sums[name][int(t)] += float((eps_fn(x_t, timesteps).float() - noise.float()).square().mean()) / draws
    latent, last_state = {}, None
    for name, eps_fn in predictors.items():
        latent[name], state = _latent_stats(eps_fn, x0, grid, alphas_cumprod)
        last_state = state if name == "model" else last_state
    t_last = int(grid.call_points[-1])
    timesteps = torch.full((x0.shape[0],), t_last, dtype=torch.long, device=x0.device)
    full = predictors["model"](last_state, timesteps).float().norm()
    half = predictors["model"](last_state / 2, timesteps).float().norm()
    ratio = float(half / full) if float(full) > 0 else float("nan")

    if trained is None:
        trained = any(True for _ in denoiser.parameters()) if hasattr(denoiser, "parameters") else True
    result = {
        "call_points": [int(t) for t in grid.call_points],
        "num_images": int(x0.shape[0]),
        "draws": draws,
        "eps_mse": {name: {str(t): v for t, v in values.items()} for name, values in sums.items()},
        "latent": latent,
        "output_scale_ratio": {"t": t_last, "model": ratio, "ideal": 0.5},
        "trained": bool(trained),
    }
    return {**result, **judge(result)}


def judge(diagnostics: dict[str, Any]) -> dict[str, Any]:
    """The verdict on measured diagnostics (the part of :func:`diagnose_denoiser` that reads no model).

    Args:
        diagnostics: a :func:`diagnose_denoiser` dict (``eps_mse``, ``latent``, ``output_scale_ratio``,
            ``trained``; any ``behind`` / ``status`` / ``verdict`` in it are ignored).

    Returns:
        ``{"behind": {t: reference}, "status": ..., "verdict": ...}``, see :func:`diagnose_denoiser`.
    """
    sums, latent = diagnostics["eps_mse"], diagnostics["latent"]
    t_last, ratio = str(diagnostics["output_scale_ratio"]["t"]), diagnostics["output_scale_ratio"]["model"]
    references = [name for name in ("gaussian", "trivial") if name in sums]
    behind = {}
    for t in sums["model"]:
        best = min(references, key=lambda name: sums[name][t])
        if sums["model"][t] > (1 + RELATIVE_TOLERANCE) * sums[best][t] + 1e-4:
            behind[t] = best
    notes = (
        f"latent std {latent['model']['std']:.2f} (trivial predictor {latent['trivial']['std']:.2f}), "
        f"output-scale ratio at t={t_last} {ratio:.2f} (ideal 0.5)"
    )
    last, trivial_last = sums["model"][t_last], sums["trivial"][t_last]
    broken = last > BROKEN_FACTOR * trivial_last + 1e-4 or not abs(ratio - 0.5) <= BROKEN_RATIO
    if not diagnostics.get("trained", True):
        status, verdict = "fitted", f"fitted denoiser, nothing trained: {notes}"
    elif broken:
        status = "behind_trivial"
        verdict = (
            f"not yet better than the trivial predictor at the last call t={t_last} (eps-MSE {last:.4f} vs "
            f"{trivial_last:.4f}, output-scale ratio {ratio:.2f}, ideal 0.5): its latents are unreliable; keep "
            f"training (more --minutes or --steps) or use --denoiser gaussian; {notes}"
        )
    elif behind:
        worst = max(behind, key=lambda t: sums["model"][t] / max(sums[behind[t]][t], 1e-12))
        status = "behind_gaussian" if "gaussian" in behind.values() else "behind_trivial"
        verdict = (
            f"not yet better than {_NAMES[behind[worst]]} at {', '.join(f't={t}' for t in behind)} (worst "
            f"t={worst}: eps-MSE {sums['model'][worst]:.4f} vs {sums[behind[worst]][worst]:.4f}); its maps may "
            f"still localise better: compare with --denoiser gaussian on labelled images (invert-ad evaluate) or "
            f"keep training; {notes}"
        )
    else:
        status = "ready"
        verdict = (
            f"better than {' and '.join(_NAMES[r] for r in references)} at every call point "
            f"({', '.join(f't={t}' for t in sums['model'])}); {notes}"
        )
    return {"behind": behind, "status": status, "verdict": verdict}


def diagnose_training(
    denoiser: Any,
    train_features: torch.Tensor,
    holdout_features: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    *,
    grid: Any = "paper",
    trained: bool | None = None,
) -> dict[str, Any]:
    """:func:`diagnose_denoiser` on held-out features, with a Gaussian fitted on the training features as reference.

    Args:
        denoiser: the trained (or fitted) eps model, in eval mode.
        train_features: standardised training features ``(N, C, h, w)`` (on the CPU) the reference is fitted on.
        holdout_features: standardised held-out normal features ``(M, C, h, w)``, on the denoiser's device.
        alphas_cumprod: float64 ``(T,)`` alpha-bars of the training schedule (linear 1e-4 .. 0.02 by default;
            the reference Gaussian is fitted for ``T = len(alphas_cumprod)`` with that schedule).
        grid: the inversion grid whose call points are checked.
        trained: whether ``denoiser`` was trained (default: it has parameters).

    Returns:
        :func:`diagnose_denoiser`'s dict.
    """
    reference = denoiser if isinstance(denoiser, GaussianDenoiser) else GaussianDenoiser.fit(train_features)
    reference = reference.to(holdout_features.device)
    return diagnose_denoiser(denoiser, holdout_features, alphas_cumprod, gaussian=reference, grid=grid, trained=trained)
