"""One detector for several products (the unified setting), on slices of both real categories, through the CLI:
train on two folders, evaluate on both, a table per category and the mean (checked by hand); the routed
detector scores each category exactly as a detector trained on that category alone."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from invert_ad import AnomalyDetector, RoutedDetector
from invert_ad.cli import main
from invert_ad.data import category_folders
from invert_ad.models import GaussianMixtureDenoiser

pytestmark = pytest.mark.integration


def slice_category(source: Path, root: Path, defect: str, train: int = 10, test: int = 3) -> Path:
    """An MVTec-layout folder of links: ``train`` normal images, ``test`` good and ``test`` defective with masks."""
    picks = {
        "train/good": sorted((source / "train/good").iterdir())[:train],
        "test/good": sorted((source / "test/good").iterdir())[:test],
        f"test/{defect}": sorted((source / "test" / defect).iterdir())[:test],
    }
    for folder, files in picks.items():
        (root / folder).mkdir(parents=True)
        for f in files:
            os.symlink(f, root / folder / f.name)
    (root / "ground_truth" / defect).mkdir(parents=True)
    for f in picks[f"test/{defect}"]:
        mask = f"{f.stem}_mask.png"
        os.symlink(source / "ground_truth" / defect / mask, root / "ground_truth" / defect / mask)
    return root


def test_unified_train_and_evaluate(tire_dir, mtd_dir, tmp_path):
    tire = slice_category(tire_dir, tmp_path / "tire", "cut")
    mtd = slice_category(mtd_dir, tmp_path / "mtd", "blowhole")
    common = ["--quiet"]
    model = tmp_path / "model"
    cache = ["--cache-dir", str(tmp_path / "cache")]
    assert (
        main(
            [
                *common,
                "train",
                "--data",
                str(tire),
                str(mtd),
                "--out",
                str(model),
                "--denoiser",
                "gaussian-mixture",
                "--unified",
                "joint",
                "--folds",
                "2",
                *cache,
            ]
        )
        == 0
    )
    detector = AnomalyDetector.from_pretrained(model)
    assert isinstance(detector.scorer.denoiser, GaussianMixtureDenoiser)
    assert detector.scorer.denoiser.config.num_components == 2  # one Gaussian per product
    assert detector.calibration.num_images == 20 and detector.calibration.folds == 2  # pooled, out of fold
    out = tmp_path / "report.json"
    assert (
        main(
            [
                *common,
                "evaluate",
                "--model",
                str(model),
                "--data",
                str(tire),
                str(mtd),
                "--out",
                str(out),
                "--no-timing",
                "--heatmaps",
                "0",
                *cache,
            ]
        )
        == 0
    )
    summary = json.loads(out.read_text())
    assert sorted(summary["categories"]) == ["mtd", "tire"]
    for name in ("tire", "mtd"):
        full = json.loads(Path(summary["reports"][name]).read_text())
        assert summary["categories"][name]["image_auroc"] == full["image_auroc"] and full["num_images"] == 6
    for key in ("image_auroc", "pixel_auroc", "aupro", "mad"):
        values = [summary["categories"][n][key] for n in ("tire", "mtd")]
        assert summary["mean"][key] == pytest.approx(np.mean(values))
    table = out.with_suffix(".md").read_text().splitlines()
    assert table[0] == "| category | I-AUROC | I-AP | I-F1max | P-AUROC | P-AP | P-F1max | AU-PRO | mAD |"
    mean_row = table[-1].split("|")
    assert mean_row[1].strip() == "mean" and float(mean_row[2]) == pytest.approx(
        100 * summary["mean"]["image_auroc"], abs=0.06
    )


def test_routed_equals_one_detector_per_category(tire_dir, mtd_dir, tmp_path):
    tire = slice_category(tire_dir, tmp_path / "tire", "cut")
    mtd = slice_category(mtd_dir, tmp_path / "mtd", "blowhole")
    cache = ["--cache-dir", str(tmp_path / "cache")]
    train = ["--quiet", "train", "--folds", "2", "--fpr", "0.2", *cache]
    assert category_folders(tmp_path) == [mtd, tire]  # a dataset root stands for its category folders
    assert main([*train, "--data", str(tire), str(mtd), "--out", str(tmp_path / "line")]) == 0
    line = AnomalyDetector.from_pretrained(tmp_path / "line")
    assert isinstance(line, RoutedDetector) and list(line.experts) == ["tire", "mtd"]
    out = tmp_path / "line.json"
    evaluate = ["--quiet", "evaluate", "--no-timing", "--heatmaps", "0", *cache]
    assert main([*evaluate, "--model", str(tmp_path / "line"), "--data", str(tire), str(mtd), "--out", str(out)]) == 0
    summary = json.loads(out.read_text())
    for name, folder in (("tire", tire), ("mtd", mtd)):
        model = tmp_path / f"{name}-model"
        assert main([*train, "--data", str(folder), "--out", str(model)]) == 0
        alone = tmp_path / f"{name}.json"
        assert main([*evaluate, "--model", str(model), "--data", str(folder), "--out", str(alone)]) == 0
        reference = json.loads(alone.read_text())
        routed = json.loads(Path(summary["reports"][name]).read_text())
        assert routed["routed_to"] == {n: (6 if n == name else 0) for n in ("tire", "mtd")}
        assert [r["raw_score"] for r in routed["per_image"]] == [r["raw_score"] for r in reference["per_image"]]
        assert routed["aupro"] == reference["aupro"]
