"""Thousands of images stream through ``predict_paths`` in bounded memory; bad files among them are skipped.

Two checks: peak RSS growth while scoring 2000 files stays far below what holding them would cost (decoded
192 x 192 images ~220 MB, full-size maps ~300 MB), and, structurally, at most a batch of decoded pictures
(in practice one) and two collated batches are alive at any moment.
"""

from __future__ import annotations

import json
import weakref

import pytest
from PIL import Image
from robust_helpers import PeakRss, encoded, texture

import invert_ad.data.base as data_base
import invert_ad.predict_files as predict_module
from invert_ad.predict_files import predict_paths

NUM_IMAGES = 2000
SIDE = 192
BAD = {17: b"", 999: b"not an image", 1500: None}  # None: a truncated PNG
BATCH = 32


@pytest.fixture(scope="module")
def big_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("many")
    variants = [encoded(Image.fromarray(texture(i, SIDE)), "PNG") for i in range(16)]
    for i in range(NUM_IMAGES):
        data = variants[i % len(variants)]
        if i in BAD:
            data = BAD[i] if BAD[i] is not None else data[: len(data) // 3]
        (folder / f"{i:05d}.png").write_bytes(data)
    return folder


class LiveCounter:
    """Counts objects still alive (weak references), and the most alive at once."""

    def __init__(self) -> None:
        self.live = self.peak = 0

    def track(self, obj) -> None:
        self.live += 1
        self.peak = max(self.peak, self.live)
        weakref.finalize(obj, self._gone)

    def _gone(self) -> None:
        self.live -= 1


@pytest.mark.filterwarnings("ignore:skipping. cannot read image")
def test_thousands_of_images_stream_in_bounded_memory(big_folder, small_detector, tmp_path, monkeypatch):
    predict_paths(small_detector, sorted(big_folder.iterdir())[:64], tmp_path / "warm.json", progress=False)
    pictures, batches = LiveCounter(), LiveCounter()
    real_load, real_collate = data_base.load_image, predict_module.collate_samples

    def load_image(path):
        picture = real_load(path)
        pictures.track(picture)
        return picture

    def collate(samples):
        batch = real_collate(samples)
        batches.track(batch["image"])
        return batch

    monkeypatch.setattr(data_base, "load_image", load_image)
    monkeypatch.setattr(predict_module, "collate_samples", collate)
    out = tmp_path / "report.json"
    with PeakRss() as memory:
        summary = predict_paths(small_detector, [big_folder], out, batch_size=BATCH, progress=False)
    assert summary["num_images"] == NUM_IMAGES and summary["num_failed"] == len(BAD)
    assert 1 <= pictures.peak <= BATCH, f"{pictures.peak} decoded pictures alive at once"
    assert batches.peak <= 2, f"{batches.peak} batches alive at once"
    assert memory.growth_mb < 120, f"peak RSS grew by {memory.growth_mb:.0f} MB"
    rows = json.loads(out.read_text())
    assert [r["path"] for r in rows] == sorted(str(p) for p in big_folder.iterdir())  # input order kept
    assert {i for i, r in enumerate(rows) if r["error"]} == set(BAD)
