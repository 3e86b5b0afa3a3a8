"""Anomaly maps from a feature statistic (MahalanobisMap) inside InversionScorer and AnomalyDetector."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from sklearn.covariance import LedoitWolf

from invert_ad import NotFittedError
from invert_ad.detector import AnomalyDetector, channel_statistics
from invert_ad.models import GaussianDenoiser, SharedGaussianDenoiser, create_denoiser
from invert_ad.scorer import InversionScorer
from invert_ad.scoring.feature_maps import MahalanobisMap, load_map_statistic, local_average


def _features(n: int, c: int = 6, grid: tuple[int, int] = (4, 4), seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(c, c, generator=g) / c**0.5
    return torch.einsum("dc,nchw->ndhw", mixing, torch.randn(n, c, *grid, generator=g)) + 0.5


def test_shared_map_is_the_mahalanobis_distance_by_hand() -> None:
    train = _features(20)
    statistic = MahalanobisMap.fit(train, prior="shared")
    x = _features(2, seed=1) * 3
    samples = train.permute(0, 2, 3, 1).reshape(-1, 6).double().numpy()
    reference = LedoitWolf().fit(samples)
    precision = np.linalg.inv(reference.covariance_)
    d = x.permute(0, 2, 3, 1).double().numpy() - samples.mean(0)  # (B, h, w, C)
    expected = np.sqrt(np.einsum("bhwi,ij,bhwj->bhw", d, precision, d))
    np.testing.assert_allclose(statistic(x).numpy(), expected, rtol=1e-4)


@pytest.mark.parametrize(("prior", "cls"), [("shared", SharedGaussianDenoiser), ("position", GaussianDenoiser)])
def test_fit_builds_the_named_prior(prior: str, cls: type) -> None:
    statistic = MahalanobisMap.fit(_features(10), prior=prior)
    assert isinstance(statistic.prior, cls)
    config = {"name": "mahalanobis", "prior": cls.__name__, "pool": 1, "fit_options": {"prior": prior}}
    assert statistic.get_config() == config
    window = MahalanobisMap.fit(_features(10), prior="window", window=3)
    assert isinstance(window.prior, GaussianDenoiser)
    assert window.fit_options == {"prior": "window", "window": 3}
    refitted = window.refit(_features(12, seed=4))  # the same kind, on other features
    expected = MahalanobisMap.fit(_features(12, seed=4), prior="window", window=3)
    assert torch.equal(refitted.prior.eigenvalues, expected.prior.eigenvalues)
    with pytest.raises(ValueError, match="refit needs MahalanobisMap"):
        MahalanobisMap(statistic.prior).refit(_features(10))


def test_bad_map_statistics() -> None:
    with pytest.raises(ValueError, match=r"unknown map prior 'knn'.*shared"):
        MahalanobisMap.fit(_features(4), prior="knn")
    with pytest.raises(TypeError, match="GaussianDenoiser or SharedGaussianDenoiser"):
        MahalanobisMap(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="map_statistic must be callable"):
        InversionScorer(create_denoiser("gaussian", 6, 4, features=_features(8)), DDPMScheduler(), map_statistic=3)
    with pytest.raises(ValueError, match="pool must be a positive odd int"):
        MahalanobisMap.fit(_features(4), pool=2)
    with pytest.raises(ValueError, match=r"unknown map statistic 'blur'.*mahalanobis"):
        load_map_statistic({"name": "blur"}, ".")


def test_local_average_by_hand() -> None:
    x = torch.arange(2 * 12, dtype=torch.float32).reshape(1, 2, 3, 4)
    pooled = local_average(x, 3)
    assert torch.equal(local_average(x, 1), x)
    # corner (0, 0): cells (0..1, 0..1); inner (1, 1): the full 3 x 3 block; edge (0, 3): (0..1, 2..3)
    assert pooled[0, 0, 0, 0] == x[0, 0, :2, :2].mean()
    assert pooled[0, 1, 1, 1] == x[0, 1, :3, :3].mean()
    assert pooled[0, 0, 0, 3] == x[0, 0, :2, 2:].mean()


def test_pooled_map_scores_pooled_features() -> None:
    train, x = _features(20), _features(2, seed=3)
    pooled = MahalanobisMap.fit(train, prior="shared", pool=3)
    plain_on_pooled = MahalanobisMap.fit(local_average(train, 3), prior="shared")
    torch.testing.assert_close(pooled(x), plain_on_pooled(local_average(x, 3)))


def _scorer(train: torch.Tensor, holdout: torch.Tensor, with_map: bool) -> InversionScorer:
    denoiser = create_denoiser("gaussian", train.shape[1], tuple(train.shape[2:]), features=train)
    statistic = MahalanobisMap.fit(train, prior="shared", pool=3) if with_map else None
    return InversionScorer(denoiser, DDPMScheduler(), scoring="hybrid", map_statistic=statistic).fit(holdout)


def test_map_comes_from_the_statistic_and_the_score_from_the_latent() -> None:
    train, holdout, test = _features(30), _features(6, seed=1), _features(3, seed=2) * 2
    plain = _scorer(train, holdout, with_map=False).score(test)
    mapped_scorer = _scorer(train, holdout, with_map=True)
    mapped = mapped_scorer.score(test, batch_size=2)
    torch.testing.assert_close(mapped.raw_score, plain.raw_score)
    torch.testing.assert_close(mapped.latent, plain.latent)
    torch.testing.assert_close(mapped.raw_map, mapped_scorer.map_statistic(test))
    assert not torch.allclose(mapped.raw_map, plain.raw_map)


def test_map_statistic_round_trips_through_save_pretrained(tmp_path: Path) -> None:
    train, holdout, test = _features(30), _features(6, seed=1), _features(3, seed=2)
    scorer = _scorer(train, holdout, with_map=True)
    scorer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "scorer_config.json").read_text())
    assert config["map_statistic"] == {
        "name": "mahalanobis",
        "prior": "SharedGaussianDenoiser",
        "pool": 3,
        "fit_options": {"prior": "shared"},
    }
    loaded = InversionScorer.from_pretrained(tmp_path)
    assert loaded.map_statistic.can_refit and loaded.map_statistic.pool == 3
    expected, got = scorer.score(test), loaded.score(test)
    assert torch.equal(got.raw_map, expected.raw_map)
    assert torch.equal(got.raw_score, expected.raw_score)
    dropped = InversionScorer.from_pretrained(tmp_path, map_statistic=None)
    assert dropped.map_statistic is None
    with pytest.raises(NotFittedError):  # other maps: the saved fit no longer applies
        dropped.score(test)
    dropped.fit(holdout)
    plain = _scorer(train, holdout, with_map=False)
    torch.testing.assert_close(dropped.score(test).raw_map, plain.score(test).raw_map)


def test_scorer_without_map_statistic_saves_none(tmp_path: Path) -> None:
    _scorer(_features(10), _features(4, seed=1), with_map=False).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "scorer_config.json").read_text())["map_statistic"] is None
    assert not (tmp_path / "map_statistic").exists()
    assert InversionScorer.from_pretrained(tmp_path).map_statistic is None


def test_a_finer_grid_through_the_detector(tmp_path: Path) -> None:
    """A 64 px backbone resized to an 8 x 8 grid (stride 8): features, per-position and shared Gaussians, maps."""
    from invert_ad.features import create_feature_extractor

    with pytest.warns(UserWarning, match="RANDOM"):
        extractor = create_feature_extractor("efficientnet_lite0", weights=None, image_size=64, grid=8, layers=(1, 2))
    images = torch.rand(12, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    raw = extractor(images)
    assert raw.shape == (12, 24 + 40, 8, 8)
    mean, std = channel_statistics(raw[:8])
    features = (raw - mean.reshape(1, -1, 1, 1)) / std.reshape(1, -1, 1, 1)
    denoiser = create_denoiser("gaussian", 64, 8, features=features[:8], shrinkage="diagonal")
    statistic = MahalanobisMap.fit(features[:8], prior="shared")
    scorer = InversionScorer(denoiser, DDPMScheduler(), map_statistic=statistic)
    detector = AnomalyDetector(extractor, scorer, feature_mean=mean, feature_std=std)
    detector.fit(normal_features=features[8:10], folds=None)
    out = detector.score(images[10:])
    assert out.raw_score.shape == (2,) and out.raw_map.shape == (2, 64, 64)
    grid_map = detector.scorer.score(features[10:]).raw_map
    assert grid_map.shape == (2, 8, 8)
    torch.testing.assert_close(grid_map, statistic(features[10:]))
    from invert_ad.export import ExportableDetector

    _, _, exported_maps = ExportableDetector(detector)(images[10:])  # the traced path uses the map statistic too
    torch.testing.assert_close(exported_maps, out.raw_map)
    detector.save_pretrained(tmp_path / "model")
    loaded = AnomalyDetector.from_pretrained(tmp_path / "model")
    assert isinstance(loaded.scorer.map_statistic, MahalanobisMap)
    # the random backbone is drawn anew on loading: compare on the same features
    assert torch.equal(loaded.score_features(features[10:]).raw_map, out.raw_map)
