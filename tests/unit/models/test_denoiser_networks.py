"""The learned networks: shapes, adaLN-Zero initialisation, DiT structure and size."""

from __future__ import annotations

import pytest
import torch

from invert_ad.models import DIT_PRESETS, ConvDenoiser, FeatureDiT, MLPDenoiser, create_denoiser
from invert_ad.models._layers import sincos_pos_embed_2d

CHANNELS = 8
GRID = (4, 4)

NETWORKS = {
    "dit": lambda **kw: FeatureDiT(CHANNELS, GRID, hidden_size=32, depth=2, num_heads=4, **kw),
    "mlp": lambda **kw: MLPDenoiser(CHANNELS, GRID, hidden_size=32, depth=2, **kw),
    "mlp-pos": lambda **kw: MLPDenoiser(CHANNELS, GRID, hidden_size=32, depth=2, position_embedding=True, **kw),
    "conv": lambda **kw: ConvDenoiser(CHANNELS, GRID, width=32, depth=2, num_groups=8, **kw),
    "conv-pos": lambda **kw: ConvDenoiser(
        CHANNELS, GRID, width=32, depth=2, num_groups=8, position_embedding=True, **kw
    ),
}


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_fresh_network_outputs_exact_zero_with_input_shape(name: str) -> None:
    model = NETWORKS[name]()
    x = torch.randn(3, CHANNELS, *GRID)
    out = model(x, torch.tensor([0, 500, 999]))
    assert out.sample.shape == x.shape
    assert torch.count_nonzero(out.sample) == 0


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_learn_sigma_doubles_output_channels(name: str, randomize) -> None:
    model = randomize(NETWORKS[name](learn_sigma=True))
    (out,) = model(torch.randn(2, CHANNELS, *GRID), 10, return_dict=False)
    assert out.shape == (2, 2 * CHANNELS, *GRID)
    assert out.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_scalar_timestep_equals_broadcast_vector(name: str, randomize) -> None:
    model = randomize(NETWORKS[name]()).eval()
    x = torch.randn(2, CHANNELS, *GRID)
    assert torch.equal(model(x, 321).sample, model(x, torch.tensor([321, 321])).sample)


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_timestep_and_input_change_the_output_after_training_starts(name: str, randomize) -> None:
    model = randomize(NETWORKS[name]()).eval()
    x = torch.randn(1, CHANNELS, *GRID)
    assert not torch.allclose(model(x, 10).sample, model(x, 900).sample)
    assert not torch.allclose(model(x, 10).sample, model(x + 1, 10).sample)


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_wrong_channels_rejected(name: str) -> None:
    with pytest.raises(ValueError, match="shape"):
        NETWORKS[name]()(torch.randn(1, CHANNELS + 1, *GRID), 0)


def test_position_aware_models_require_their_grid_others_accept_any() -> None:
    x = torch.randn(1, CHANNELS, 6, 5)
    for name in ("dit", "mlp-pos", "conv-pos"):
        with pytest.raises(ValueError, match="sample_size"):
            NETWORKS[name]()(x, 0)
    for name in ("mlp", "conv"):
        assert NETWORKS[name]()(x, 0).sample.shape == x.shape


def test_mlp_is_per_position() -> None:
    model = MLPDenoiser(CHANNELS, GRID, hidden_size=16, depth=2)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    x = torch.randn(1, CHANNELS, *GRID)
    y = x.clone()
    y[:, :, 0, 0] += 1.0
    diff = (model(x, 5).sample - model(y, 5).sample).abs().sum(dim=1)[0]
    assert diff[0, 0] > 0
    assert diff.flatten()[1:].abs().max() == 0


def test_timestep_batch_mismatch_rejected() -> None:
    with pytest.raises(ValueError, match="timestep"):
        NETWORKS["dit"]()(torch.randn(2, CHANNELS, *GRID), torch.tensor([1, 2, 3]))


def test_bad_architecture_arguments_rejected() -> None:
    with pytest.raises(ValueError, match="num_heads"):
        FeatureDiT(CHANNELS, GRID, hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="divisible by 4"):
        FeatureDiT(CHANNELS, GRID, hidden_size=6, num_heads=3)
    with pytest.raises(ValueError, match="num_groups"):
        ConvDenoiser(CHANNELS, GRID, width=30, num_groups=8)
    with pytest.raises(ValueError, match="sample_size"):
        FeatureDiT(CHANNELS, (4, 0))


def test_dit_parameter_names_mirror_the_official_dit() -> None:
    model = FeatureDiT(CHANNELS, GRID, hidden_size=32, depth=1, num_heads=2)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    h = 32
    expected = {
        "x_embedder.proj.weight": (h, CHANNELS, 1, 1),
        "x_embedder.proj.bias": (h,),
        "t_embedder.mlp.0.weight": (h, 256),
        "t_embedder.mlp.0.bias": (h,),
        "t_embedder.mlp.2.weight": (h, h),
        "t_embedder.mlp.2.bias": (h,),
        "pos_embed": (1, GRID[0] * GRID[1], h),
        "blocks.0.attn.qkv.weight": (3 * h, h),
        "blocks.0.attn.qkv.bias": (3 * h,),
        "blocks.0.attn.proj.weight": (h, h),
        "blocks.0.attn.proj.bias": (h,),
        "blocks.0.mlp.fc1.weight": (4 * h, h),
        "blocks.0.mlp.fc1.bias": (4 * h,),
        "blocks.0.mlp.fc2.weight": (h, 4 * h),
        "blocks.0.mlp.fc2.bias": (h,),
        "blocks.0.adaLN_modulation.1.weight": (6 * h, h),
        "blocks.0.adaLN_modulation.1.bias": (6 * h,),
        "final_layer.linear.weight": (CHANNELS, h),
        "final_layer.linear.bias": (CHANNELS,),
        "final_layer.adaLN_modulation.1.weight": (2 * h, h),
        "final_layer.adaLN_modulation.1.bias": (2 * h,),
    }
    assert shapes == expected
    assert model.pos_embed.requires_grad


def test_position_table_is_2d_sincos() -> None:
    table = sincos_pos_embed_2d(8, (2, 3))  # token (row i, col j) at index 3 i + j
    assert table.shape == (6, 8)
    # first half encodes the column, second half the row; each half is [sin(p w), cos(p w)] with w = 1, 1e-2
    col, row = 2.0, 1.0
    w = torch.tensor([1.0, 0.01])
    expected = torch.cat([(col * w).sin(), (col * w).cos(), (row * w).sin(), (row * w).cos()])
    torch.testing.assert_close(table[3 * 1 + 2], expected)


def test_dit_g_has_about_1_22_billion_parameters_on_meta_device() -> None:
    with torch.device("meta"):
        model = create_denoiser("dit-g", in_channels=272, grid_size=16)
    count = sum(p.numel() for p in model.parameters())
    assert 1.20e9 < count < 1.24e9
    assert DIT_PRESETS["dit-g"] == {"hidden_size": 2048, "depth": 16, "num_heads": 8}
    assert model.config.mlp_ratio == 4.0


def test_dit_b_and_dit_s_sizes() -> None:
    with torch.device("meta"):
        base = create_denoiser("dit-b", in_channels=272, grid_size=16)
        small = create_denoiser("dit-s", in_channels=192, grid_size=16)
    assert len(base.blocks) == 8 and base.config.hidden_size == 1024
    assert sum(p.numel() for p in small.parameters()) < 6e6
