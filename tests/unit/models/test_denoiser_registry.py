"""Every preset: construction by name, save/load round trip, use inside InversionScorer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, ModelMixin

from invert_ad import InversionScorer
from invert_ad.models import (
    FeatureDiT,
    GaussianDenoiser,
    GaussianResidualDenoiser,
    _registry,
    create_denoiser,
    list_denoisers,
    load_denoiser,
    register_denoiser,
)

PRESETS = [
    "conv",
    "conv-edm",
    "conv-skip",
    "dit-b",
    "dit-g",
    "dit-s",
    "dit-s-edm",
    "dit-s-skip",
    "gaussian",
    "gaussian-mixture",
    "gaussian-residual-conv",
    "gaussian-residual-conv-edm",
    "gaussian-residual-dit",
    "gaussian-residual-dit-edm",
    "gaussian-residual-dit-s",
    "gaussian-residual-mlp",
    "gaussian-residual-mlp-edm",
    "gaussian-shared",
    "gaussian-window",
    "mlp",
    "mlp-edm",
    "mlp-skip",
]


def _public_config(model: ModelMixin) -> dict:
    """The constructor arguments as JSON would store them (tuples become lists)."""
    return json.loads(json.dumps({k: v for k, v in model.config.items() if not k.startswith("_")}))


def test_builtin_presets_are_listed() -> None:
    assert list_denoisers() == PRESETS
    assert list_denoisers("gaussian*") == [p for p in PRESETS if p.startswith("gaussian")]


def test_unknown_preset_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown denoiser preset 'unet'.*dit-s"):
        create_denoiser("unet", 8, 4)


@pytest.mark.parametrize("preset", ["gaussian", "gaussian-residual-mlp"])
def test_gaussian_presets_need_matching_features(preset: str, train_features: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="features="):
        create_denoiser(preset, 8, 4)
    with pytest.raises(ValueError, match=r"\(N, 9, 4, 4\)"):
        create_denoiser(preset, 9, 4, features=train_features)


def test_presets_apply_their_architecture_and_overrides() -> None:
    with torch.device("meta"):
        base = create_denoiser("dit-b", 16, (8, 6))
        small = create_denoiser("dit-s", 16, 8, depth=2)
    assert isinstance(base, FeatureDiT)
    assert (base.config.hidden_size, base.config.depth, base.config.num_heads) == (1024, 8, 16)
    assert base.pos_embed.shape == (1, 48, 1024)
    assert (small.config.hidden_size, small.config.depth) == (256, 2)


def test_gaussian_residual_presets_pick_their_residual(train_features: torch.Tensor) -> None:
    model = create_denoiser("gaussian-residual-dit", 8, 4, features=train_features, shrinkage="diagonal")
    assert isinstance(model, GaussianResidualDenoiser)
    assert model.config.covariance == "diagonal"
    assert model.config.residual_kind == "dit"
    assert model.config.residual_config["hidden_size"] == 128  # the CPU-sized residual preset
    assert model.config.residual_config["depth"] == 2
    wide = create_denoiser("gaussian-residual-dit", 8, 4, features=train_features, residual_config={"hidden_size": 64})
    assert wide.config.residual_config["hidden_size"] == 64 and wide.config.residual_config["depth"] == 2


@pytest.mark.parametrize("preset", PRESETS)
def test_forward_shape(preset: str, make_tiny) -> None:
    model = make_tiny(preset)
    x = torch.randn(2, 8, 4, 4)
    assert model(x, torch.tensor([3, 700])).sample.shape == x.shape


@pytest.mark.parametrize("preset", PRESETS)
def test_save_pretrained_round_trip_is_bit_identical(preset: str, make_tiny, randomize, tmp_path: Path) -> None:
    model = randomize(make_tiny(preset)).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "config.json").is_file()
    x = torch.randn(3, 8, 4, 4)
    t = torch.tensor([0, 400, 999])
    expected = model(x, t).sample
    for loaded in (type(model).from_pretrained(tmp_path), load_denoiser(str(tmp_path))):
        assert type(loaded) is type(model)
        assert _public_config(loaded) == _public_config(model)
        assert torch.equal(loaded(x, t).sample, expected)
        for name, buffer in model.named_buffers():
            assert torch.equal(loaded.get_buffer(name), buffer)


def test_load_denoiser_rejects_foreign_models(tmp_path: Path) -> None:
    from diffusers import UNet2DModel

    UNet2DModel(
        sample_size=8,
        in_channels=2,
        out_channels=2,
        block_out_channels=(8,),
        norm_num_groups=4,
        down_block_types=("DownBlock2D",),
        up_block_types=("UpBlock2D",),
        layers_per_block=1,
    ).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="UNet2DModel"):
        load_denoiser(str(tmp_path))


def test_fitted_gaussian_survives_from_pretrained(train_features: torch.Tensor, tmp_path: Path) -> None:
    model = create_denoiser("gaussian", 8, 4, features=train_features)
    model.save_pretrained(tmp_path)
    loaded = GaussianDenoiser.from_pretrained(tmp_path)
    fresh = GaussianDenoiser(8, 4)
    assert not torch.equal(loaded.mean, fresh.mean)
    assert torch.equal(loaded.eigenvectors, model.eigenvectors)


@pytest.mark.parametrize("preset", PRESETS)
def test_works_inside_inversion_scorer(preset: str, make_tiny, randomize) -> None:
    model = randomize(make_tiny(preset)).eval()
    scorer = InversionScorer(model, DDPMScheduler(), scoring="nll")
    out = scorer.score(torch.randn(2, 8, 4, 4))
    assert out.raw_score.shape == (2,)
    assert out.raw_map.shape == (2, 4, 4)
    assert torch.isfinite(out.latent).all()


def test_gaussian_scores_rank_outliers_higher(train_features: torch.Tensor) -> None:
    model = create_denoiser("gaussian", 8, 4, features=train_features)
    scorer = InversionScorer(model, DDPMScheduler(), scoring="nll")
    normal = train_features[:4]
    outlier = normal.clone()
    outlier[:, :, 1, 2] += 5.0
    scores = scorer.score(torch.cat([normal, outlier])).raw_score
    assert scores[4:].min() > scores[:4].max()


def test_register_denoiser_adds_and_warns_on_overwrite(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_registry._DENOISERS, "factories", dict(_registry._DENOISERS.factories))

    @register_denoiser("tiny-dit")
    def tiny_dit(in_channels: int, grid_size: int, **overrides) -> FeatureDiT:
        return FeatureDiT(in_channels, grid_size, hidden_size=16, depth=1, num_heads=2, **overrides)

    assert "tiny-dit" in list_denoisers()
    assert create_denoiser("tiny-dit", 4, 2).config.hidden_size == 16
    with pytest.warns(UserWarning, match="registered again"):
        register_denoiser("tiny-dit", tiny_dit)


def test_the_dit_s_residual_preset_has_dit_s_size(train_features) -> None:
    model = create_denoiser("gaussian-residual-dit-s", 8, 4, features=train_features)
    size = {k: model.config.residual_config[k] for k in ("hidden_size", "depth", "num_heads")}
    assert size == {"hidden_size": 256, "depth": 4, "num_heads": 4}  # DiT-S (DIT_PRESETS["dit-s"])
    assert model.config.residual_kind == "dit" and model.config.output_scaling == "none"
