"""Bad, odd and huge inputs: readable ones are scored, unreadable ones reported and skipped, nothing crashes.

Huge images (decision, documented here and in the report): Pillow's decompression-bomb guard stays on.
Up to ``PIL.Image.MAX_IMAGE_PIXELS`` (89.5 MP) an image loads silently; up to twice that it loads with a
``DecompressionBombWarning``; beyond, it is an ``ImageReadError`` (reported and skipped by
``predict_paths``) raised from the header, before any pixel is decoded. Raise ``PIL.Image.MAX_IMAGE_PIXELS``
to accept larger images. Memory while reading is about 5 bytes per pixel (decoded file + RGB copy);
``predict`` adds about 11 bytes per pixel (the anomaly map at the original size, normalised, and the mask).
"""

from __future__ import annotations

import math
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from robust_helpers import IMAGE_SIZE, PeakRss, bomb_png, expected_size, image_zoo

from invert_ad.data import FolderDataset, ImageDataset, ImageReadError, ImageRecord, collate_samples, load_image
from invert_ad.predict_files import predict_paths

ZOO = image_zoo()
GOOD = sorted(name for name, (_, ok) in ZOO.items() if ok)
BAD = sorted(name for name, (_, ok) in ZOO.items() if not ok)


def normalized(detector, raw: float) -> float:
    """``pred_score`` by hand: the logistic of docs/concepts.md, 0.5 at the threshold and 0.25 at the median."""
    c = detector.calibration
    return 1 / (1 + math.exp(-math.log(3) * (raw - c.image_threshold) / (c.image_threshold - c.image_median)))


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("zoo")
    for name, (data, _) in ZOO.items():
        (folder / name).write_bytes(data)
    return folder


@pytest.mark.parametrize("name", GOOD)
def test_readable_kinds_load_as_rgb(zoo_dir, name):
    image = load_image(zoo_dir / name)
    assert image.mode == "RGB" and image.size == expected_size(name)
    pixels = np.asarray(image)
    assert pixels.dtype == np.uint8 and pixels.shape == (*expected_size(name)[::-1], 3)


@pytest.mark.parametrize("name", BAD)
def test_unreadable_kinds_raise_image_read_error_naming_the_file(zoo_dir, name):
    start = time.perf_counter()
    with pytest.raises(ImageReadError, match=name.replace(".", r"\.")):
        load_image(zoo_dir / name)
    assert time.perf_counter() - start < 2  # the bomb is refused from its header, not decoded


@pytest.mark.filterwarnings("ignore:skipping. cannot read image")
def test_folder_with_every_kind_scores_the_good_and_reports_the_bad(zoo_dir, small_detector, tmp_path):
    out = tmp_path / "report.json"
    summary = predict_paths(small_detector, [zoo_dir], out, batch_size=8, progress=False)
    import json

    rows = {r["path"].rsplit("/", 1)[-1]: r for r in json.loads(out.read_text())}
    assert sorted(rows) == sorted(ZOO) and summary["num_images"] == len(ZOO)
    assert summary["num_failed"] == len(BAD)
    for name in BAD:  # the concrete reason, without torch's internals
        error = rows[name]["error"]
        assert error.startswith("cannot ") and name in error and "torch" not in error, (name, error)
        assert "pred_score" not in rows[name], name
    for name in GOOD:
        row = rows[name]
        assert row["error"] is None, name
        assert math.isfinite(row["raw_score"]), name
        assert row["pred_score"] == pytest.approx(normalized(small_detector, row["raw_score"]), rel=1e-9), name
        assert (row["width"], row["height"]) == expected_size(name), name


@pytest.mark.filterwarnings("ignore:skipping. cannot read image")
def test_folder_of_only_bad_files_reports_them_all(zoo_dir, small_detector, tmp_path):
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    for name in BAD:
        (bad_dir / name).write_bytes(ZOO[name][0])
    summary = predict_paths(small_detector, [bad_dir], tmp_path / "r.csv", batch_size=4, progress=False)
    expected = {
        "out": str(tmp_path / "r.csv"),
        "num_images": len(BAD),
        "num_anomalous": 0,
        "num_failed": len(BAD),
        "num_out_of_domain": 0,
    }
    assert summary == expected


def test_paths_that_do_not_exist(tmp_path, small_detector, zoo_dir):
    missing = tmp_path / "nowhere" / "x.png"
    with pytest.raises(ImageReadError, match=r"x\.png"):
        load_image(missing)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        predict_paths(small_detector, [zoo_dir / "rgb.png", missing], tmp_path / "r.json", progress=False)
    assert not (tmp_path / "r.json").exists()
    with pytest.raises(FileNotFoundError, match="normal folder"):
        FolderDataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        predict_paths(small_detector, [tmp_path / "empty"], tmp_path / "r.json", progress=False)


@pytest.mark.filterwarnings("ignore:skipping. cannot read image")
def test_file_vanishing_after_listing_is_reported(tmp_path, small_detector, zoo_dir, monkeypatch):
    """A file deleted between listing and reading (another process cleaning up) is one error row."""
    import invert_ad.predict_files as predict_module

    real = predict_module.expand_inputs
    monkeypatch.setattr(
        predict_module, "expand_inputs", lambda inputs, problems=None: [*real(inputs, problems), tmp_path / "gone.png"]
    )
    summary = predict_paths(small_detector, [zoo_dir / "rgb.png"], tmp_path / "r.json", progress=False)
    assert summary["num_images"] == 2 and summary["num_failed"] == 1


def test_dangling_symlink_in_a_folder_is_reported_and_the_rest_scored(tmp_path, small_detector, zoo_dir):
    """A link whose target is gone (or a link loop) gets an error row naming it; it is not skipped silently."""
    import json

    folder = tmp_path / "inputs"
    folder.mkdir()
    for name in ("rgb.png", "gray.png"):
        (folder / name).write_bytes(ZOO[name][0])
    (folder / "broken.png").symlink_to(tmp_path / "deleted.png")
    (folder / "loop.png").symlink_to(folder / "loop.png")
    (folder / "notes.txt").symlink_to(tmp_path / "deleted.txt")  # not named like an image: ignored as before
    out = tmp_path / "r.json"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = predict_paths(small_detector, [folder], out, progress=False)
    assert not [w for w in caught if "skipping" in str(w.message)]  # the reasons are in the rows, not warnings
    assert summary["num_images"] == 4 and summary["num_failed"] == 2
    rows = {r["path"]: r for r in json.loads(out.read_text())}
    assert rows[str(folder / "broken.png")] == {"path": str(folder / "broken.png"), "error": "dangling symbolic link"}
    assert rows[str(folder / "loop.png")]["error"] == "symbolic link loop"
    for name in ("rgb.png", "gray.png"):
        row = rows[str(folder / name)]
        assert row["error"] is None, name
        assert row["pred_score"] == pytest.approx(normalized(small_detector, row["raw_score"]), rel=1e-9), name
    only_broken = tmp_path / "only_broken"
    only_broken.mkdir()
    (only_broken / "x.png").symlink_to(tmp_path / "deleted.png")
    summary = predict_paths(small_detector, [only_broken], tmp_path / "r.json", progress=False)
    assert summary["num_images"] == 1 and summary["num_failed"] == 1
    assert json.loads((tmp_path / "r.json").read_text())[0]["error"] == "dangling symbolic link"


def test_dataset_skip_bad_without_and_with(zoo_dir):
    records = [ImageRecord(zoo_dir / n, 0, "good") for n in ("rgb.png", "truncated.png", "gray16.png")]
    strict = ImageDataset(records, image_size=IMAGE_SIZE)
    with pytest.raises(ImageReadError, match=r"truncated\.png"):
        strict[1]
    lenient = ImageDataset(records, image_size=IMAGE_SIZE, skip_bad=True)
    with pytest.warns(UserWarning, match=r"truncated\.png"):
        batch = collate_samples([lenient[i] for i in range(3)])
    assert batch["image"].shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE) and batch["skipped"] == [str(records[1].path)]
    assert torch.isfinite(batch["image"]).all() and batch["image"].min() >= 0 and batch["image"].max() <= 1


def test_huge_image_time_and_memory_stay_bounded(tmp_path, small_detector):
    """10000 x 10000 (100 MP, above Pillow's 89.5 MP warning level): loads with a warning, in bounded memory."""
    path = tmp_path / "huge.png"
    picture = Image.new("L", (10000, 10000), 128)
    picture.paste(200, (2000, 2000, 3000, 3000))
    picture.save(path, compress_level=1)
    del picture
    dataset = ImageDataset([ImageRecord(path, 0, "good")], image_size=IMAGE_SIZE)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught, PeakRss() as memory:
        warnings.simplefilter("always")
        sample = dataset[0]
    assert time.perf_counter() - start < 20
    assert memory.growth_mb < 700  # about 5 bytes per pixel (L file + RGB copy)
    assert any(issubclass(w.category, Image.DecompressionBombWarning) for w in caught)
    assert sample["image"].shape == (3, IMAGE_SIZE, IMAGE_SIZE) and sample["original_size"].tolist() == [10000, 10000]
    start = time.perf_counter()
    with warnings.catch_warnings(), PeakRss() as memory:
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        summary = predict_paths(small_detector, [path], tmp_path / "r.json", progress=False)
    assert summary["num_failed"] == 0
    assert time.perf_counter() - start < 60
    assert memory.growth_mb < 2000  # plus ~11 bytes per pixel for the full-size map, its normalisation and mask


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb_png(20000, 20000))  # 400 MP claimed by a file of a few hundred bytes
    with PeakRss() as memory, pytest.raises(ImageReadError, match="DecompressionBombError"):
        load_image(path)
    assert memory.growth_mb < 50
