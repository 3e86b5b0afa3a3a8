"""RoutedDetector: each image is routed to the expert of its product and scored exactly as that expert alone
scores it (the reference: the experts called on their own images); fit per expert; save/load; bad input."""

from __future__ import annotations

import pytest
import torch
from test_detector_fit import SIZE, PoolExtractor, correlated_images, make_detector

from invert_ad import AnomalyDetector, NotFittedError, RoutedDetector


def products(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two products: dark correlated images and bright ones with a different texture."""
    dark = 0.4 * correlated_images(n, seed)
    g = torch.Generator().manual_seed(seed + 100)
    bright = (0.6 + 0.4 * torch.rand(n, 3, SIZE, SIZE, generator=g)).clamp(0, 1)
    return dark, bright


def routed(n: int = 24, seed: int = 0) -> tuple[RoutedDetector, torch.Tensor, torch.Tensor]:
    dark, bright = products(n, seed)
    experts = {"dark": make_detector(dark, timesteps=3, scoring="hybrid").fit(dark, folds=3, fpr=0.1)}
    experts["bright"] = make_detector(bright, timesteps=3, scoring="hybrid").fit(bright, folds=3, fpr=0.1)
    labels = torch.cat([torch.zeros(n), torch.ones(n)]).long()
    return RoutedDetector(experts).fit_router(PoolExtractor()(torch.cat([dark, bright])), labels), dark, bright


def test_each_image_is_scored_by_its_own_expert():
    detector, _, _ = routed()
    test_dark, test_bright = products(6, seed=7)
    mixed = torch.cat([test_dark[:3], test_bright[:3], test_dark[3:], test_bright[3:]])
    expected_route = torch.tensor([0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 1])
    assert torch.equal(detector.route(PoolExtractor()(mixed)), expected_route)

    out = detector.predict(mixed, warn=False)
    alone = {k: detector.experts[k].predict(x, warn=False) for k, x in (("dark", test_dark), ("bright", test_bright))}
    for field in ("raw_score", "pred_score", "pred_label", "raw_map", "anomaly_map", "domain_score", "in_domain"):
        got = getattr(out, field)
        want_dark, want_bright = getattr(alone["dark"], field), getattr(alone["bright"], field)
        want = torch.cat([want_dark[:3], want_bright[:3], want_dark[3:], want_bright[3:]])
        assert torch.allclose(got.double(), want.double(), rtol=1e-6, atol=1e-7), field
    scores = detector.score(mixed)
    assert torch.allclose(scores.raw_score, out.raw_score)
    assert set(scores.components) == {"nll", "maxmin"}


def test_fit_fits_every_expert_on_its_own_images():
    dark, bright = products(24, seed=1)
    reference = {"dark": make_detector(dark, timesteps=3).fit(dark, folds=3, fpr=0.1)}
    reference["bright"] = make_detector(bright, timesteps=3).fit(bright, folds=3, fpr=0.1)
    experts = {"dark": make_detector(dark, timesteps=3), "bright": make_detector(bright, timesteps=3)}
    detector = RoutedDetector(experts)
    with pytest.raises(NotFittedError, match="router is not fitted"):
        detector.route(PoolExtractor()(dark))
    assert not detector.is_fitted
    labels = torch.cat([torch.zeros(24), torch.ones(24)]).long()
    with pytest.raises(ValueError, match="labels"):
        detector.fit(torch.cat([dark, bright]))
    with pytest.raises(ValueError, match="no normal images for expert 'bright'"):  # checked before any fit
        detector.fit(torch.cat([dark, bright]), labels=torch.zeros(48).long())
    assert not any(expert.is_fitted for expert in detector.experts.values())  # nothing fitted by a failed call
    detector.fit(torch.cat([dark, bright]), labels=labels, folds=3, fpr=0.1)
    assert detector.is_fitted
    for name in experts:
        assert detector.experts[name].calibration == reference[name].calibration
    with pytest.raises(AttributeError, match="one calibration per expert"):
        _ = detector.calibration


def test_save_and_load_through_anomaly_detector(tmp_path, monkeypatch):
    from invert_ad.features import _registry

    monkeypatch.setitem(_registry._EXTRACTORS.factories, "pool", lambda image_size=SIZE: PoolExtractor())
    detector, _, _ = routed(seed=2)
    folder = detector.save_pretrained(tmp_path / "line")
    assert sorted(p.name for p in (folder / "experts").iterdir()) == ["bright", "dark"]
    loaded = AnomalyDetector.from_pretrained(folder)
    assert isinstance(loaded, RoutedDetector) and list(loaded.experts) == ["dark", "bright"]
    images = torch.cat(products(4, seed=9))
    assert torch.equal(loaded.predict(images, warn=False).pred_score, detector.predict(images, warn=False).pred_score)
    with pytest.raises(TypeError, match="no scorer overrides"):
        AnomalyDetector.from_pretrained(folder, scoring="nll")
    (folder / "experts" / "bright" / "detector_config.json").unlink()
    with pytest.raises(ValueError, match="expert 'bright' is missing"):
        RoutedDetector.from_pretrained(folder)


def test_bad_experts():
    dark, bright = products(12, seed=3)
    with pytest.raises(ValueError, match="at least one expert"):
        RoutedDetector({})
    with pytest.raises(TypeError, match="must be an AnomalyDetector"):
        RoutedDetector({"a": object()})
    other = make_detector(bright)
    other.feature_extractor.get_config = lambda: {"name": "pool", "image_size": 16}
    with pytest.raises(ValueError, match="one backbone for all"):
        RoutedDetector({"dark": make_detector(dark), "bright": other})


@pytest.mark.parametrize("k", [2, 3])
def test_the_router_is_scikit_learns_linear_discriminant(k):
    """Saved as weights and biases, the router decides as scikit-learn's shrunk LDA on the channel means."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    g = torch.Generator().manual_seed(k)
    centres = 0.5 * torch.randn(k, 5, 1, 1, generator=g)
    labels = torch.arange(60) % k
    features = centres[labels] + 3.0 * torch.randn(60, 5, 3, 3, generator=g)
    test = centres[torch.arange(40) % k] + 3.0 * torch.randn(40, 5, 3, 3, generator=g)
    experts = {f"p{i}": make_detector(correlated_images(8, seed=i)) for i in range(k)}
    detector = RoutedDetector(experts).fit_router(features, labels)
    lda = LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto").fit(features.mean(dim=(2, 3)), labels)
    expected = lda.predict(test.mean(dim=(2, 3)).numpy())
    assert detector.route(test).tolist() == expected.tolist()
    assert 0 < (expected == (torch.arange(40) % k).numpy()).mean() < 1  # a test with mistakes to copy


def test_saving_never_replaces_a_folder_that_is_not_a_model(tmp_path):
    detector, _, _ = routed(seed=4)
    data = tmp_path / "my_images"
    data.mkdir()
    (data / "0001.png").write_bytes(b"not a model")
    for model in (detector, detector.experts["dark"]):
        with pytest.raises(FileExistsError, match="not a model folder"):
            model.save_pretrained(data)
        assert (data / "0001.png").read_bytes() == b"not a model"
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        detector.save_pretrained(tmp_path / "file")
    detector.save_pretrained(tmp_path / "model")
    detector.save_pretrained(tmp_path / "model")  # a model folder is replaced


def test_exports_and_engines_refuse_a_routed_detector():
    from invert_ad.engines import load_engine
    from invert_ad.export import ExportableDetector

    detector, _, _ = routed(seed=5)
    with pytest.raises(ValueError, match="export each expert"):
        ExportableDetector(detector)
    for engine in ("torch", "onnxruntime"):
        with pytest.raises(ValueError, match="engines run one detector"):
            load_engine(detector, engine)


def test_one_expert_and_bad_labels():
    dark, _ = products(12, seed=6)
    single = RoutedDetector({"dark": make_detector(dark).fit(dark, folds=3, fpr=0.2)})
    single.fit_router(PoolExtractor()(dark), torch.zeros(12).long())
    assert single.route(PoolExtractor()(dark)).tolist() == [0] * 12
    with pytest.raises(ValueError, match=r"expert indices in \[0, 1\)"):
        single.fit_router(PoolExtractor()(dark), torch.ones(12).long())
