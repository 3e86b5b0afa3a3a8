"""Checkpoint loading and state-dict key remapping for weights trained elsewhere.

Checkpoints of other diffusion anomaly detectors arrive wrapped in many ways: ``module.`` prefixes from
``DataParallel`` / ``DistributedDataParallel``, ``_orig_mod.`` segments from ``torch.compile``, Lightning's
``{"state_dict": {"model.*": ...}}``, DiffusionAD's ``{"unet_model_state_dict": ...}``. :func:`load_weights`
undoes all of them and loads strictly, naming every missing, unexpected or mis-shaped key when the
architecture does not match.

Pickled checkpoints are read only with ``torch.load(weights_only=True)``: a file that needs arbitrary Python
objects to unpickle is refused (:class:`UnsafeCheckpointError`) rather than executed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..io import UnsafeCheckpointError, load_checkpoint, strip_wrapper_prefixes

__all__ = [
    "STATE_DICT_KEYS",
    "StateDictMismatchError",
    "UnsafeCheckpointError",
    "extract_state_dict",
    "find_prefix",
    "load_checkpoint",
    "load_weights",
    "read_checkpoint",
    "strip_wrapper_prefixes",
]

STATE_DICT_KEYS: tuple[str, ...] = ("state_dict", "model_state_dict", "unet_model_state_dict")
"""Keys under which training scripts nest the weights (Lightning, common scripts, DiffusionAD), tried in order."""

_MAX_LISTED = 8


class StateDictMismatchError(RuntimeError):
    """A state dict does not fit a model.

    Attributes:
        missing: keys the model needs that the state dict lacks.
        unexpected: keys of the state dict the model does not have.
        mismatched: ``(key, checkpoint shape, model shape)`` for keys present on both sides with different shapes.
    """

    def __init__(
        self,
        model_name: str,
        missing: list[str],
        unexpected: list[str],
        mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
        prefix: str = "",
    ) -> None:
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        where = f" (keys under the prefix {prefix!r})" if prefix else ""
        lines = [f"the state dict does not fit {model_name}{where}"]
        for title, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape mismatch (checkpoint vs model)", [f"{k}: {tuple(a)} vs {tuple(b)}" for k, a, b in mismatched]),
        ):
            if items:
                more = len(items) - _MAX_LISTED
                shown = ", ".join(items[:_MAX_LISTED]) + (f", ... ({more} more)" if more > 0 else "")
                lines.append(f"  {len(items)} {title}: {shown}")
        super().__init__("\n".join(lines))


def read_checkpoint(source: str | os.PathLike[str] | Mapping[str, Any], allow_unsafe_pickle: bool = False) -> Any:
    """``source`` itself when it is already loaded, else :func:`load_checkpoint` of the path."""
    if isinstance(source, (str, os.PathLike)):
        return load_checkpoint(source, allow_unsafe_pickle=allow_unsafe_pickle)
    return source


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def extract_state_dict(checkpoint: Any, key: str | None = None) -> dict[str, torch.Tensor]:
    """Find the ``{name: tensor}`` mapping inside a loaded checkpoint.

    Args:
        checkpoint: what :func:`load_checkpoint` returned.
        key: the entry holding the weights (e.g. ``"unet_model_state_dict"``, ``"ema"``); ``None`` takes the
            checkpoint itself if it maps names to tensors, else the first of :data:`STATE_DICT_KEYS` present.

    Returns:
        A new dict of the tensors (the checkpoint is not modified).

    Raises:
        KeyError: ``key`` is absent (the message lists the checkpoint's entries).
        ValueError: no state dict found, or the entry is not a mapping of names to tensors.
    """
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"a checkpoint must be a mapping, got {type(checkpoint).__name__}")
    if key is None and _is_tensor_dict(checkpoint):
        return dict(checkpoint)
    if key is None:
        key = next((k for k in STATE_DICT_KEYS if k in checkpoint), None)
        if key is None:
            raise ValueError(
                f"no state dict found: the checkpoint's entries are {sorted(map(str, checkpoint))[:20]} and none "
                f"of {list(STATE_DICT_KEYS)}; pass key= naming the entry that holds the weights"
            )
    elif key not in checkpoint:
        raise KeyError(f"checkpoint has no entry {key!r}; its entries are {sorted(map(str, checkpoint))}")
    if not _is_tensor_dict(checkpoint[key]):
        raise ValueError(f"the checkpoint entry {key!r} is not a non-empty mapping of names to tensors")
    return dict(checkpoint[key])


def find_prefix(state_dict: Mapping[str, torch.Tensor], expected: list[str] | tuple[str, ...] | set[str]) -> str:
    """The prefix under which a state dict stores a model's keys: ``""``, ``"model."``, ``"net."``, ...

    Every prefix made of the first one to three dotted components of a checkpoint key is a candidate; the
    one covering most of ``expected`` wins (``""`` on ties with no coverage).

    Args:
        state_dict: the checkpoint's keys (wrapper prefixes already removed).
        expected: the model's ``state_dict()`` keys.

    Raises:
        ValueError: several different prefixes cover all expected keys (e.g. ``model.`` and ``model_ema.``
            in a Lightning checkpoint with EMA weights); pass ``prefix=`` to choose.
    """
    expected = set(expected)
    candidates = {""}
    for key in state_dict:
        parts = key.split(".")
        candidates.update(".".join(parts[:n]) + "." for n in range(1, min(4, len(parts))))
    coverage = {p: sum(p + k in state_dict for k in expected) for p in candidates}
    best = max(coverage.values())
    winners = sorted(p for p, c in coverage.items() if c == best)
    if best == 0:
        return ""
    if len(winners) > 1 and best == len(expected):
        raise ValueError(f"the checkpoint holds the model's weights under several prefixes {winners}; pass prefix=")
    return winners[0]


def load_weights(
    model: nn.Module,
    source: str | os.PathLike[str] | Mapping[str, Any],
    *,
    key: str | None = None,
    prefix: str | None = None,
    allow_unsafe_pickle: bool = False,
) -> nn.Module:
    """Load a checkpoint into ``model`` strictly, undoing the usual wrappers.

    Steps: read the file safely (:func:`load_checkpoint`), find the state dict (:func:`extract_state_dict`),
    remove ``module.`` / ``_orig_mod.`` (:func:`strip_wrapper_prefixes`), select the entries under the
    prefix holding the model (:func:`find_prefix`: Lightning's ``model.`` / ``net.``, found automatically),
    check keys and shapes, then ``model.load_state_dict``. Values are copied unchanged (cast only if the
    model's dtype differs).

    Args:
        model: the architecture, built with the checkpoint's hyper-parameters.
        source: a checkpoint path or an already loaded checkpoint / state dict.
        key: the checkpoint entry holding the weights (see :func:`extract_state_dict`).
        prefix: the prefix of the model's keys inside the state dict (``None``: found automatically,
            ``""``: none).
        allow_unsafe_pickle: unpickle a file that needs arbitrary Python objects (it can run code: only for
            files you trust; see :func:`load_checkpoint`).

    Returns:
        ``model``, with the weights loaded.

    Raises:
        StateDictMismatchError: missing, unexpected or mis-shaped keys (all named in the message).
        UnsafeCheckpointError: a pickle needing arbitrary objects.
    """
    checkpoint = read_checkpoint(source, allow_unsafe_pickle)
    state_dict = strip_wrapper_prefixes(extract_state_dict(checkpoint, key))
    target = model.state_dict()
    if prefix is None:
        prefix = find_prefix(state_dict, target.keys())
    selected = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    missing = sorted(k for k in target if k not in selected)
    unexpected = sorted(k for k in selected if k not in target)
    mismatched = [
        (k, tuple(v.shape), tuple(target[k].shape))
        for k, v in sorted(selected.items())
        if k in target and v.shape != target[k].shape
    ]
    if missing or unexpected or mismatched:
        raise StateDictMismatchError(type(model).__name__, missing, unexpected, mismatched, prefix)
    model.load_state_dict(selected, strict=True)
    return model
