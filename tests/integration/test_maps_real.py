"""Real tire images: a detector trained with a shared-Gaussian map statistic localises cuts."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from invert_ad.data import MVTecDataset, collate_samples
from invert_ad.detector import AnomalyDetector
from invert_ad.metrics import evaluate_metrics
from invert_ad.scoring import MahalanobisMap
from invert_ad.training.train import train_detector

pytestmark = pytest.mark.integration


def _pixel_auroc(maps: torch.Tensor, masks: np.ndarray) -> float:
    scores = np.arange(len(masks), dtype=float)  # image metrics are not looked at here
    labels = np.array([0] + [1] * (len(masks) - 1))
    return evaluate_metrics(scores, labels, maps.numpy(), masks)["pixel_auroc"]


def test_shared_map_detector_on_real_tires(tire_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "tire"
    (data / "train" / "good").mkdir(parents=True)
    for image in sorted((tire_dir / "train" / "good").iterdir())[:12]:
        shutil.copy(image, data / "train" / "good" / image.name)
    summary = train_detector(
        data, tmp_path / "model", map_prior="shared", map_pool=3, cache_dir=tmp_path / "cache", progress=False
    )
    assert summary.info["grid"] == 16 and "MahalanobisMap" in summary.info["map_statistic"]
    detector = AnomalyDetector.from_pretrained(tmp_path / "model")
    assert isinstance(detector.scorer.map_statistic, MahalanobisMap) and detector.scorer.map_statistic.pool == 3

    test = MVTecDataset(tire_dir, "test")
    cuts = [i for i, label in enumerate(test.labels) if label][:5]
    picks = [test.labels.index(0), *cuts]
    batch = collate_samples([test[i] for i in picks])
    masks = batch["mask"].squeeze(1).numpy() > 0.5
    out = detector.score(batch["image"])
    assert out.raw_map.shape == (6, 256, 256) and torch.isfinite(out.raw_score).all()
    shared = _pixel_auroc(out.raw_map, masks)
    print(f"pixel AUROC on 5 cut tires, 12 training images, shared-Gaussian map: {shared:.3f}")
    assert shared > 0.9
