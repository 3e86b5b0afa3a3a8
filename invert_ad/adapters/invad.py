"""Official InvAD checkpoints (Sakai et al., arXiv 2504.05662; code: SkyShunsuke/InversionAD) as
:class:`~invert_ad.models.FeatureDiT` weights.

The official checkpoints are plain state dicts of a wrapper module: the DiT under ``net.``, an optional
``module.`` prefix from DDP, and entries the unconditional denoiser never uses:

- ``cls_embed.*``: the wrapper's class-label table (labels are passed under a keyword the DiT ignores);
- ``net.y_embedder.*``: the DiT's label embedding (the DiT is always called with ``y=None``);
- ``net.x_embedder_linear.*``: a token-input embedding used only for ``(B, N, C)`` inputs, never for feature
  maps.

Every other parameter maps one to one: ``x_embedder.proj`` (a patch-1 convolution), ``t_embedder.mlp.{0,2}``,
``pos_embed``, ``blocks.N.{attn.qkv, attn.proj, mlp.fc1, mlp.fc2, adaLN_modulation.1}`` and
``final_layer.{linear, adaLN_modulation.1}`` (the LayerNorms have no parameters).
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from .keys import StateDictMismatchError, extract_state_dict, load_weights, read_checkpoint, strip_wrapper_prefixes

if TYPE_CHECKING:
    from ..models import FeatureDiT

__all__ = [
    "OFFICIAL_UNUSED_PREFIXES",
    "convert_official_invad_state_dict",
    "load_official_invad",
    "official_invad_scheduler",
]

logger = logging.getLogger(__name__)

OFFICIAL_UNUSED_PREFIXES: tuple[str, ...] = ("cls_embed", "net.y_embedder.", "net.x_embedder_linear.")
"""Entries of official checkpoints that the unconditional feature-map denoiser never reads (dropped)."""

OFFICIAL_NUM_HEADS = 8
"""Attention heads of the official DiT (its wrapper's default; the configs do not override it)."""

_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def convert_official_invad_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an official InvAD state dict into :class:`~invert_ad.models.FeatureDiT` keys.

    Removes ``module.`` / ``_orig_mod.`` wrappers and the ``net.`` prefix, and drops the unused entries of
    :data:`OFFICIAL_UNUSED_PREFIXES` (logged at INFO level). Tensors are passed through unchanged (no copy).

    Args:
        state_dict: the official checkpoint's ``{name: tensor}``.

    Returns:
        ``{FeatureDiT key: tensor}``.

    Raises:
        ValueError: keys outside ``net.`` that are not known to be unused, or a patch size other than 1
            (``FeatureDiT`` embeds each grid position on its own).
    """
    source = strip_wrapper_prefixes(state_dict)
    dropped = sorted(k for k in source if k.startswith(OFFICIAL_UNUSED_PREFIXES))
    foreign = sorted(k for k in source if not k.startswith("net.") and k not in dropped)
    if foreign:
        raise ValueError(
            f"not an official InvAD state dict: keys outside 'net.' {foreign[:8]}{' ...' if len(foreign) > 8 else ''}"
        )
    converted = {k[len("net.") :]: v for k, v in source.items() if k not in dropped}
    proj = converted.get("x_embedder.proj.weight")
    if proj is not None and tuple(proj.shape[2:]) != (1, 1):
        raise ValueError(
            f"x_embedder.proj.weight has shape {tuple(proj.shape)}: a patch size of {proj.shape[-1]}; FeatureDiT "
            "supports patch size 1 only (one token per feature-grid position, as in the InvAD configs)"
        )
    if dropped:
        logger.info("official InvAD checkpoint: dropped %d unused entries: %s", len(dropped), ", ".join(dropped))
    return converted


def _infer_dit_kwargs(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """FeatureDiT hyper-parameters readable from the converted tensors' shapes (all but ``num_heads``)."""
    required = ("x_embedder.proj.weight", "pos_embed", "final_layer.linear.weight")
    absent = [k for k in required if k not in state_dict]
    if absent:
        raise StateDictMismatchError("FeatureDiT", absent, [], [])
    hidden, in_channels = state_dict["x_embedder.proj.weight"].shape[:2]
    num_tokens = state_dict["pos_embed"].shape[1]
    side = math.isqrt(num_tokens)
    depth = len({int(m.group(1)) for k in state_dict if (m := _BLOCK.match(k))})
    kwargs: dict[str, Any] = {
        "in_channels": int(in_channels),
        "hidden_size": int(hidden),
        "depth": depth,
        "learn_sigma": state_dict["final_layer.linear.weight"].shape[0] == 2 * in_channels,
    }
    if side * side == num_tokens:
        kwargs["sample_size"] = side
    if "blocks.0.mlp.fc1.weight" in state_dict:
        kwargs["mlp_ratio"] = state_dict["blocks.0.mlp.fc1.weight"].shape[0] / hidden
    return kwargs


def load_official_invad(
    source: str | os.PathLike[str] | Mapping[str, Any],
    *,
    key: str | None = None,
    allow_unsafe_pickle: bool = False,
    **dit_kwargs: Any,
) -> FeatureDiT:
    """Build a :class:`~invert_ad.models.FeatureDiT` from an official InvAD checkpoint.

    ``in_channels``, ``hidden_size``, ``depth``, ``mlp_ratio``, ``learn_sigma`` and a square ``sample_size``
    are read from the tensor shapes; ``num_heads`` cannot be and defaults to the official 8. ``dit_kwargs``
    override any of them (e.g. ``sample_size=(h, w)`` for a non-square grid).

    Args:
        source: a checkpoint path (``.pth`` read with ``weights_only=True``, or ``.safetensors``) or a loaded
            state dict.
        key: the checkpoint entry holding the weights, if nested.
        allow_unsafe_pickle: unpickle a file that needs arbitrary Python objects (only for trusted files).
        **dit_kwargs: FeatureDiT constructor arguments.

    Returns:
        The model in eval mode, weights loaded strictly.

    Raises:
        StateDictMismatchError: the converted weights do not fit the FeatureDiT built (names every missing,
            unexpected or mis-shaped key).
        UnsafeCheckpointError: a pickle that needs arbitrary Python objects.
    """
    from ..models import FeatureDiT

    checkpoint = read_checkpoint(source, allow_unsafe_pickle)
    state_dict = convert_official_invad_state_dict(extract_state_dict(checkpoint, key))
    kwargs = {"num_heads": OFFICIAL_NUM_HEADS, **_infer_dit_kwargs(state_dict), **dit_kwargs}
    model = load_weights(FeatureDiT(**kwargs), state_dict, prefix="")
    return model.eval()


def official_invad_scheduler(num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Any:
    """A diffusers ``DDPMScheduler`` carrying the official InvAD schedule with its float64 alpha-bars.

    The official code builds guided-diffusion's linear schedule in float64 (``numpy.linspace`` betas,
    ``numpy.cumprod``); a freshly built ``DDPMScheduler`` computes its ``alphas_cumprod`` in float32, about
    1e-7 away. This one's ``alphas_cumprod`` is replaced by the official float64 values (bit for bit), for
    ``InversionScorer(load_official_invad(path), official_invad_scheduler(), timesteps="official:5")``.

    Args:
        num_train_timesteps: T (official: 1000).
        beta_start: the first beta (official: 1e-4).
        beta_end: the last beta (official: 0.02).

    Returns:
        A ``DDPMScheduler`` (epsilon prediction, no clipping) with float64 ``alphas_cumprod`` of shape ``(T,)``.
    """
    import numpy as np
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_start=beta_start,
        beta_end=beta_end,
        beta_schedule="linear",
        prediction_type="epsilon",
        clip_sample=False,
    )
    # numpy's linspace and cumprod, as guided-diffusion computes them (torch's linspace differs in the last bit)
    betas = np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)
    scheduler.alphas_cumprod = torch.from_numpy(np.cumprod(1.0 - betas))
    return scheduler
