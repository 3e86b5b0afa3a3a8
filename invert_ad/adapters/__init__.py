"""Adapters: anything that predicts noise, turned into ``eps(x_t, t)``."""

from .diffusers import denoiser_in_channels, make_eps_fn, prediction_to_eps

__all__ = ["denoiser_in_channels", "make_eps_fn", "prediction_to_eps"]
