"""The library's own feature-space eps networks, as diffusers ``ModelMixin`` + ``ConfigMixin`` classes.

Every model is called as ``model(sample (B, C, h, w), timestep (B,) or scalar).sample -> eps`` and round-trips
through ``save_pretrained`` / ``from_pretrained`` (safetensors + config.json). Build one by preset with
:func:`create_denoiser`; see :func:`list_denoisers`.
"""

from ._layers import DenoiserOutput
from ._registry import create_denoiser, list_denoisers, load_denoiser, register_denoiser
from .conv import ConvDenoiser
from .dit import DIT_PRESETS, FeatureDiT
from .gaussian import GaussianDenoiser, ledoit_wolf
from .mixture import GaussianMixtureDenoiser
from .mlp import MLPDenoiser
from .residual import GaussianResidualDenoiser
from .shared_gaussian import SharedGaussianDenoiser, covariance_bytes, fit_neighbourhood_gaussian, whiten

__all__ = [
    "DIT_PRESETS",
    "ConvDenoiser",
    "DenoiserOutput",
    "FeatureDiT",
    "GaussianDenoiser",
    "GaussianMixtureDenoiser",
    "GaussianResidualDenoiser",
    "MLPDenoiser",
    "SharedGaussianDenoiser",
    "covariance_bytes",
    "create_denoiser",
    "fit_neighbourhood_gaussian",
    "ledoit_wolf",
    "list_denoisers",
    "load_denoiser",
    "register_denoiser",
    "whiten",
]
