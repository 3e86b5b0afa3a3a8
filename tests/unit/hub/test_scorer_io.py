"""Saving and loading an InversionScorer: bit-identical scores, clear errors, offline Hub ids fail fast."""

import json
import time

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel

from invert_ad import InversionScorer
from invert_ad.io import load_torch_checkpoint, replace_directory


@pytest.fixture(scope="module")
def scorer():
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    ).eval()
    s = InversionScorer(unet, DDIMScheduler(prediction_type="epsilon"), timesteps="quad:4", scoring="hybrid")
    return s.fit(torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(1)))


def test_round_trip_is_bit_identical(scorer, tmp_path):
    scorer.save_pretrained(tmp_path)
    assert (tmp_path / "denoiser" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = InversionScorer.from_pretrained(tmp_path)
    x = torch.randn(3, 4, 8, 8)
    assert torch.equal(loaded.score(x).raw_score, scorer.score(x).raw_score)
    assert loaded.grid == scorer.grid and type(loaded.scheduler) is DDIMScheduler
    assert json.loads((tmp_path / "scorer_config.json").read_text())["scorer"]["class"] == "HybridScorer"
    other = InversionScorer.from_pretrained(tmp_path, scoring="nll", timesteps="official")
    assert other.grid.terminal_alpha_bar == 0.0 and other.statistic.name == "nll"


def test_unsaveable_and_missing(tmp_path):
    with pytest.raises(TypeError, match="save_pretrained"):
        InversionScorer(lambda x, t: x, DDIMScheduler(), scoring="nll").save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"scorer_config\.json"):
        InversionScorer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a Hub repo id"):
        InversionScorer.from_pretrained(tmp_path / "nope")


def test_tampered_config_is_refused(scorer, tmp_path):
    scorer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "scorer_config.json").read_text())
    config["scorer"]["class"] = "os.system"
    (tmp_path / "scorer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not registered"):
        InversionScorer.from_pretrained(tmp_path)
    denoiser_config = json.loads((tmp_path / "denoiser" / "config.json").read_text())
    denoiser_config["_class_name"] = "subprocess"
    (tmp_path / "denoiser" / "config.json").write_text(json.dumps(denoiser_config))
    with pytest.raises(ValueError, match="unknown denoiser class"):
        InversionScorer.from_pretrained(tmp_path)


def test_hub_id_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(OSError, match="HF_HUB_OFFLINE"):
        InversionScorer.from_pretrained("someone/invert-ad-model-that-is-not-cached")
    assert time.perf_counter() - start < 5


def test_push_to_hub_uploads_the_saved_folder(scorer, monkeypatch):
    uploaded = {}

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private, exist_ok):
            uploaded["repo"] = repo_id

        def upload_folder(self, repo_id, folder_path, **kwargs):
            from pathlib import Path

            uploaded["files"] = sorted(p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*"))
            return "https://example.invalid/commit"

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    assert scorer.push_to_hub("me/model") == "https://example.invalid/commit"
    assert uploaded["repo"] == "me/model"
    assert {"scorer_config.json", "scorer_state.safetensors", "denoiser/config.json"} <= set(uploaded["files"])


def test_replace_directory_keeps_the_old_folder_on_failure(tmp_path):
    target = tmp_path / "model"
    with replace_directory(target) as tmp:
        (tmp / "a.txt").write_text("v1")
    with pytest.raises(RuntimeError), replace_directory(target) as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("crash while saving")
    assert (target / "a.txt").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_unsafe_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"weights": torch.zeros(2), "payload": Evil()}, path)
    with pytest.raises(ValueError, match="refusing to unpickle"):
        load_torch_checkpoint(path)
    torch.save({"weights": torch.ones(2)}, tmp_path / "ok.pt")
    assert torch.equal(load_torch_checkpoint(tmp_path / "ok.pt")["weights"], torch.ones(2))
