"""A disk cache of backbone features: one safetensors file per (extractor, image size, file content).

Layout: ``DIRECTORY/<extractor key>/<sha256 of the image file>.safetensors`` holding one tensor ``features``
``(C, h, w)``. The extractor key hashes the extractor's config, its weights (every tensor of its state dict), the
image size and this format's version, so a changed backbone never reads stale features. Files are written to a
temporary name and moved into place with ``os.replace``, so readers never see a partial file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from ..defaults import CPU_BACKBONE_BATCH
from ..features.extractor import FeatureExtractor
from .base import ImageDataset, collate_samples

__all__ = ["FeatureCache", "cached_features", "default_cache_dir", "extractor_key", "file_digest"]

_FORMAT_VERSION = 1
_TENSOR_NAME = "features"
_KEY_LENGTH = 24
_CHUNK = 1 << 20


def default_cache_dir() -> Path:
    """``$INVERT_AD_CACHE/features`` or ``~/.cache/invert_ad/features``: where features are cached between runs."""
    return Path(os.environ.get("INVERT_AD_CACHE", Path.home() / ".cache" / "invert_ad")) / "features"


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def extractor_key(extractor: FeatureExtractor, image_size: int) -> str:
    """Short hash identifying what an extractor computes: its ``get_config()``, its weights and the image size.

    Args:
        extractor: a feature extractor with ``get_config()`` (its state dict tensors are hashed too, so two
            randomly initialised extractors with equal configs get different keys).
        image_size: side of the square input images, in pixels.
    """
    digest = hashlib.sha256()
    header = {"config": extractor.get_config(), "image_size": int(image_size), "format": _FORMAT_VERSION}
    digest.update(json.dumps(header, sort_keys=True).encode())
    for name, tensor in extractor.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:_KEY_LENGTH]


class FeatureCache:
    """Features on disk keyed by extractor key and file digest.

    Args:
        directory: where the cache lives (created on first write).
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)

    def path(self, key: str, digest: str) -> Path:
        """The file holding the features of content ``digest`` computed by extractor ``key``."""
        return self.directory / key / f"{digest}.safetensors"

    def load(self, key: str, digest: str) -> torch.Tensor | None:
        """The cached ``(C, h, w)`` features, or ``None`` if absent or unreadable (the latter with a warning)."""
        path = self.path(key, digest)
        if not path.is_file():
            return None
        try:
            return load_file(str(path))[_TENSOR_NAME]
        except Exception as err:  # a corrupt entry is recomputed, not fatal
            warnings.warn(f"ignoring unreadable cache entry {path}: {err}", stacklevel=2)
            return None

    def save(self, key: str, digest: str, features: torch.Tensor, metadata: dict[str, str] | None = None) -> Path:
        """Write ``(C, h, w)`` features atomically (temporary file, then ``os.replace``); return the path."""
        path = self.path(key, digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{digest}.", suffix=".tmp")
        os.close(handle)
        try:
            save_file({_TENSOR_NAME: features.detach().cpu().contiguous().clone()}, temporary, metadata=metadata)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return path


def _device_of(extractor: FeatureExtractor) -> torch.device:
    parameter = next(extractor.parameters(), None) if isinstance(extractor, torch.nn.Module) else None
    return parameter.device if parameter is not None else torch.device("cpu")


def cached_features(
    extractor: FeatureExtractor,
    dataset: ImageDataset,
    cache: FeatureCache | None = None,
    batch_size: int = 16,
    *,
    progress: bool = True,
    num_workers: int = 0,
) -> tuple[torch.Tensor, list[str]]:
    """Features of every readable image of ``dataset``, computing only those not in ``cache``.

    Images are read with the dataset's ``skip_bad`` setting: with ``skip_bad=True`` unreadable files are left
    out (and counted in a warning); otherwise the first one raises :class:`~invert_ad.data.ImageReadError`.

    Args:
        extractor: a :class:`~invert_ad.features.FeatureExtractor`, on the device it should run on.
        dataset: an :class:`~invert_ad.data.ImageDataset` with the extractor's ``image_size``.
        cache: where to read and write features; ``None`` computes everything without caching.
        batch_size: images per forward pass.
        progress: show a tqdm bar over the batches computed.
        num_workers: ``DataLoader`` worker processes for reading images.

    Returns:
        ``(features, paths)``: ``(N, C, h, w)`` float32 on the CPU in dataset order, and the N image paths
        (the dataset's paths minus skipped ones).

    Raises:
        ValueError: the dataset's and the extractor's ``image_size`` differ.
    """
    if dataset.image_size != extractor.image_size:
        raise ValueError(
            f"the dataset gives {dataset.image_size} px images but the extractor expects {extractor.image_size} px"
        )
    paths = dataset.paths
    features: list[torch.Tensor | None] = [None] * len(paths)
    key = extractor_key(extractor, dataset.image_size) if cache is not None else ""
    digests = [file_digest(p) for p in paths] if cache is not None else []
    if cache is not None:
        features = [cache.load(key, d) for d in digests]
    missing = [i for i, f in enumerate(features) if f is None]
    skipped: list[str] = []
    if missing:
        loader = DataLoader(
            Subset(dataset, missing), batch_size=batch_size, num_workers=num_workers, collate_fn=collate_samples
        )
        device = _device_of(extractor)
        name = extractor.get_config().get("name", type(extractor).__name__)
        for batch in tqdm(loader, desc=f"features ({name})", disable=not progress, unit="batch"):
            skipped += batch["skipped"]
            if not batch["path"]:
                continue
            images = batch["image"].to(device)
            calls = images.split(CPU_BACKBONE_BATCH if device.type == "cpu" else len(images))  # see the constant
            computed = torch.cat([extractor(part) for part in calls]).float().cpu()
            for index, row in zip(batch["index"].tolist(), computed, strict=True):
                features[index] = row
                if cache is not None:
                    cache.save(key, digests[index], row, metadata={"path": paths[index]})
    if skipped:
        warnings.warn(f"{len(skipped)} unreadable image(s) skipped, e.g. {skipped[:3]}", stacklevel=2)
    kept = [i for i, f in enumerate(features) if f is not None]
    if not kept:
        return torch.empty(0, extractor.channels, *extractor.grid), []
    return torch.stack([features[i] for i in kept]), [paths[i] for i in kept]
