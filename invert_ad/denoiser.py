"""Turn a diffusers model (or any callable) into a noise predictor ``eps(x_t, t)``.

Handles ``UNet2DModel``-like modules (``model(x, t).sample``), ``DiTTransformer2DModel`` (called with its
null class label), learned-sigma models (``2C`` output channels: the first ``C`` are eps) and plain
callables ``f(x, t) -> Tensor``. Predictions of type ``v_prediction`` or ``sample`` are converted to eps.
"""

from __future__ import annotations

from typing import Any

import torch

from .inversion import EpsFn

__all__ = ["denoiser_in_channels", "first_tensor", "make_eps_fn", "prediction_to_eps"]


def prediction_to_eps(
    prediction: torch.Tensor, x_t: torch.Tensor, alpha_bar_t: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """Convert a model's prediction at ``x_t`` into eps.

    Args:
        prediction: the model output, shape of ``x_t``.
        x_t: the noisy input, shape ``(B, ...)``.
        alpha_bar_t: alpha-bar per sample, shape ``(B,)``, any float dtype.
        prediction_type: ``epsilon``, ``v_prediction`` (``v = sqrt(ab) eps - sqrt(1-ab) x0``) or ``sample``
            (``x0``).

    Returns:
        eps, shape and dtype of ``prediction``.
    """
    if prediction_type == "epsilon":
        return prediction
    shape = (-1,) + (1,) * (x_t.dim() - 1)
    a = alpha_bar_t.to(torch.float64).reshape(shape)
    sqrt_a, sqrt_1ma = a.sqrt(), (1.0 - a).sqrt()
    p, x = prediction.to(torch.float64), x_t.to(torch.float64)
    if prediction_type == "v_prediction":
        eps = sqrt_a * p + sqrt_1ma * x
    elif prediction_type == "sample":
        eps = (x - sqrt_a * p) / sqrt_1ma
    else:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}")
    return eps.to(prediction.dtype)


def denoiser_in_channels(denoiser: Any) -> int | None:
    """The input channel count a model declares in its config (``in_channels``), or ``None``."""
    config = getattr(denoiser, "config", None)
    value = getattr(config, "in_channels", None)
    if value is None and isinstance(config, dict):
        value = config.get("in_channels")
    return int(value) if value is not None else None


def _null_class_label(denoiser: Any) -> int | None:
    """The unconditional label of a class-conditional diffusers DiT, else ``None``."""
    config = getattr(denoiser, "config", None)
    if type(denoiser).__name__ == "DiTTransformer2DModel" and config is not None:
        return int(config.num_embeds_ada_norm)
    return None


def make_eps_fn(denoiser: Any, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon") -> EpsFn:
    """Wrap ``denoiser`` as ``eps(x_t, t)``.

    Args:
        denoiser: a diffusers model or any callable ``f(x, t)`` returning a tensor or an object with
            ``.sample``.
        alphas_cumprod: float64 alpha-bars of shape ``(T,)``, for converting ``v_prediction`` / ``sample``.
        prediction_type: what ``denoiser`` predicts.

    Returns:
        A function ``(x (B, C, ...), t (B,) long) -> eps (B, C, ...)``.
    """
    if not callable(denoiser):
        raise TypeError(f"denoiser must be a diffusers model or a callable f(x, t), got {type(denoiser).__name__}")
    null_label = _null_class_label(denoiser)

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if null_label is not None:
            labels = torch.full_like(t, null_label)
            out = denoiser(x, timestep=t, class_labels=labels)
        else:
            out = denoiser(x, t)
        out = getattr(out, "sample", out)
        if isinstance(out, tuple):
            out = out[0]
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"denoiser returned {type(out).__name__}, expected a tensor")
        channels = x.shape[1]
        if out.shape[1] == 2 * channels and out.shape[2:] == x.shape[2:]:
            out = out[:, :channels]  # learned sigma: eps first, variance second
        if out.shape != x.shape:
            raise ValueError(f"denoiser output shape {tuple(out.shape)} does not match input {tuple(x.shape)}")
        if prediction_type != "epsilon":
            out = prediction_to_eps(out, x, alphas_cumprod.to(x.device)[t], prediction_type)
        return out

    return eps_fn


def first_tensor(module: Any) -> torch.Tensor | None:
    """The first parameter, else the first buffer, of a module (``None`` for plain callables)."""
    for attribute in ("parameters", "buffers"):
        tensors = getattr(module, attribute, None)
        found = next(iter(tensors()), None) if callable(tensors) else None
        if found is not None:
            return found
    return None
