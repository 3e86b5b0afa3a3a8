"""Real data from ../shared/data: split counts, masks, gray JPGs, and lite0 features of a few images."""

from __future__ import annotations

import pytest
import torch

from invert_ad.data import MVTecDataset, collate_samples

pytestmark = pytest.mark.integration


def test_tire_splits_and_masks(tire_dir):
    assert len(MVTecDataset(tire_dir, "train")) == 210
    assert len(MVTecDataset(tire_dir, "validation")) == 29
    test = MVTecDataset(tire_dir, "test")
    assert test.labels.count(0) == 25 and test.labels.count(1) == 87 and not test.problems
    anomalous = [i for i, label in enumerate(test.labels) if label][:2]
    for sample in (test[i] for i in anomalous):
        assert sample["image"].shape == (3, 256, 256)
        assert set(sample["mask"].unique().tolist()) == {0.0, 1.0}
        assert sample["original_size"].tolist() == [384, 288]


def test_mtd_gray_jpgs_become_rgb(mtd_dir):
    train = MVTecDataset(mtd_dir, "train")
    assert len(train) == 762 and not train.problems
    image = train[0]["image"]
    assert image.shape == (3, 256, 256) and torch.equal(image[0], image[2])
    test = MVTecDataset(mtd_dir, "test")
    assert test.labels.count(0) == 190 and test.labels.count(1) == 392
    assert set(test[0]["mask"].unique().tolist()) <= {0.0, 1.0}


def test_lite0_features_of_real_images(tire_dir, mtd_dir):
    from invert_ad.features import create_feature_extractor

    extractor = create_feature_extractor("efficientnet_lite0")
    samples = [MVTecDataset(tire_dir, "test")[i] for i in (0, 60)] + [MVTecDataset(mtd_dir, "train")[0]]
    features = extractor(collate_samples(samples)["image"])
    assert features.shape == (3, 192, 16, 16) and torch.isfinite(features).all()
    assert features.std() > 0
