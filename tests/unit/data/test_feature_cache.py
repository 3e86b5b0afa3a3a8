"""FeatureCache and cached_features with a tiny counting extractor."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from invert_ad.data import FeatureCache, FolderDataset, cached_features, extractor_key, file_digest


class CountingExtractor(nn.Module):
    """(B, 3, 8, 8) -> (B, 2, 4, 4) by a fixed 2 x 2 average pool and a 1 x 1 conv; counts images seen."""

    channels, grid, image_size = 2, (4, 4), 8
    mean = std = (0.5, 0.5, 0.5)

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1, bias=False)
        nn.init.constant_(self.conv.weight, scale)
        self.seen = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.seen += len(images)
        return self.conv(nn.functional.avg_pool2d(images, 2))

    def get_config(self) -> dict:
        return {"name": "counting", "image_size": self.image_size}


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{i}.png")
    return tmp_path / "images"


def test_file_digest_is_sha256_of_the_bytes(folder):
    path = folder / "0.png"
    assert file_digest(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_features_are_computed_once_then_read(folder, tmp_path):
    dataset = FolderDataset(folder, image_size=8)
    extractor, cache = CountingExtractor(), FeatureCache(tmp_path / "cache")
    features, paths = cached_features(extractor, dataset, cache, batch_size=2, progress=False)
    assert features.shape == (5, 2, 4, 4) and paths == dataset.paths and extractor.seen == 5
    images = torch.stack([dataset[i]["image"] for i in range(5)])
    torch.testing.assert_close(features, extractor(images))
    extractor.seen = 0
    again, _ = cached_features(extractor, dataset, cache, batch_size=2, progress=False)
    assert extractor.seen == 0 and torch.equal(again, features)
    entries = sorted((tmp_path / "cache").rglob("*"))
    assert sum(p.suffix == ".safetensors" for p in entries) == 5 and not any(p.suffix == ".tmp" for p in entries)


def test_only_changed_or_new_files_are_recomputed(folder, tmp_path):
    extractor, cache = CountingExtractor(), FeatureCache(tmp_path / "cache")
    cached_features(extractor, FolderDataset(folder, image_size=8), cache, progress=False)
    Image.fromarray(np.zeros((12, 10, 3), dtype=np.uint8)).save(folder / "1.png")
    Image.fromarray(np.full((12, 10, 3), 255, dtype=np.uint8)).save(folder / "9.png")
    extractor.seen = 0
    features, paths = cached_features(extractor, FolderDataset(folder, image_size=8), cache, progress=False)
    assert extractor.seen == 2 and len(paths) == 6
    assert torch.equal(features[1], torch.zeros(2, 4, 4)) and torch.allclose(features[5], torch.full((2, 4, 4), 3.0))


def test_key_depends_on_config_weights_and_size():
    a, b = CountingExtractor(), CountingExtractor(scale=2.0)
    assert extractor_key(a, 8) == extractor_key(CountingExtractor(), 8)
    assert extractor_key(a, 8) != extractor_key(b, 8)
    assert extractor_key(a, 8) != extractor_key(a, 16)


def test_corrupt_entry_is_recomputed(folder, tmp_path):
    dataset = FolderDataset(folder, image_size=8)
    extractor, cache = CountingExtractor(), FeatureCache(tmp_path / "cache")
    reference, _ = cached_features(extractor, dataset, cache, progress=False)
    entry = cache.path(extractor_key(extractor, 8), file_digest(dataset.paths[3]))
    entry.write_bytes(b"garbage")
    extractor.seen = 0
    with pytest.warns(UserWarning, match="unreadable cache entry"):
        features, _ = cached_features(extractor, dataset, cache, progress=False)
    assert extractor.seen == 1 and torch.equal(features, reference)


def test_failed_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    cache = FeatureCache(tmp_path)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("invert_ad.data.cache.os.replace", fail)
    with pytest.raises(OSError, match="disk full"):
        cache.save("key", "abc", torch.ones(2, 4, 4))
    assert list((tmp_path / "key").iterdir()) == []


def test_unreadable_images_are_skipped_and_counted(folder, tmp_path):
    (folder / "2.png").write_bytes((folder / "2.png").read_bytes()[:40])
    dataset = FolderDataset(folder, image_size=8, skip_bad=True)
    with pytest.warns(UserWarning) as caught:
        features, paths = cached_features(CountingExtractor(), dataset, FeatureCache(tmp_path / "c"), progress=False)
    messages = [str(w.message) for w in caught]
    assert any(m.startswith("skipping: cannot read image") for m in messages)
    assert any(m.startswith("1 unreadable image(s) skipped") for m in messages)
    assert features.shape == (4, 2, 4, 4) and str(folder / "2.png") not in paths and len(paths) == 4


def test_without_cache_and_size_mismatch(folder):
    features, _ = cached_features(CountingExtractor(), FolderDataset(folder, image_size=8), None, progress=False)
    assert features.shape == (5, 2, 4, 4)
    with pytest.raises(ValueError, match="16 px images but the extractor expects 8 px"):
        cached_features(CountingExtractor(), FolderDataset(folder, image_size=16), None, progress=False)
