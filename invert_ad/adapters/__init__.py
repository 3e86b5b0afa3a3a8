"""Adapters: anything that predicts noise, turned into ``eps(x_t, t)``.

- :class:`DiffusionAdapter`: the contract for retrofitting other diffusion anomaly detectors
  (``encode``, ``eps``, ``alphas_cumprod``, ``prediction_type``, ``scheduler``, ``condition``,
  ``to_pixel_map``), with :class:`DDADAdapter`, :class:`DiffusionADAdapter` (pixel space),
  :class:`DiADAdapter` (image-conditioned latent diffusion) and :class:`MDMAdapter` (masked teachers,
  x0 / v predictors);
- :mod:`~invert_ad.adapters.keys`: safe checkpoint loading and state-dict key remapping;
- :func:`convert_official_invad_state_dict` / :func:`load_official_invad` / :func:`official_invad_scheduler`:
  official InvAD checkpoints;
- :class:`PixelUNet` (DDAD's and DiffusionAD's UNet) and :class:`SemanticGuidedNetwork` (DiAD's SGN with its
  SFF block), built from the peers' checkpoints by the adapters' ``from_checkpoint``; see
  ``docs/checkpoints.md``.
"""

from ._registry import create_adapter, list_adapters, register_adapter
from .base import DDPM_LINEAR, SD_SCALED_LINEAR, AdapterConfig, DiffusionAdapter, NoiseSchedule, check_images
from .diad import DiADAdapter
from .invad import (
    OFFICIAL_UNUSED_PREFIXES,
    convert_official_invad_state_dict,
    load_official_invad,
    official_invad_scheduler,
)
from .keys import (
    StateDictMismatchError,
    UnsafeCheckpointError,
    extract_state_dict,
    find_prefix,
    load_checkpoint,
    load_weights,
    strip_wrapper_prefixes,
)
from .mdm import MaskedDenoiser, MDMAdapter
from .pixel import DDADAdapter, DiffusionADAdapter, PixelAdapter
from .pixel_unet import PixelUNet
from .sgn import SemanticGuidedNetwork

__all__ = [
    "DDPM_LINEAR",
    "OFFICIAL_UNUSED_PREFIXES",
    "SD_SCALED_LINEAR",
    "AdapterConfig",
    "DDADAdapter",
    "DiADAdapter",
    "DiffusionADAdapter",
    "DiffusionAdapter",
    "MDMAdapter",
    "MaskedDenoiser",
    "NoiseSchedule",
    "PixelAdapter",
    "PixelUNet",
    "SemanticGuidedNetwork",
    "StateDictMismatchError",
    "UnsafeCheckpointError",
    "check_images",
    "convert_official_invad_state_dict",
    "create_adapter",
    "extract_state_dict",
    "find_prefix",
    "list_adapters",
    "load_checkpoint",
    "load_official_invad",
    "load_weights",
    "official_invad_scheduler",
    "register_adapter",
    "strip_wrapper_prefixes",
]
