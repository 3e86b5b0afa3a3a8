"""Official InvAD checkpoints -> FeatureDiT, checked against the DiT equations written out with plain torch ops."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from safetensors.torch import save_file

from invert_ad.adapters import (
    StateDictMismatchError,
    convert_official_invad_state_dict,
    load_official_invad,
)
from invert_ad.models import FeatureDiT

C, HIDDEN, HEADS, DEPTH, GRID, NUM_CLASSES = 8, 32, 4, 2, (4, 4), 15
MLP_HIDDEN = 4 * HIDDEN


def official_state_dict(out_channels: int = C, seed: int = 0, ddp: bool = False) -> dict[str, torch.Tensor]:
    """The official wrapper's state dict (`cls_embed`, `net.*`), every tensor random, non-zero, float32.

    Names and shapes follow the official DiT: a PatchEmbed convolution with patch size 1, the timestep MLP on
    256 sinusoidal features, a (1, N, H) position table, timm-style attention / MLP, adaLN modulations, the
    label table and the unused token-input embedding.
    """
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "cls_embed.weight": (NUM_CLASSES, HIDDEN),
        "net.x_embedder.proj.weight": (HIDDEN, C, 1, 1),
        "net.x_embedder.proj.bias": (HIDDEN,),
        "net.x_embedder_linear.weight": (HIDDEN, C),
        "net.x_embedder_linear.bias": (HIDDEN,),
        "net.t_embedder.mlp.0.weight": (HIDDEN, 256),
        "net.t_embedder.mlp.0.bias": (HIDDEN,),
        "net.t_embedder.mlp.2.weight": (HIDDEN, HIDDEN),
        "net.t_embedder.mlp.2.bias": (HIDDEN,),
        "net.y_embedder.embedding_table.weight": (NUM_CLASSES, HIDDEN),
        "net.pos_embed": (1, GRID[0] * GRID[1], HIDDEN),
        "net.final_layer.linear.weight": (out_channels, HIDDEN),
        "net.final_layer.linear.bias": (out_channels,),
        "net.final_layer.adaLN_modulation.1.weight": (2 * HIDDEN, HIDDEN),
        "net.final_layer.adaLN_modulation.1.bias": (2 * HIDDEN,),
    }
    for i in range(DEPTH):
        b = f"net.blocks.{i}."
        shapes |= {
            b + "attn.qkv.weight": (3 * HIDDEN, HIDDEN),
            b + "attn.qkv.bias": (3 * HIDDEN,),
            b + "attn.proj.weight": (HIDDEN, HIDDEN),
            b + "attn.proj.bias": (HIDDEN,),
            b + "mlp.fc1.weight": (MLP_HIDDEN, HIDDEN),
            b + "mlp.fc1.bias": (MLP_HIDDEN,),
            b + "mlp.fc2.weight": (HIDDEN, MLP_HIDDEN),
            b + "mlp.fc2.bias": (HIDDEN,),
            b + "adaLN_modulation.1.weight": (6 * HIDDEN, HIDDEN),
            b + "adaLN_modulation.1.bias": (6 * HIDDEN,),
        }
    sd = {k: torch.randn(shape, generator=g) / math.sqrt(shape[-1]) for k, shape in shapes.items()}
    return {("module." + k if ddp else k): v for k, v in sd.items()}


# ---------------------------------------------------------------- the DiT equations, independently
def _linear(x, sd, name):
    return x @ sd[name + ".weight"].T + sd[name + ".bias"]


def _layer_norm(x, eps=1e-6):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def _modulate(x, shift, scale):
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


def _gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _silu(x):
    return x * torch.sigmoid(x)


def reference_dit(sd: dict[str, torch.Tensor], x: torch.Tensor, t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The official DiT forward for a (B, C, h, w) input, from the original `net.*` tensors, in float64.

    Only the sinusoidal timestep features are computed in float32, as the official code does (at t = 999
    float32 arguments differ from float64 ones by ~1e-4).
    """
    sd = {k.removeprefix("net."): v.double() for k, v in sd.items()}
    b, c, h, w = x.shape
    width = sd["pos_embed"].shape[-1]
    # patch embedding, patch size 1: a per-position linear map, tokens in row-major order
    tokens = x.permute(0, 2, 3, 1).reshape(b, h * w, c) @ sd["x_embedder.proj.weight"][:, :, 0, 0].T
    tokens = tokens + sd["x_embedder.proj.bias"] + sd["pos_embed"]
    # timestep: [cos, sin] of t * 10000^(-k/128), then Linear, SiLU, Linear
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    features = torch.cat([args.cos(), args.sin()], -1).double()
    cond = _linear(_silu(_linear(features, sd, "t_embedder.mlp.0")), sd, "t_embedder.mlp.2")
    head_dim = width // num_heads
    for i in range(len({k.split(".")[1] for k in sd if k.startswith("blocks.")})):
        p = f"blocks.{i}."
        mod = _linear(_silu(cond), sd, p + "adaLN_modulation.1")
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            mod[:, j * width : (j + 1) * width] for j in range(6)
        )
        a = _modulate(_layer_norm(tokens), shift_msa, scale_msa)
        qkv = _linear(a, sd, p + "attn.qkv").reshape(b, h * w, 3, num_heads, head_dim)
        q, k, v = (qkv[:, :, j].transpose(1, 2) for j in range(3))  # (B, heads, N, d)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim), dim=-1)
        attended = (weights @ v).transpose(1, 2).reshape(b, h * w, width)
        tokens = tokens + gate_msa[:, None] * _linear(attended, sd, p + "attn.proj")
        m = _modulate(_layer_norm(tokens), shift_mlp, scale_mlp)
        mlp = _linear(_gelu_tanh(_linear(m, sd, p + "mlp.fc1")), sd, p + "mlp.fc2")
        tokens = tokens + gate_mlp[:, None] * mlp
    mod = _linear(_silu(cond), sd, "final_layer.adaLN_modulation.1")
    out = _linear(_modulate(_layer_norm(tokens), mod[:, :width], mod[:, width:]), sd, "final_layer.linear")
    return out.reshape(b, h, w, -1).permute(0, 3, 1, 2)  # unpatchify with patch size 1


# ---------------------------------------------------------------- tests
def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, C, *GRID, generator=g, dtype=torch.float64), torch.tensor([0, 500, 999])


@pytest.mark.parametrize("ddp", [False, True])
def test_converted_checkpoint_matches_the_reference_equations(ddp, caplog):
    sd = official_state_dict(ddp=ddp)
    with caplog.at_level(logging.INFO, logger="invert_ad.adapters.invad"):
        model = load_official_invad(sd, num_heads=HEADS).double()
    assert "cls_embed.weight" in caplog.text and "net.y_embedder.embedding_table.weight" in caplog.text
    assert model.config.in_channels == C and model.config.hidden_size == HIDDEN and model.config.depth == DEPTH
    assert tuple(model.grid) == GRID and model.config.mlp_ratio == 4.0 and not model.config.learn_sigma
    x, t = _inputs()
    with torch.no_grad():
        ours = model(x, t).sample
    expected = reference_dit({k.removeprefix("module."): v for k, v in sd.items()}, x, t, HEADS)
    assert expected.abs().mean() > 0.1
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-9)


def test_the_reference_can_tell_head_counts_apart():
    """num_heads is not in the shapes; loading with the wrong count must give another output."""
    sd = official_state_dict()
    x, t = _inputs()
    with torch.no_grad():
        wrong = load_official_invad(sd, num_heads=2).double()(x, t).sample
    assert not torch.allclose(wrong, reference_dit(sd, x, t, HEADS), atol=1e-6)


def test_learned_sigma_and_file_loading(tmp_path):
    sd = official_state_dict(out_channels=2 * C)
    torch.save(sd, tmp_path / "model_ema_latest.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    x, t = _inputs()
    for name in ("model_ema_latest.pth", "model.safetensors"):
        model = load_official_invad(tmp_path / name, num_heads=HEADS).double()
        assert model.config.learn_sigma
        with torch.no_grad():
            torch.testing.assert_close(model(x, t).sample, reference_dit(sd, x, t, HEADS), rtol=1e-9, atol=1e-9)


def test_conversion_keys():
    converted = convert_official_invad_state_dict(official_state_dict(ddp=True))
    assert set(converted) == set(FeatureDiT(in_channels=C, sample_size=4, hidden_size=HIDDEN, depth=DEPTH).state_dict())


def test_errors_name_the_problem():
    sd = official_state_dict()
    with pytest.raises(ValueError, match="patch size 1"):
        convert_official_invad_state_dict({**sd, "net.x_embedder.proj.weight": torch.zeros(HIDDEN, C, 2, 2)})
    with pytest.raises(ValueError, match=r"outside 'net\.'"):
        convert_official_invad_state_dict({**sd, "ema.decay": torch.zeros(())})
    broken = dict(sd)
    del broken["net.blocks.1.attn.proj.bias"]
    with pytest.raises(StateDictMismatchError, match=r"missing: blocks\.1\.attn\.proj\.bias"):
        load_official_invad(broken, num_heads=HEADS)
    with pytest.raises(StateDictMismatchError, match="pos_embed"):
        load_official_invad(sd, num_heads=HEADS, sample_size=8)  # 64 positions, the table has 16
