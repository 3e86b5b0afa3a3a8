"""Data: robust image and mask reading, anomaly-detection datasets and a disk cache of backbone features.

Datasets return :class:`Sample` dicts (``image`` ``(3, S, S)`` in [0, 1], ``label``, ``mask`` ``(1, S, S)``,
``path``, ``defect_type``, ``original_size``, ``index``). With ``skip_bad=True`` and
``DataLoader(..., collate_fn=collate_samples)`` one unreadable file never stops a run.

Example:
    >>> train = MVTecDataset("data/mvtec/bottle", split="train")                       # doctest: +SKIP
    >>> feats, paths = cached_features(extractor, train, FeatureCache("runs/cache"))  # doctest: +SKIP
"""

from .base import GOOD, DatasetProblem, ImageDataset, ImageRecord, Sample, collate_samples
from .cache import FeatureCache, cached_features, default_cache_dir, extractor_key, file_digest
from .folder import FolderDataset
from .images import IMAGE_EXTENSIONS, ImageReadError, list_images, load_image, load_mask
from .layout import category_folders, open_dataset
from .mvtec import MVTecDataset
from .visa import VisADataset

__all__ = [
    "GOOD",
    "IMAGE_EXTENSIONS",
    "DatasetProblem",
    "FeatureCache",
    "FolderDataset",
    "ImageDataset",
    "ImageReadError",
    "ImageRecord",
    "MVTecDataset",
    "Sample",
    "VisADataset",
    "cached_features",
    "category_folders",
    "collate_samples",
    "default_cache_dir",
    "extractor_key",
    "file_digest",
    "list_images",
    "load_image",
    "load_mask",
    "open_dataset",
]
