"""AnomalyDetector.fit: out-of-fold thresholds against sklearn's Ledoit-Wolf Mahalanobis distances; decisions;
load-time overrides that refit or refuse; the saved fit round trip."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from sklearn.covariance import LedoitWolf
from torch import nn

from invert_ad import AnomalyDetector, InversionScorer, NotFittedError
from invert_ad.detector import channel_statistics
from invert_ad.models import GaussianDenoiser

SIZE = 8  # images 8 x 8 -> features (3, 2, 2)


class PoolExtractor(nn.Module):
    """A weightless stand-in backbone: ``(B, 3, 8, 8)`` images to ``(B, 3, 2, 2)`` average-pooled features."""

    image_size = SIZE
    channels = 3

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(images, 4)

    def get_config(self) -> dict[str, Any]:
        return {"name": "pool", "image_size": SIZE}


def correlated_images(n: int, seed: int) -> torch.Tensor:
    """Images whose pooled features are correlated across channels (so the covariance matters)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 1, SIZE, SIZE, generator=g)
    return (0.6 * base + 0.4 * torch.rand(n, 3, SIZE, SIZE, generator=g)).clamp(0, 1)


def scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, clip_sample=False)


def standardized(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Standardised pooled features of ``images`` (the detector's input space) and the channel statistics."""
    raw = PoolExtractor()(images)
    mean, std = channel_statistics(raw)
    return (raw - mean.reshape(1, -1, 1, 1)) / std.reshape(1, -1, 1, 1), mean, std


def make_detector(images: torch.Tensor, **scorer_kwargs: Any) -> AnomalyDetector:
    """A Gaussian detector on standardised features of ``images``, inverted with 999 steps by default."""
    features, mean, std = standardized(images)
    kwargs = {"timesteps": 999, "scoring": "max", **scorer_kwargs}
    scorer = InversionScorer(GaussianDenoiser.fit(features), scheduler(), **kwargs)
    return AnomalyDetector(PoolExtractor(), scorer, feature_mean=mean, feature_std=std)


def mahalanobis_max(train: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Per image, the largest per-position Mahalanobis distance under a Ledoit-Wolf Gaussian fitted on ``train``."""
    n, _, h, w = test.shape
    out = np.zeros((n, h * w))
    for p in range(h * w):
        i, j = divmod(p, w)
        lw = LedoitWolf().fit(train[:, :, i, j])
        out[:, p] = np.sqrt(lw.mahalanobis(test[:, :, i, j]))
    return out.max(axis=1)


def out_of_fold_mahalanobis_max(x: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """:func:`mahalanobis_max` of each image under a Gaussian fitted on the other folds (``fit``'s assignment)."""
    fold_of = (torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)) % folds).numpy()
    expected = np.zeros(len(x))
    for fold in range(folds):
        held = fold_of == fold
        expected[held] = mahalanobis_max(x[~held], x[held])
    return expected


def test_out_of_fold_thresholds_match_sklearn():
    """With S = 999 the inversion of a Gaussian is whitening, so the max-norm score is PaDiM's Mahalanobis
    distance; out of fold, each image's distance comes from a Gaussian fitted on the other folds."""
    images = correlated_images(40, seed=0)
    features = standardized(images)[0]
    detector = make_detector(images).fit(images, folds=4, fpr=0.125, seed=3)
    x = features.double().numpy()
    expected = out_of_fold_mahalanobis_max(x, folds=4, seed=3)
    calibration = detector.calibration
    assert calibration.folds == 4 and calibration.num_images == 40
    assert calibration.image_threshold == pytest.approx(
        np.quantile(expected, 0.875), rel=5e-3
    )  # S = 999 Euler steps: ~3e-3 from the exact ODE
    assert calibration.image_median == pytest.approx(
        np.sort(expected)[19], rel=5e-3
    )  # S = 999 Euler steps: ~3e-3 from the exact ODE  # torch's lower median
    in_sample = mahalanobis_max(x, x)
    assert np.quantile(in_sample, 0.875) < 0.95 * calibration.image_threshold  # in sample: optimistic


def test_a_frozen_denoiser_scores_the_given_images():
    images = correlated_images(24, seed=1)
    features = standardized(images)[0]
    detector = make_detector(images)
    frozen = GaussianDenoiser.fit(features[:16])
    frozen.refit = None  # not refittable: the given images are taken as held out
    detector.scorer.denoiser = frozen
    detector.fit(images[16:], fpr=0.25)
    expected = mahalanobis_max(features[:16].double().numpy(), features[16:].double().numpy())
    assert detector.calibration.folds is None
    assert detector.calibration.image_threshold == pytest.approx(
        np.quantile(expected, 0.75), rel=5e-3
    )  # S = 999 Euler steps: ~3e-3 from the exact ODE


def test_decisions_agree_with_the_calibration():
    images = correlated_images(40, seed=2)
    detector = make_detector(images, timesteps="paper", scoring="hybrid").fit(images, fpr=0.1)
    test = torch.cat([correlated_images(6, seed=5), torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator())])
    test[-1, :, :4, :4] = 1.0  # a bright corner: a defect
    out = detector.predict(test)
    cal = detector.calibration
    assert torch.equal(out.raw_score, detector.score(test).raw_score)
    assert torch.equal(out.pred_label, out.raw_score.double() > cal.image_threshold)
    assert torch.equal(out.pred_score > 0.5, out.pred_label)
    assert torch.equal(out.anomaly_map > 0.5, out.raw_map > cal.pixel_threshold)
    assert not out.pred_mask[~out.pred_label].any()  # no mask on an image labelled normal
    assert torch.equal(out.pred_mask[out.pred_label], (out.raw_map > cal.pixel_threshold)[out.pred_label])
    assert bool(out.pred_label[-1]) and len(out) == 8


def test_out_of_domain_images_are_flagged():
    images = correlated_images(30, seed=3)
    detector = make_detector(images).fit(images)
    other = torch.zeros(2, 3, SIZE, SIZE)
    other[:, 0] = 1.0  # pure red parts: far from the training features
    with pytest.warns(UserWarning, match="2 of 2 images look unlike the training images"):
        out = detector.predict(other)
    assert not out.in_domain.any()
    assert detector.predict(images[:4], warn=False).in_domain.all()


def test_overrides_at_load_refuse_until_refitted(tmp_path, monkeypatch):
    images = correlated_images(30, seed=4)
    detector = make_detector(images, timesteps="paper", scoring="hybrid").fit(images)
    detector.feature_extractor = PoolExtractor()
    folder = tmp_path / "model"
    detector.save_pretrained(folder)

    from invert_ad.features import _registry

    monkeypatch.setitem(_registry._EXTRACTORS.factories, "pool", lambda image_size=SIZE: PoolExtractor())
    loaded = AnomalyDetector.from_pretrained(folder)
    assert loaded.calibration == detector.calibration
    assert torch.equal(loaded.predict(images[:3]).pred_score, detector.predict(images[:3]).pred_score)
    assert loaded.scorer.scoring_ is not loaded.scorer.scoring  # the fitted copy, never the given instance

    changed = AnomalyDetector.from_pretrained(folder, scoring="nll")
    with pytest.raises(NotFittedError, match=r"call fit\(normal_images\)"):
        changed.predict(images[:3])
    changed.fit(images)
    assert changed.calibration.image_threshold != detector.calibration.image_threshold
    with pytest.raises(TypeError, match="unknown override"):
        AnomalyDetector.from_pretrained(folder, scorin="nll")


def test_fitting_twice_leaves_the_given_statistic_alone():
    from invert_ad.scoring import HybridScorer

    images = correlated_images(30, seed=6)
    features = PoolExtractor()(images)
    shared = HybridScorer()
    a = InversionScorer(GaussianDenoiser.fit(features), scheduler(), scoring=shared).fit(features[:15])
    b = InversionScorer(GaussianDenoiser.fit(features), scheduler(), scoring=shared).fit(features[15:])
    assert not hasattr(shared, "location_")
    assert not torch.equal(a.scoring_.location_, b.scoring_.location_)


def test_bad_fit_arguments():
    images = correlated_images(8, seed=7)
    detector = make_detector(images)
    with pytest.raises(ValueError, match="folds"):
        detector.fit(images, folds=0)
    with pytest.raises(ValueError, match="exactly one"):
        detector.fit()
    with pytest.raises(ValueError, match="reconstruction_steps"):
        InversionScorer(detector.scorer.denoiser, scheduler(), reconstruction_steps=0)


def test_backbone_micro_batches_give_the_same_features():
    images = correlated_images(10, seed=8)
    detector = make_detector(images)
    calls = []
    forward = detector.feature_extractor.forward
    detector.feature_extractor.forward = lambda x: calls.append(len(x)) or forward(x)
    whole = detector.optimize(backbone_batch_size=None).extract(images)
    assert calls == [10]
    calls.clear()
    auto = detector.optimize().extract(images)  # on the CPU in eager mode: calls of CPU_BACKBONE_BATCH images
    assert calls == [4, 4, 2] and torch.equal(auto, whole)
    assert detector.inference_settings()["backbone_batch_size"] == "auto"
    with pytest.raises(ValueError, match="backbone_batch_size must be a positive int"):
        detector.optimize(backbone_batch_size=0)


def test_map_thresholds_are_out_of_fold_too():
    """A per-position Mahalanobis map is refitted on the folds: its pixel threshold is the quantile of each image's
    largest distance under a Ledoit-Wolf Gaussian fitted without it (the maps' bilinear upsampling keeps the max)."""
    from invert_ad.scoring import MahalanobisMap

    images = correlated_images(40, seed=0)
    features = standardized(images)[0]
    detector = make_detector(images, map_statistic=MahalanobisMap.fit(features, prior="position"))
    detector.fit(images, folds=4, fpr=0.125, seed=3)
    x = features.double().numpy()
    expected = out_of_fold_mahalanobis_max(x, folds=4, seed=3)
    threshold = detector.calibration.pixel_threshold
    assert threshold == pytest.approx(np.quantile(expected, 0.875), rel=1e-4)
    assert np.quantile(mahalanobis_max(x, x), 0.875) < 0.95 * threshold  # in sample it would be optimistic
    assert detector.scorer.map_statistic.prior.mean.shape == (4, 3)  # the statistic itself: fitted on all images
