"""A damaged or inconsistent model folder gives a clear error naming what disagrees; offline Hub ids fail fast."""

from __future__ import annotations

import json
import re
import time

import pytest
from safetensors.torch import load_file, save_file

from invert_ad.detector import AnomalyDetector
from invert_ad.features import WeightsError, create_feature_extractor
from invert_ad.predict_files import predict_paths
from invert_ad.scorer import InversionScorer

DENOISER_WEIGHTS = "denoiser/diffusion_pytorch_model.safetensors"
SAFETENSORS_FILES = (DENOISER_WEIGHTS, "scorer_state.safetensors", "detector_state.safetensors")
JSON_FILES = ("denoiser/config.json", "scorer_config.json", "detector_config.json", "scheduler/scheduler_config.json")


def edit_json(path, **changes):
    config = json.loads(path.read_text())
    for key, value in changes.items():
        node, *rest = key.split(".")
        if rest:
            config[node][rest[0]] = value
        else:
            config[key] = value
    path.write_text(json.dumps(config))


# ------------------------------------------------------------------ config vs weights
@pytest.mark.parametrize("loader", [InversionScorer.from_pretrained, AnomalyDetector.from_pretrained])
@pytest.mark.parametrize(
    ("field", "value", "shapes"),
    [("in_channels", 96, r"\[4, 96\]\).*\[4, 192\]\)"), ("sample_size", 4, r"\[16, 192\]\).*\[4, 192\]\)")],
)
def test_denoiser_config_that_does_not_fit_its_weights(model_copy, loader, field, value, shapes):
    edit_json(model_copy / "denoiser" / "config.json", **{field: value})
    with pytest.raises(ValueError, match=r"do not match its config\.json") as info:
        loader(model_copy)
    message = str(info.value)
    assert str(model_copy / "denoiser") in message and f"'{field}': {value}" in message  # the config side
    assert re.search(shapes, message)  # the shape the config implies and the shape of the weights
    assert "ignore_mismatched_sizes" not in message  # diffusers' advice to load random weights is dropped


def test_config_saying_diagonal_with_full_covariance_weights(model_copy):
    """diffusers only warns about unused tensors; invert_ad refuses (the model would score differently)."""
    edit_json(model_copy / "denoiser" / "config.json", covariance="diagonal")
    with pytest.raises(ValueError, match=r"unexpected_keys.*eigenvectors"):
        InversionScorer.from_pretrained(model_copy)


def test_weights_missing_a_tensor(model_copy):
    """diffusers would silently leave the missing tensor at its initial value; invert_ad refuses."""
    path = model_copy / DENOISER_WEIGHTS
    state = load_file(str(path))
    del state["eigenvectors"]
    save_file(state, str(path))
    with pytest.raises(ValueError, match=r"missing_keys.*eigenvectors"):
        AnomalyDetector.from_pretrained(model_copy)


def test_weights_with_a_wrong_shape(model_copy):
    path = model_copy / DENOISER_WEIGHTS
    state = load_file(str(path))
    state["mean"] = state["mean"][:, :96].contiguous()
    save_file(state, str(path))
    with pytest.raises(ValueError, match=r"denoiser do not match its config.json .*mean"):
        InversionScorer.from_pretrained(model_copy)


def test_backbone_swapped_for_one_without_offline_weights(model_copy):
    """Swapping the backbone name: the error names the config file, the backbone and the denoiser's channels."""
    edit_json(model_copy / "detector_config.json", **{"feature_extractor.name": "efficientnet_b4"})
    with pytest.raises(WeightsError) as info:
        AnomalyDetector.from_pretrained(model_copy)
    message = str(info.value)
    assert "detector_config.json" in message and "efficientnet_b4" in message and "expects 192 channels" in message


@pytest.mark.parametrize(
    ("changes", "channels"),
    [
        ({"feature_extractor.name": "efficientnet_b4", "feature_extractor.weights": None}, 272),
        ({"feature_extractor.layers": [0, 1, 2]}, 80),
    ],
)
@pytest.mark.filterwarnings("ignore:efficientnet_b4. weights=None gives RANDOM features")
def test_backbone_with_other_channels(model_copy, changes, channels):
    edit_json(model_copy / "detector_config.json", **changes)
    with pytest.raises(ValueError, match=f"gives {channels} channels but the denoiser expects 192"):
        AnomalyDetector.from_pretrained(model_copy)


def test_feature_statistics_of_the_wrong_size(model_copy):
    path = model_copy / "detector_state.safetensors"
    state = load_file(str(path))
    save_file({"feature_mean": state["feature_mean"][:10].contiguous(), "feature_std": state["feature_std"]}, str(path))
    with pytest.raises(ValueError, match=r"detector_state.safetensors: feature_mean has shape \(10,\).*192-channel"):
        AnomalyDetector.from_pretrained(model_copy)


def test_feature_statistics_missing_while_config_asks_for_them(model_copy):
    save_file({}, str(model_copy / "detector_state.safetensors"))
    with pytest.raises(ValueError, match=r"feature_mean has shape None"):
        AnomalyDetector.from_pretrained(model_copy)


# ------------------------------------------------------------------ damaged files
@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "missing"])
@pytest.mark.parametrize("name", SAFETENSORS_FILES)
def test_damaged_safetensors_names_the_file(model_copy, name, damage):
    path = model_copy / name
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(bytes(range(256)) * 4)
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.unlink()
    with pytest.raises((OSError, ValueError)) as info:
        AnomalyDetector.from_pretrained(model_copy)
    assert path.name.replace(".safetensors", "") in str(info.value)


@pytest.mark.parametrize("name", JSON_FILES)
def test_truncated_json_names_the_file(model_copy, name):
    path = model_copy / name
    path.write_text(path.read_text()[:40])
    with pytest.raises(ValueError, match=path.name.replace(".", r"\.")):
        AnomalyDetector.from_pretrained(model_copy)


def test_not_a_model_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"detector_config\.json not found .*not an invert_ad model folder"):
        AnomalyDetector.from_pretrained(tmp_path / "empty")
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        AnomalyDetector.from_pretrained(tmp_path / "file.bin")


# ------------------------------------------------------------------ the Hub without a network
@pytest.mark.parametrize(
    "call",
    [
        lambda: InversionScorer.from_pretrained("someone/invert-ad-not-cached"),
        lambda: AnomalyDetector.from_pretrained("someone/invert-ad-not-cached"),
        lambda: predict_paths("someone/invert-ad-not-cached", ["."], "/nonexistent/out.json", progress=False),
    ],
    ids=["scorer", "detector", "predict_paths"],
)
def test_hub_id_offline_fails_fast_with_a_clear_message(monkeypatch, call):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(OSError, match="HF_HUB_OFFLINE is set and it is not in the local cache"):
        call()
    assert time.perf_counter() - start < 5


def test_hub_id_with_the_network_down_fails_fast(monkeypatch):
    """HF_HUB_OFFLINE unset but nothing answers (connection refused): one quick failure, no retry loop."""
    import huggingface_hub.constants as hub_constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(
        hub_constants, "HUGGINGFACE_CO_URL_TEMPLATE", "http://127.0.0.1:9/{repo_id}/resolve/{revision}/{filename}"
    )
    start = time.perf_counter()
    with pytest.raises(OSError, match="cannot load model 'someone/invert-ad-not-cached' from the Hugging Face Hub"):
        AnomalyDetector.from_pretrained("someone/invert-ad-not-cached")
    assert time.perf_counter() - start < 5


def test_hub_backbone_weights_offline_fail_fast(monkeypatch):
    import timm  # noqa: F401  (imported first: the budget is for the failure, not for importing timm)

    start = time.perf_counter()
    with pytest.raises(WeightsError, match="cannot get the efficientnet_b4 weights"):
        create_feature_extractor("efficientnet_b4")
    assert time.perf_counter() - start < 5
