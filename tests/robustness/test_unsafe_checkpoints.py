"""Every path that reads a pickle uses ``weights_only=True``: a payload is refused, never executed.

The payload of :class:`Payload` creates a marker folder when unpickled, so a test can tell "refused" from
"ran": each test asserts the marker is absent after the refusal. The explicit opt-in
(``allow_unsafe_pickle=True``) is shown to run it, which proves the marker works.
"""

from __future__ import annotations

import collections
import io
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from invert_ad.detector import AnomalyDetector
from invert_ad.features import WeightsError, create_feature_extractor, load_weights_file
from invert_ad.io import load_torch_checkpoint
from invert_ad.schedule import linear_alphas_cumprod
from invert_ad.scorer import InversionScorer
from invert_ad.training import CHECKPOINT_NAME, TrainingConfig, train_denoiser

SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


class Payload:
    """Unpickling this calls ``os.mkdir(marker)``: arbitrary code."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _wrapped(payload, how: str):
    """The payload hidden at various depths of an otherwise plain checkpoint."""
    weights = {"layer.weight": torch.ones(2, 2)}
    if how == "top":
        return payload
    if how == "value":
        return {**weights, "extra": payload}
    if how == "nested":
        return {"state_dict": weights, "meta": [1, 2, {"hparams": payload}]}
    if how == "ordered":
        return collections.OrderedDict(weights, evil=payload)
    raise AssertionError(how)


class Eps(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 2, 1)

    def forward(self, x, t):
        return self.conv(x)


@pytest.fixture
def marker(tmp_path):
    """Where the payload would leave its trace."""
    return tmp_path / "PAYLOAD_RAN"


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("how", ["top", "value", "nested", "ordered"])
def test_io_loader_refuses_and_opt_in_runs(tmp_path, marker, suffix, how):
    path = tmp_path / f"evil{suffix}"
    torch.save(_wrapped(Payload(marker), how), path)
    with pytest.raises(ValueError, match=rf"refusing to unpickle .*evil\{suffix}"):
        load_torch_checkpoint(path)
    assert not marker.exists()
    load_torch_checkpoint(path, allow_unsafe_pickle=True)  # the explicit opt-in does unpickle
    assert marker.is_dir()


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_io_loader_reads_plain_tensors(tmp_path, suffix):
    data = {"w": torch.arange(4.0), "nested": {"b": torch.ones(1)}, "step": 3, "losses": [0.5, 0.25]}
    torch.save(data, tmp_path / f"ok{suffix}")
    loaded = load_torch_checkpoint(tmp_path / f"ok{suffix}")
    assert torch.equal(loaded["w"], data["w"]) and loaded["losses"] == [0.5, 0.25]


def _damaged(kind: str) -> bytes:
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(1000)}, buffer, _use_new_zipfile_serialization=kind.startswith("legacy"))
    data = buffer.getvalue()
    return {
        "truncated": data[: len(data) // 2],
        "header_only": data[:100],
        "legacy_truncated": data[: len(data) // 2],
        "empty": b"",
        "text": b"hello, not a checkpoint",
        "random": bytes(range(256)) * 3,
    }[kind]


@pytest.mark.parametrize("kind", ["truncated", "header_only", "legacy_truncated", "empty", "text", "random"])
def test_corrupt_checkpoint_is_reported_as_corrupt_not_as_unsafe(tmp_path, kind):
    path = tmp_path / "damaged.pt"
    path.write_bytes(_damaged(kind))
    corrupt = r"cannot read checkpoint .*damaged\.pt \(truncated or corrupt\?\)"
    # bytes that happen to start like a pickle are refused by the weights-only unpickler before it sees the end
    refused_or_corrupt = rf"{corrupt}|refusing to unpickle .*damaged\.pt" if kind == "random" else corrupt
    with pytest.raises(ValueError, match=refused_or_corrupt):
        load_torch_checkpoint(path)
    with pytest.raises(ValueError, match=corrupt):  # the opt-in does not turn it into a raw torch error
        load_torch_checkpoint(path, allow_unsafe_pickle=True)


def test_training_refuses_to_resume_from_a_truncated_checkpoint(tmp_path):
    (tmp_path / CHECKPOINT_NAME).write_bytes(_damaged("truncated"))
    with pytest.raises(ValueError, match="truncated or corrupt"):
        train_denoiser(
            Eps(),
            torch.randn(4, 2, 2, 2),
            linear_alphas_cumprod(),
            TrainingConfig(steps=2, minutes=None, batch_size=2),
            checkpoint_dir=tmp_path,
            progress=False,
        )


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_feature_weights_file_refuses_payload(tmp_path, marker, suffix):
    path = tmp_path / f"backbone{suffix}"
    torch.save(_wrapped(Payload(marker), "value"), path)
    with pytest.raises(WeightsError, match=f"backbone\\{suffix}"):
        load_weights_file(path)
    with pytest.raises(WeightsError):  # through the public factory, as a user would pass weights=
        create_feature_extractor("efficientnet_lite0", image_size=32, grid=2, weights=path)
    assert not marker.exists()


def test_training_checkpoint_refuses_payload(tmp_path, marker):
    """A tampered checkpoint.pt in a checkpoint folder is refused when training would resume from it."""
    torch.save({"model": {}, "config": Payload(marker)}, tmp_path / CHECKPOINT_NAME)
    with pytest.raises(ValueError, match="refusing to unpickle"):
        train_denoiser(
            Eps(),
            torch.randn(4, 2, 2, 2),
            linear_alphas_cumprod(),
            TrainingConfig(steps=2, minutes=None, batch_size=2),
            checkpoint_dir=tmp_path,
            progress=False,
        )
    assert not marker.exists()


def test_adapter_checkpoint_loaders_refuse_payload(tmp_path, marker):
    keys = pytest.importorskip("invert_ad.adapters.keys")
    path = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"weight": torch.ones(2, 2)}, "callbacks": Payload(marker)}, path)
    error = getattr(keys, "UnsafeCheckpointError", ValueError)
    with pytest.raises(error, match=r"foreign\.ckpt"):
        keys.load_checkpoint(path)
    if hasattr(keys, "load_weights"):
        with pytest.raises(error):
            keys.load_weights(torch.nn.Linear(2, 2, bias=False), path)
    from invert_ad import adapters

    if hasattr(adapters, "load_official_invad"):
        with pytest.raises(error):
            adapters.load_official_invad(path)
    assert not marker.exists()


def test_model_folder_pickled_weights_are_not_executed(model_copy, marker):
    """A model folder whose denoiser weights were swapped for a pickle with a payload: refused, file named."""
    denoiser = model_copy / "denoiser"
    state = load_file(str(denoiser / "diffusion_pytorch_model.safetensors"))
    (denoiser / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({**state, "payload": Payload(marker)}, denoiser / "diffusion_pytorch_model.bin")
    for loader in (InversionScorer.from_pretrained, AnomalyDetector.from_pretrained):
        with pytest.raises(OSError, match=r"diffusion_pytorch_model\.bin"):
            loader(model_copy)
    assert not marker.exists()


def test_model_folder_plain_pickled_weights_still_load(model_copy, small_detector):
    """The refusal is about payloads, not pickles: a plain-tensor .bin (older diffusers) loads and scores the same."""
    denoiser = model_copy / "denoiser"
    state = load_file(str(denoiser / "diffusion_pytorch_model.safetensors"))
    (denoiser / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(state, denoiser / "diffusion_pytorch_model.bin")
    loaded = AnomalyDetector.from_pretrained(model_copy)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded.score(images).raw_score, small_detector.score(images).raw_score)


def test_scorer_config_cannot_name_arbitrary_classes(model_copy):
    """Configs never instantiate arbitrary classes (the JSON side of the same rule)."""
    config = json.loads((model_copy / "scheduler" / "scheduler_config.json").read_text())
    config["_class_name"] = "Popen"
    (model_copy / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unknown scheduler class 'Popen'"):
        InversionScorer.from_pretrained(model_copy)
