"""The peers' networks as written here, checked against their equations and at other widths than the fixtures'."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import ControlNetModel

from invert_ad.adapters import DDADAdapter, DiffusionADAdapter, PixelUNet, SemanticGuidedNetwork
from invert_ad.adapters.ldm import controlnet_config_from_ldm, unet_config_from_ldm, vae_config_from_ldm
from invert_ad.schedule import official_grid, resolve_grid

# DiAD's models/diad.yaml at its shipped size (Stable Diffusion 1.5's UNet)
SD15_UNET = {
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "attention_resolutions": [4, 2, 1],
    "num_res_blocks": 2,
    "channel_mult": [1, 2, 4, 4],
    "num_heads": 8,
    "use_spatial_transformer": True,
    "transformer_depth": 1,
    "context_dim": 768,
    "use_checkpoint": True,
    "legacy": False,
}


# ---------------------------------------------------------------- the official grid
@pytest.mark.parametrize(
    ("steps", "calls"),
    [(1, [0]), (2, [0, 999]), (3, [0, 500, 999]), (5, [0, 250, 500, 749, 999]), (4, [0, 333, 666, 999])],
)
def test_official_grid_matches_the_respacing_by_hand(steps, calls):
    """Stride 999 / (S - 1) accumulated from 0, rounded half to even: S = 5 gives 249.75 -> 250, 749.25 -> 749."""
    grid = resolve_grid(f"official:{steps}")
    assert list(grid.call_points) == calls and grid.terminal_alpha_bar == 0.0
    assert grid == official_grid(steps)
    assert resolve_grid("official") == official_grid(3)


@pytest.mark.parametrize("spec", ["official:0", "official:x", "official:1001"])
def test_official_grid_rejects_bad_step_counts(spec):
    with pytest.raises(ValueError, match=r"num_steps|after ':'"):
        resolve_grid(spec)


# ---------------------------------------------------------------- DDAD's / DiffusionAD's UNet
def test_pixel_unet_attention_is_multi_head_softmax_attention():
    torch.manual_seed(0)
    net = PixelUNet(img_size=8, base_channels=32, channel_mults=(1,), attention_resolutions="8", n_heads=2)
    attention = net.middle[1]
    x = torch.randn(2, 32, 4, 4)
    with torch.no_grad():
        qkv = attention.to_qkv(attention.norm(x.reshape(2, 32, 16)))  # (B, 3C, T), heads laid out [q, k, v] each
        heads = qkv.reshape(2, 2, 3, 16, 16)  # (B, heads, qkv, width, T)
        q, k, v = heads[:, :, 0], heads[:, :, 1], heads[:, :, 2]
        weights = torch.softmax(q.transpose(-1, -2) @ k / math.sqrt(16), dim=-1)  # (B, heads, T, T)
        out = (v @ weights.transpose(-1, -2)).reshape(2, 32, 16)
        expected = (x.reshape(2, 32, 16) + attention.proj_out(out)).reshape(2, 32, 4, 4)
        torch.testing.assert_close(attention(x), expected, atol=1e-5, rtol=1e-5)


def test_pixel_unet_layout_follows_its_arguments():
    net = PixelUNet(
        img_size=32, base_channels=32, channel_mults=(1, 2), attention_resolutions="16", n_heads=2, in_channels=3
    )
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert shapes["down.0.0.weight"] == (32, 3, 3, 3) and shapes["time_embedding.1.weight"] == (128, 32)
    assert shapes["down.4.1.to_qkv.weight"] == (192, 64, 1)  # attention at stride 32 / 16 = 2
    assert "down.1.1.to_qkv.weight" not in shapes and shapes["out.2.weight"] == (3, 32, 3, 3)
    assert net(torch.zeros(1, 3, 32, 32), torch.tensor([7])).shape == (1, 3, 32, 32)
    assert PixelUNet(img_size=64, base_channels=32).config.channel_mults == (1, 2, 3, 4)  # the peers' default
    with pytest.raises(TypeError, match="img_sizes"):
        PixelUNet.from_arguments({"img_sizes": 32, "base_channels": 32})
    with pytest.raises(ValueError, match="attention_resolutions"):
        PixelUNet(img_size=32, base_channels=32, attention_resolutions="not passed")


def test_in_channels_come_from_the_weights_without_a_config():
    assert DDADAdapter(torch.nn.Conv2d(5, 5, 3)).config.in_channels == 5


def test_diffusionad_network_from_its_args():
    args = {
        "img_size": [64, 64],
        "base_channels": 32,
        "channel_mults": "",
        "dropout": 0,
        "num_heads": 4,
        "num_head_channels": -1,
        "channels": 3,
    }
    net = DiffusionADAdapter.network_from_checkpoint({"args": args})
    assert net.config.channel_mults == (1, 2, 3, 4) and net.config.attention_resolutions == (32, 16, 8)
    with pytest.raises(ValueError, match="lack"):
        DiffusionADAdapter.network_from_checkpoint({"args": {"img_size": 32}})
    with pytest.raises(ValueError, match="config"):
        DDADAdapter.network_from_checkpoint({"w": torch.ones(1)})


# ---------------------------------------------------------------- DiAD: LDM configs and the SGN
def test_ldm_configs_at_diads_shipped_size():
    unet = unet_config_from_ldm(SD15_UNET, 32)
    assert unet["block_out_channels"] == [320, 640, 1280, 1280] and unet["attention_head_dim"] == [8] * 4
    assert unet["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert unet["up_block_types"] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3 and unet["cross_attention_dim"] == 768
    per_channel = unet_config_from_ldm({**SD15_UNET, "num_heads": -1, "num_head_channels": 64}, 32)
    assert per_channel["attention_head_dim"] == [5, 10, 20, 20]  # heads per level = width // 64
    vae = vae_config_from_ldm(
        {
            "ch": 128,
            "ch_mult": [1, 2, 4, 4],
            "num_res_blocks": 2,
            "in_channels": 3,
            "out_ch": 3,
            "z_channels": 4,
            "resolution": 256,
            "double_z": True,
        },
        4,
        0.18215,
    )
    assert vae["block_out_channels"] == [128, 256, 512, 512] and vae["latent_channels"] == 4


def test_sgn_at_diads_shipped_size_builds_from_its_sff_shapes():
    with torch.device("meta"):
        encoder = ControlNetModel(**controlnet_config_from_ldm({**SD15_UNET, "hint_channels": 3}))
        shipped = {
            f"down{s}{t}.0.weight": torch.empty(1280, 640 if s == 1 else 1280, 3, 3)
            for s in (1, 2, 3)
            for t in (1, 2, 3)
        }
        sgn = SemanticGuidedNetwork(encoder, SemanticGuidedNetwork.fusion_shapes_of(shipped))
    assert tuple(sgn.fusion["down11"][0].weight.shape) == (1280, 640, 3, 3)
    wrong = dict(SemanticGuidedNetwork.fusion_shapes_of(shipped), down11=(1280, 1280))
    with pytest.raises(ValueError, match="down11 maps 1280 -> 1280"):
        SemanticGuidedNetwork(encoder, wrong)


def test_sff_replaces_residuals_9_to_11_by_the_fused_sum():
    torch.manual_seed(0)
    encoder = ControlNetModel(
        in_channels=4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=2,
        norm_num_groups=4,
        down_block_types=("DownBlock2D",) * 4,
        cross_attention_dim=8,
        conditioning_embedding_out_channels=(4, 4, 4, 4),
    ).eval()
    for conv in encoder.controlnet_down_blocks:
        torch.nn.init.normal_(conv.weight, std=0.3)
    shapes = {f"down{s}{t}": (16, 8 if s == 1 else 16) for s in (1, 2, 3) for t in (1, 2, 3)}
    sgn = SemanticGuidedNetwork(encoder, shapes).eval()
    x, hint, context = torch.randn(2, 4, 16, 16), torch.randn(2, 3, 128, 128), torch.randn(2, 3, 8)
    t = torch.tensor([3, 700])
    with torch.no_grad():
        plain, plain_mid = encoder(x, t, encoder_hidden_states=context, controlnet_cond=hint, return_dict=False)
        down, mid = sgn(x, t, encoder_hidden_states=context, controlnet_cond=hint)

        def fuse(r, name):  # conv3x3 stride 2 (no bias), instance norm without affine, SiLU
            h = F.conv2d(r, sgn.fusion[name][0].weight, stride=2, padding=1)
            mean, var = h.mean((2, 3), keepdim=True), h.var((2, 3), unbiased=False, keepdim=True)
            return F.silu((h - mean) / torch.sqrt(var + 1e-5))

        for i in range(12):
            if i < 9:
                assert torch.equal(down[i], plain[i])
            else:
                y = i - 8
                expected = F.silu(plain[i] + sum(fuse(plain[5 + s], f"down{s}{y}") for s in (1, 2, 3)))
                torch.testing.assert_close(down[i], expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(mid, plain_mid)


def test_ddad_from_its_file_and_a_mapping_of_constructor_arguments(tmp_path):
    """DDAD's save: DataParallel's state dict under the epoch number; the arguments as a plain mapping."""
    arguments = {
        "img_size": 16,
        "base_channels": 32,
        "channel_mults": (1, 2),
        "attention_resolutions": "8",
        "n_heads": 2,
        "in_channels": 3,
    }
    torch.manual_seed(0)
    net = PixelUNet(**arguments).eval()
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, tmp_path / "300")
    adapter = DDADAdapter.from_checkpoint(tmp_path / "300", arguments)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([4, 900])
    with torch.no_grad():
        assert torch.equal(adapter(x, t), net(x, t.float()))
    assert adapter.config.in_channels == 3 and not adapter.training
