"""The main job on a small slice of real data: train -> save -> load -> evaluate -> predict, Python and CLI.

Uses the real lite0 backbone and a few mvtec3d_tire images (seconds). Metrics are checked against a direct
scikit-learn computation on the same scores and maps.
"""

import csv
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from invert_ad.cli import main
from invert_ad.data import MVTecDataset
from invert_ad.defaults import DEFAULT_TIMESTEPS
from invert_ad.detector import AnomalyDetector
from invert_ad.evaluation import evaluate_detector
from invert_ad.predict_files import predict_paths
from invert_ad.schedule import resolve_grid
from invert_ad.training import TrainingConfig
from invert_ad.training.train import train_detector

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tiny_category(tire_dir, tmp_path_factory):
    """An MVTec-layout folder of links: 12 train, 4 good + 4 cut test images with their masks."""
    root = tmp_path_factory.mktemp("tire_slice")
    picks = {
        "train/good": sorted((tire_dir / "train/good").iterdir())[:12],
        "test/good": sorted((tire_dir / "test/good").iterdir())[:4],
        "test/cut": sorted((tire_dir / "test/cut").iterdir())[:4],
    }
    for folder, files in picks.items():
        (root / folder).mkdir(parents=True)
        for f in files:
            os.symlink(f, root / folder / f.name)
    (root / "ground_truth/cut").mkdir(parents=True)
    for f in picks["test/cut"]:
        os.symlink(
            tire_dir / "ground_truth/cut" / f"{f.stem}_mask.png", root / "ground_truth/cut" / f"{f.stem}_mask.png"
        )
    return root


@pytest.fixture(scope="module")
def trained(tiny_category, tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / "tire"
    cache = tmp_path_factory.mktemp("cache")
    summary = train_detector(
        tiny_category,
        out,
        denoiser="gaussian-residual-conv",
        denoiser_overrides={"residual_config": {"width": 32, "depth": 1}},
        training=TrainingConfig(steps=3, minutes=None, batch_size=8),
        cache_dir=cache,
        progress=False,
    )
    return summary, cache


def test_training_saves_a_loadable_calibrated_model(trained):
    summary, _ = trained
    assert summary.num_train + summary.num_calibration == 12 and summary.steps == 3  # a trained denoiser: held out
    files = {p.name for p in summary.out_dir.iterdir()}
    assert {"scorer_config.json", "detector_config.json", "README.md", "denoiser", "scheduler"} <= files
    assert not summary.out_dir.with_name("tire.checkpoint").exists()
    loaded = AnomalyDetector.from_pretrained(summary.out_dir)
    images = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    original, again = summary.detector.score(images), loaded.score(images)
    assert torch.equal(original.raw_score, again.raw_score)
    assert torch.equal(original.raw_map, again.raw_map)
    assert loaded.calibration == summary.detector.calibration
    card = (summary.out_dir / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: invert_ad") and "from_pretrained" in card
    diagnostics = summary.info["diagnostics"]
    assert diagnostics["status"] in {"behind_trivial", "behind_gaussian", "ready"}  # trained, so not "fitted"
    default_calls = list(resolve_grid(DEFAULT_TIMESTEPS).call_points)  # the default grid's own call points
    assert diagnostics["call_points"] == default_calls and f"verdict: {summary.info['verdict']}" in card


def test_evaluation_matches_sklearn(trained, tiny_category, tmp_path):
    summary, cache = trained
    report = evaluate_detector(
        summary.detector,
        tiny_category,
        tmp_path / "r.json",
        heatmaps=2,
        cache_dir=cache,
        plots=True,
        progress=False,
        batch_size=4,
    )
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["image_auroc"] == report["image_auroc"] and len(saved["per_image"]) == 8
    labels = [r["label"] for r in report["per_image"]]
    scores = [r["raw_score"] for r in report["per_image"]]
    assert report["image_auroc"] == pytest.approx(roc_auc_score(labels, scores))
    assert report["image_ap"] == pytest.approx(average_precision_score(labels, scores))
    test = MVTecDataset(tiny_category, split="test")
    samples = [test[i] for i in range(len(test))]
    maps = summary.detector.score(torch.stack([s["image"] for s in samples])).raw_map.numpy()
    masks = np.stack([s["mask"][0].numpy() for s in samples]) > 0
    assert report["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-6)
    assert (
        report["nfe"] == len(resolve_grid(DEFAULT_TIMESTEPS).call_points)
        and report["latency_ms_batch1"] > 0
        and report["throughput_images_per_s"] > 0
    )
    assert len(report["heatmaps"]) == 2 and all(Path(p).stat().st_size > 1000 for p in report["heatmaps"])
    assert all(Path(p).is_file() for p in report["plots"])


def test_predict_reports_bad_files_and_scores_the_rest(trained, tiny_category, tmp_path):
    summary, _ = trained
    folder = tmp_path / "incoming"
    folder.mkdir()
    for f in sorted((tiny_category / "test/cut").iterdir())[:2]:
        os.symlink(f.resolve(), folder / f.name)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    result = predict_paths(summary.detector, [folder], tmp_path / "out.csv", maps_dir=tmp_path / "maps", progress=False)
    assert result["num_images"] == 3 and result["num_failed"] == 1
    rows = list(csv.DictReader((tmp_path / "out.csv").open()))
    assert [Path(r["path"]).name for r in rows] == ["000.png", "001.png", "broken.png"]
    assert rows[2]["error"] and rows[0]["height"] == "384" and rows[0]["width"] == "288"
    c = summary.detector.calibration  # pred_score by hand from the raw score
    raw = float(rows[0]["raw_score"])
    by_hand = 1 / (1 + math.exp(-math.log(3) * (raw - c.image_threshold) / (c.image_threshold - c.image_median)))
    assert float(rows[0]["pred_score"]) == pytest.approx(by_hand, rel=1e-6)
    from PIL import Image

    assert rows[0]["map_path"] == str(tmp_path / "maps" / "000.map.png") and rows[2]["map_path"] == ""
    assert Image.open(rows[0]["map_path"]).size == (288, 384)  # (W, H)
    assert "cannot read image" in rows[2]["error"]
    with pytest.raises(FileNotFoundError, match="no such file"):
        predict_paths(summary.detector, [tmp_path / "missing"], tmp_path / "x.json")


def test_cli_train_evaluate_predict(tiny_category, trained, tmp_path, capsys):
    _, cache = trained
    model = tmp_path / "model"
    assert (
        main(
            [
                "--quiet",
                "train",
                "--data",
                str(tiny_category),
                "--out",
                str(model),
                "--denoiser",
                "gaussian",
                "--cache-dir",
                str(cache),
            ]
        )
        == 0
    )
    printed = capsys.readouterr()
    record = json.loads(printed.out)
    assert record["steps"] == 0 and record["diagnostics"]["status"] == "fitted"
    assert f"verdict: {record['verdict']}" in printed.err and record["verdict"].startswith("fitted denoiser")
    assert "verdict: fitted denoiser" in (model / "README.md").read_text()
    report = tmp_path / "eval.json"
    assert (
        main(
            [
                "--quiet",
                "evaluate",
                "--model",
                str(model),
                "--data",
                str(tiny_category),
                "--out",
                str(report),
                "--heatmaps",
                "1",
                "--no-timing",
                "--cache-dir",
                str(cache),
            ]
        )
        == 0
    )
    assert 0.0 <= json.loads(report.read_text())["aupro"] <= 1.0
    assert (
        main(
            [
                "--quiet",
                "predict",
                "--model",
                str(model),
                str(tiny_category / "test/good"),
                "--out",
                str(tmp_path / "p.json"),
            ]
        )
        == 0
    )
    assert len(json.loads((tmp_path / "p.json").read_text())) == 4
    assert (
        main(
            [
                "--quiet",
                "evaluate",
                "--model",
                str(tmp_path / "nope"),
                "--data",
                str(tiny_category),
                "--out",
                str(report),
            ]
        )
        == 2
    )
    assert "model folder not found" in capsys.readouterr().err
