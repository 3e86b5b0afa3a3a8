"""Latent-diffusion (CompVis ``ldm``) checkpoints as diffusers modules: configs and weight conversion.

DiAD, like every model built on the ``ldm`` code base, stores one Lightning ``state_dict`` with the UNet under
``model.diffusion_model.``, the autoencoder under ``first_stage_model.`` and a ControlNet-like network under
``control_model.``; its YAML's ``model.params`` block gives the constructor arguments. Here:

- :func:`unet_config_from_ldm`, :func:`controlnet_config_from_ldm` and :func:`vae_config_from_ldm` turn those
  arguments into diffusers ``UNet2DConditionModel`` / ``ControlNetModel`` / ``AutoencoderKL`` configurations,
  every width read from the arguments (nothing assumes Stable Diffusion's sizes);
- :func:`convert_ldm_weights` renames the weights with diffusers' own converters for these standard parts and
  then checks that the conversion is complete: every converted tensor is present and of the right shape, and
  every source tensor the target architecture should hold was used (diffusers' ControlNet converter silently
  skips what it does not know, such as DiAD's SFF convolutions, which :mod:`~invert_ad.adapters.sgn` loads).

diffusers' ``create_controlnet_diffusers_config_from_ldm`` is not used: in diffusers 0.42 it calls the UNet
config builder without its ``checkpoint`` argument and fails.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .keys import StateDictMismatchError

__all__ = [
    "LDM_PREFIXES",
    "controlnet_config_from_ldm",
    "convert_ldm_weights",
    "unet_config_from_ldm",
    "vae_config_from_ldm",
]

LDM_PREFIXES: dict[str, str] = {
    "unet": "model.diffusion_model.",
    "controlnet": "control_model.",
    "vae": "first_stage_model.",
}
"""Where an ``ldm`` state dict keeps each part."""

_UNSUPPORTED: dict[str, Any] = {
    "resblock_updown": False,
    "use_scale_shift_norm": False,
    "num_attention_blocks": None,
    "use_new_attention_order": False,
    "dims": 2,
}


def _check_supported(params: Mapping[str, Any]) -> None:
    for name, plain in _UNSUPPORTED.items():
        if params.get(name, plain) != plain:
            raise ValueError(f"ldm UNet option {name}={params[name]!r} is not supported (only {plain!r})")
    if not params.get("use_spatial_transformer", False):
        raise ValueError("only ldm UNets with use_spatial_transformer=True (cross-attention) are supported")


def _heads(params: Mapping[str, Any], width: int) -> int:
    """Attention heads at a level of ``width`` channels (``num_heads``, or ``width // num_head_channels``)."""
    num_heads, head_channels = int(params.get("num_heads", -1)), int(params.get("num_head_channels", -1))
    if head_channels != -1:
        return width // head_channels
    if num_heads < 1:
        raise ValueError("an ldm UNet needs num_heads or num_head_channels")
    return num_heads


def _encoder_config(params: Mapping[str, Any]) -> dict[str, Any]:
    """What a diffusers UNet and ControlNet share: the encoder half, the embedding and the attention."""
    _check_supported(params)
    mc = int(params["model_channels"])
    mults = [int(m) for m in params["channel_mult"]]
    widths = [mc * m for m in mults]
    res_blocks = params["num_res_blocks"]
    if not isinstance(res_blocks, int):
        raise ValueError(f"num_res_blocks must be one int for all levels, got {res_blocks!r}")
    attention = {int(r) for r in params["attention_resolutions"]}
    down = ["CrossAttnDownBlock2D" if 2**i in attention else "DownBlock2D" for i in range(len(widths))]
    depth = params.get("transformer_depth", 1)
    context = params["context_dim"]
    config: dict[str, Any] = {
        "in_channels": int(params["in_channels"]),
        "down_block_types": down,
        "block_out_channels": widths,
        "layers_per_block": int(res_blocks),
        "cross_attention_dim": int(context if isinstance(context, int) else context[0]),
        "attention_head_dim": [_heads(params, w) for w in widths],
        "use_linear_projection": bool(params.get("use_linear_in_transformer", False)),
        "transformer_layers_per_block": depth if isinstance(depth, int) else list(depth),
    }
    if params.get("disable_self_attentions") is not None:
        config["only_cross_attention"] = [bool(v) for v in params["disable_self_attentions"]]
    return config


def unet_config_from_ldm(params: Mapping[str, Any], sample_size: int) -> dict[str, Any]:
    """A diffusers ``UNet2DConditionModel`` configuration from an ``ldm`` ``UNetModel``'s arguments.

    Args:
        params: the ``unet_config.params`` of the YAML (``model_channels``, ``channel_mult``,
            ``attention_resolutions``, ``num_res_blocks``, ``num_heads`` / ``num_head_channels``,
            ``context_dim``, ``transformer_depth``, ...).
        sample_size: the latent side.

    Raises:
        ValueError: an option this conversion does not support (``resblock_updown``, scale-shift norm, ...).
    """
    config = _encoder_config(params)
    ups = ["CrossAttnUpBlock2D" if t.startswith("CrossAttn") else "UpBlock2D" for t in config["down_block_types"]]
    config.update(
        sample_size=int(sample_size),
        out_channels=int(params.get("out_channels", config["in_channels"])),
        up_block_types=ups[::-1],
    )
    return config


def controlnet_config_from_ldm(params: Mapping[str, Any]) -> dict[str, Any]:
    """A diffusers ``ControlNetModel`` configuration from a ControlNet-style ``ldm`` network's arguments.

    ``params`` are the ``control_stage_config.params`` (the UNet's arguments plus ``hint_channels``); the hint
    embedding has ControlNet's widths 16, 32, 96, 256.
    """
    config = _encoder_config(params)
    config["conditioning_channels"] = int(params["hint_channels"])
    return config


def vae_config_from_ldm(ddconfig: Mapping[str, Any], embed_dim: int, scaling_factor: float) -> dict[str, Any]:
    """A diffusers ``AutoencoderKL`` configuration from an ``ldm`` ``AutoencoderKL``'s ``ddconfig``.

    Raises:
        ValueError: attention at some resolution (diffusers' KL autoencoder has attention only in its middle
            block), a ``z_channels`` other than ``embed_dim``, or a single (not doubled) latent.
    """
    if list(ddconfig.get("attn_resolutions", [])):
        raise ValueError(f"ldm autoencoders with attn_resolutions {ddconfig['attn_resolutions']} are not supported")
    if not ddconfig.get("double_z", True) or int(ddconfig["z_channels"]) != int(embed_dim):
        raise ValueError("only KL autoencoders with double_z=True and z_channels == embed_dim are supported")
    widths = [int(ddconfig["ch"]) * int(m) for m in ddconfig["ch_mult"]]
    return {
        "in_channels": int(ddconfig["in_channels"]),
        "out_channels": int(ddconfig["out_ch"]),
        "down_block_types": ["DownEncoderBlock2D"] * len(widths),
        "up_block_types": ["UpDecoderBlock2D"] * len(widths),
        "block_out_channels": widths,
        "layers_per_block": int(ddconfig["num_res_blocks"]),
        "latent_channels": int(embed_dim),
        "sample_size": int(ddconfig["resolution"]),
        "scaling_factor": float(scaling_factor),
    }


def _converter(part: str) -> Callable[[dict[str, torch.Tensor], dict[str, Any]], dict[str, torch.Tensor]]:
    from diffusers.loaders import single_file_utils as sfu

    return {
        "unet": sfu.convert_ldm_unet_checkpoint,
        "controlnet": sfu.convert_controlnet_checkpoint,
        "vae": sfu.convert_ldm_vae_checkpoint,
    }[part]


def convert_ldm_weights(
    state_dict: Mapping[str, torch.Tensor], part: str, model: nn.Module, *, ignore: tuple[str, ...] = ()
) -> nn.Module:
    """Load one part of an ``ldm`` state dict into the diffusers ``model`` built for it, checking completeness.

    Args:
        state_dict: the whole ``ldm`` state dict (keys with their ``model.diffusion_model.`` etc. prefixes).
        part: ``unet``, ``controlnet`` or ``vae`` (see :data:`LDM_PREFIXES`).
        model: the diffusers module built from the matching ``*_config_from_ldm``.
        ignore: key names (after the part's prefix, as prefixes) that the caller loads elsewhere; they are
            left out of the completeness check (e.g. DiAD's SFF convolutions under ``control_model.``).

    Returns:
        ``model`` with the weights loaded (strictly).

    Raises:
        StateDictMismatchError: the converted weights miss keys of ``model`` or do not fit its shapes, or the
            conversion used fewer source values than the part holds (weights that would be dropped).
    """
    if part not in LDM_PREFIXES:
        raise ValueError(f"unknown ldm part {part!r}; choose one of {sorted(LDM_PREFIXES)}")
    prefix = LDM_PREFIXES[part]
    source = {k: v for k, v in state_dict.items() if k.startswith(prefix) and not k[len(prefix) :].startswith(ignore)}
    if not source:
        raise StateDictMismatchError(type(model).__name__, [f"{prefix}*"], [], [], prefix)
    converted = _converter(part)(dict(source), dict(model.config))
    converted = {k: v for k, v in converted.items() if v is not None}
    target = model.state_dict()
    missing = sorted(k for k in target if k not in converted)
    unexpected = sorted(k for k in converted if k not in target)
    mismatched = [
        (k, tuple(v.shape), tuple(target[k].shape))
        for k, v in sorted(converted.items())
        if k in target and v.numel() != target[k].numel()
    ]
    if missing or unexpected or mismatched:
        raise StateDictMismatchError(type(model).__name__, missing, unexpected, mismatched, prefix)
    used, held = sum(v.numel() for v in converted.values()), sum(v.numel() for v in source.values())
    if used != held:
        raise StateDictMismatchError(
            f"{type(model).__name__} ({held - used} of the {held} values under {prefix!r} were not converted)",
            [],
            [],
            [],
            prefix,
        )
    model.load_state_dict({k: v.reshape(target[k].shape) for k, v in converted.items()}, strict=True)
    return model
