"""A crash while writing never leaves a half-written model, cache entry or report, nor stray temporary files."""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from robust_helpers import IMAGE_SIZE, texture

import invert_ad.io
from invert_ad.data import FeatureCache, FolderDataset, cached_features, extractor_key
from invert_ad.detector import AnomalyDetector
from invert_ad.predict_files import predict_paths


class Crash(Exception):
    pass


def files_under(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}


def images() -> torch.Tensor:
    return torch.rand(3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(7))


@pytest.fixture
def other_detector(small_detector) -> AnomalyDetector:
    """The same detector with other thresholds: a "v2" whose save must not clobber "v1" half-way."""
    calibration = dataclasses.replace(small_detector.calibration, image_threshold=123.0)
    detector = AnomalyDetector(
        small_detector.feature_extractor,
        small_detector.scorer,
        feature_mean=small_detector.feature_mean,
        feature_std=small_detector.feature_std,
    )
    detector.calibration_ = calibration
    return detector


def _raise(*args, **kwargs):
    raise Crash("simulated crash")


def _fail_final_swap(monkeypatch):
    """``os.replace`` fails only when moving the finished temporary folder onto the model folder."""
    real = os.replace

    def replace(src, dst):
        if ".tmp-" in Path(src).name and Path(dst).name == "model":
            raise Crash("simulated crash at the final rename")
        return real(src, dst)

    monkeypatch.setattr(invert_ad.io.os, "replace", replace)


CRASH_POINTS = {
    "denoiser weights": lambda mp, det: mp.setattr(type(det.scorer.denoiser), "save_pretrained", _raise),
    "scheduler": lambda mp, det: mp.setattr(type(det.scorer.scheduler), "save_pretrained", _raise),
    "scorer state": lambda mp, det: mp.setattr("invert_ad.scorer.atomic_save_tensors", _raise),
    "detector state": lambda mp, det: mp.setattr("invert_ad.detector.atomic_save_tensors", _raise),
    "detector config": lambda mp, det: mp.setattr("invert_ad.detector.atomic_write_json", _raise),
    "model card": lambda mp, det: mp.setattr("invert_ad.detector.detector_model_card", _raise),
    "final rename": lambda mp, det: _fail_final_swap(mp),
}


@pytest.mark.parametrize("point", list(CRASH_POINTS))
def test_crash_during_save_keeps_the_previous_model(tmp_path, monkeypatch, small_detector, other_detector, point):
    target = tmp_path / "model"
    small_detector.save_pretrained(target)
    before = {name: (target / name).read_bytes() for name in files_under(target) if (target / name).is_file()}
    with monkeypatch.context() as patch:
        CRASH_POINTS[point](patch, other_detector)
        with pytest.raises(Crash):
            other_detector.save_pretrained(target)
    after = {name: (target / name).read_bytes() for name in files_under(target) if (target / name).is_file()}
    assert after == before, "the previous model folder changed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"], "temporary folders were left behind"
    loaded = AnomalyDetector.from_pretrained(target)
    assert loaded.calibration == small_detector.calibration
    assert torch.equal(loaded.score(images()).raw_score, small_detector.score(images()).raw_score)


def test_interrupt_during_save_keeps_the_previous_model(tmp_path, monkeypatch, small_detector, other_detector):
    """KeyboardInterrupt (Ctrl-C) is not an Exception, and is handled the same way."""
    target = tmp_path / "model"
    small_detector.save_pretrained(target)

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("invert_ad.detector.detector_model_card", interrupt)
    with pytest.raises(KeyboardInterrupt):
        other_detector.save_pretrained(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert json.loads((target / "detector_config.json").read_text())["calibration"]["image_threshold"] != 123.0


def test_successful_save_replaces_the_model(tmp_path, small_detector, other_detector):
    target = tmp_path / "model"
    small_detector.save_pretrained(target)
    other_detector.save_pretrained(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert json.loads((target / "detector_config.json").read_text())["calibration"]["image_threshold"] == 123.0


# ------------------------------------------------------------------ feature cache
@pytest.fixture
def folder_of_images(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(6):
        Image.fromarray(texture(i, 48)).save(folder / f"{i:02d}.png")
    return folder


def test_cache_write_crash_leaves_no_partial_entry(tmp_path, monkeypatch):
    cache = FeatureCache(tmp_path / "cache")
    cache.save("key", "digest", torch.ones(3, 2, 2))
    old = cache.path("key", "digest").read_bytes()

    def half_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 7)  # some bytes reach the disk, then the process "dies"
        raise Crash("simulated crash while writing")

    monkeypatch.setattr("invert_ad.data.cache.save_file", half_write)
    with pytest.raises(Crash):
        cache.save("key", "digest", torch.zeros(3, 2, 2))
    with pytest.raises(Crash):
        cache.save("key", "other", torch.zeros(3, 2, 2))
    assert sorted(p.name for p in (tmp_path / "cache" / "key").iterdir()) == ["digest.safetensors"]
    assert cache.path("key", "digest").read_bytes() == old
    assert torch.equal(cache.load("key", "digest"), torch.ones(3, 2, 2))


def test_cache_survives_an_interrupted_extraction(tmp_path, small_detector, folder_of_images):
    """Extraction dies on the second batch: finished entries are complete, the rerun computes only the rest."""
    extractor = small_detector.feature_extractor
    dataset = FolderDataset(folder_of_images, image_size=IMAGE_SIZE)
    cache = FeatureCache(tmp_path / "cache")
    expected, _ = cached_features(extractor, dataset, None, batch_size=2, progress=False)
    calls = {"n": 0}

    def dying(batch):
        calls["n"] += 1
        if calls["n"] == 2:
            raise Crash("killed mid-extraction")
        return extractor(batch)

    with pytest.raises(Crash):
        cached_features(_Wrapped(extractor, dying), dataset, cache, batch_size=2, progress=False)
    folder = tmp_path / "cache" / extractor_key(extractor, IMAGE_SIZE)
    assert sorted(p.suffix for p in folder.iterdir()) == [".safetensors"] * 2  # first batch only, no temp files
    calls["n"] = -100
    features, paths = cached_features(_Wrapped(extractor, dying), dataset, cache, batch_size=2, progress=False)
    assert torch.equal(features, expected) and len(paths) == 6
    assert len(list(folder.iterdir())) == 6


def test_corrupt_cache_entry_is_recomputed(tmp_path, small_detector, folder_of_images):
    extractor = small_detector.feature_extractor
    dataset = FolderDataset(folder_of_images, image_size=IMAGE_SIZE)
    cache = FeatureCache(tmp_path / "cache")
    expected, _ = cached_features(extractor, dataset, cache, progress=False)
    victim = next((tmp_path / "cache").rglob("*.safetensors"))
    victim.write_bytes(victim.read_bytes()[:20])
    with pytest.warns(UserWarning, match="ignoring unreadable cache entry"):
        again, _ = cached_features(extractor, dataset, cache, progress=False)
    # recomputed alone rather than in a batch of six: equal up to float rounding (see test_determinism)
    torch.testing.assert_close(again, expected, rtol=1e-4, atol=1e-4)


class _Wrapped(torch.nn.Module):
    """An extractor whose forward is replaced, keeping its config, weights and image size (same cache key)."""

    def __init__(self, inner, forward) -> None:
        super().__init__()
        self.inner = inner
        self._forward = forward
        self.image_size, self.channels, self.grid = inner.image_size, inner.channels, inner.grid

    def get_config(self):
        return self.inner.get_config()

    def state_dict(self, *args, **kwargs):
        return self.inner.state_dict(*args, **kwargs)

    def forward(self, images):
        return self._forward(images)


# ------------------------------------------------------------------ reports and maps
@pytest.mark.parametrize("suffix", [".json", ".csv"])
def test_report_write_crash_keeps_the_previous_report(tmp_path, monkeypatch, small_detector, folder_of_images, suffix):
    out = tmp_path / "reports" / f"report{suffix}"
    predict_paths(small_detector, [folder_of_images], out, progress=False)
    old = out.read_bytes()
    real = os.replace

    def replace(src, dst):
        if Path(dst) == out:
            raise Crash("crash at the rename")
        return real(src, dst)

    with monkeypatch.context() as patch:
        patch.setattr(invert_ad.io.os, "replace", replace)
        with pytest.raises(Crash):
            predict_paths(small_detector, [folder_of_images], out, progress=False)
    assert out.read_bytes() == old
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]


def test_crash_while_scoring_writes_no_report(tmp_path, monkeypatch, small_detector, folder_of_images):
    out = tmp_path / "report.json"
    calls = {"n": 0}
    real = AnomalyDetector.predict

    def dying(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise Crash("crash on the second batch")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(AnomalyDetector, "predict", dying)
    with pytest.raises(Crash):
        predict_paths(small_detector, [folder_of_images], out, batch_size=2, progress=False)
    assert list(tmp_path.iterdir()) == [tmp_path / "images"]


def test_map_write_crash_leaves_no_temporary_file(tmp_path, monkeypatch, small_detector, folder_of_images):
    maps = tmp_path / "maps"
    real = os.replace

    def replace(src, dst):
        if Path(dst).name.endswith(".mask.png"):
            raise Crash("crash at the rename")
        return real(src, dst)

    monkeypatch.setattr("invert_ad.predict_files.os.replace", replace)
    with pytest.raises(Crash):
        predict_paths(small_detector, [folder_of_images], tmp_path / "r.json", maps_dir=maps, progress=False)
    assert [p.name for p in maps.iterdir()] == ["00.map.png"]  # complete files only
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.asarray(Image.open(maps / "00.map.png")).shape == (48, 48)
