"""Files that survive crashes: atomic writes of text, tensors and whole folders; safe checkpoint reading."""

from __future__ import annotations

import builtins
import contextlib
import json
import os
import pickle
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

__all__ = [
    "SAFE_CHECKPOINT_GLOBALS",
    "UnsafeCheckpointError",
    "atomic_save_tensors",
    "atomic_torch_save",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "check_replaceable",
    "load_checkpoint",
    "load_tensors",
    "load_torch_checkpoint",
    "replace_directory",
    "strip_wrapper_prefixes",
]

_ORIG_MOD = re.compile(r"(^|\.)_orig_mod\.")

PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl")

_DEFAULT_FACTORIES: tuple[type, ...] = (
    builtins.str,
    builtins.int,
    builtins.float,
    builtins.bool,
    builtins.list,
    builtins.dict,
)


def _defaultdict_as_dict(default_factory: Any = None) -> dict:
    """Stand-in for ``collections.defaultdict`` while unpickling: an empty plain ``dict`` that the items fill.

    Raises:
        pickle.UnpicklingError: a default factory other than a builtin type (it could be any callable).
    """
    if default_factory is not None and default_factory not in _DEFAULT_FACTORIES:
        raise pickle.UnpicklingError(f"refusing a defaultdict whose default factory is {default_factory!r}")
    return {}


SAFE_CHECKPOINT_GLOBALS: tuple[Any, ...] = (
    (_defaultdict_as_dict, "collections.defaultdict"),
    *_DEFAULT_FACTORIES,
)
"""What ``weights_only`` unpickling may build besides tensors and plain containers.

Training scripts store their hyper-parameters next to the weights, e.g. DiffusionAD's ``args``, a
``collections.defaultdict(str)`` (pickled as ``defaultdict`` plus its default factory ``str``). A
``defaultdict`` is read back as a plain ``dict`` with the same items, and only a builtin type may be named as
its factory: nothing of the file's choosing runs. Anything else (functions, other classes, ``__reduce__``
payloads) is still refused.
"""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic(path: str | os.PathLike, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give what a plain open() would
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    return _atomic(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename: readers never see half a file."""
    return _atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented, key-sorted JSON, atomically."""
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def atomic_save_tensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> Path:
    """Save tensors as safetensors, atomically (contiguous CPU copies)."""
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return _atomic(path, lambda tmp: save_file(clean, tmp, metadata=metadata))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` atomically (for training checkpoints holding optimiser state)."""
    return _atomic(path, lambda tmp: torch.save(obj, tmp))


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a safetensors file; a clear error names the path when it is missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tensor file not found: {path}")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from err


class UnsafeCheckpointError(ValueError):
    """A pickled checkpoint needs arbitrary Python objects: it was refused, never executed."""


def load_checkpoint(path: str | os.PathLike, allow_unsafe_pickle: bool = False) -> Any:
    """Read weights from a ``.safetensors`` file or a pickled torch file (``weights_only=True``), on the CPU.

    Raises:
        FileNotFoundError: no such file.
        UnsafeCheckpointError: a pickle that needs arbitrary objects (unless ``allow_unsafe_pickle``).
        ValueError: a truncated or corrupt file.
    """
    if Path(path).suffix == ".safetensors":
        return load_tensors(path)
    return load_torch_checkpoint(path, allow_unsafe_pickle)


def load_torch_checkpoint(path: str | os.PathLike, allow_unsafe_pickle: bool = False) -> Any:
    """Read a ``.pt`` / ``.pth`` / ``.ckpt`` checkpoint with ``torch.load(weights_only=True)``.

    Besides tensors and plain containers the file may hold the classes of :data:`SAFE_CHECKPOINT_GLOBALS`
    (a ``collections.defaultdict`` with a builtin default factory, such as DiffusionAD's ``args``, comes back
    as a plain ``dict``).

    Args:
        path: the checkpoint.
        allow_unsafe_pickle: fall back to full unpickling, which can run arbitrary code. Only for files you
            trust.

    Raises:
        UnsafeCheckpointError: the file holds objects other than tensors and plain containers and
            ``allow_unsafe_pickle`` is false.
        ValueError: it is truncated, corrupt or not a ``torch.save`` file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(list(SAFE_CHECKPOINT_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # what weights_only=True raises for objects it will not build
        if not allow_unsafe_pickle:
            raise UnsafeCheckpointError(
                f"refusing to unpickle {path}: it holds objects other than tensors, so it was not unpickled "
                f"({type(err).__name__}: {str(err).splitlines()[0][:200]}). Convert it to safetensors, or pass "
                "allow_unsafe_pickle=True (to load_checkpoint, load_weights or the adapter's from_checkpoint) if "
                "you trust its source."
            ) from err
    except Exception as err:  # truncated, corrupt or not a torch.save file at all
        raise _unreadable(path, err) from err
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise _unreadable(path, err) from err


def _unreadable(path: Path, err: Exception) -> ValueError:
    first = str(err).splitlines()[0][:200] if str(err) else ""
    return ValueError(f"cannot read checkpoint {path} (truncated or corrupt?): {type(err).__name__}: {first}")


def check_replaceable(target: str | os.PathLike, marker: str | None = None) -> None:
    """Raise ``FileExistsError`` unless ``target`` is absent, an empty folder, or a folder holding ``marker``.

    A file, or (with ``marker``) a non-empty folder without it, is someone else's data: never replaced.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} is a file, not a folder: refusing to replace it")
    if marker is not None and target.is_dir() and any(target.iterdir()) and not (target / marker).is_file():
        raise FileExistsError(
            f"{target} already holds files and is not a model folder (no {marker}): refusing to replace it; "
            "choose a new or empty folder"
        )


@contextlib.contextmanager
def replace_directory(target: str | os.PathLike, *, marker: str | None = None) -> Iterator[Path]:
    """Build a folder in a temporary sibling and swap it in only when the block succeeds.

    The old folder (if any) stays intact until the new one is complete; an exception leaves it untouched.

    Args:
        target: the folder to write.
        marker: a file name an existing ``target`` must hold to be replaced (e.g. a model folder's config): a
            non-empty folder without it is someone else's data and is never deleted.

    Raises:
        FileExistsError: ``target`` is a file, or a non-empty folder without ``marker``.
    """
    target = Path(target)
    check_replaceable(target, marker)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:  # put the old folder back rather than leave none
        if old is not None:
            os.replace(old, target)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def strip_wrapper_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove ``_orig_mod.`` segments (``torch.compile``, anywhere in a key) and leading ``module.`` prefixes
    (``DataParallel`` / DDP, repeated), e.g. ``module._orig_mod.conv.weight`` -> ``conv.weight``.

    Raises:
        ValueError: two keys become the same name.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        name = _ORIG_MOD.sub(r"\1", key)
        while name.startswith("module."):
            name = name[len("module.") :]
        if name in out:
            raise ValueError(f"keys collide after removing wrapper prefixes: {name!r} (from {key!r})")
        out[name] = value
    return out
