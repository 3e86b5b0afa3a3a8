"""Checkpoint loading: every wrapper is undone losslessly, unsafe pickles are refused, mismatches are named."""

from __future__ import annotations

import pytest
import torch
from adapter_nets import make_pixel_unet, pixel_images
from safetensors.torch import save_file
from torch import nn

from invert_ad.adapters import (
    DDADAdapter,
    DiffusionADAdapter,
    StateDictMismatchError,
    UnsafeCheckpointError,
    extract_state_dict,
    load_checkpoint,
    load_weights,
    strip_wrapper_prefixes,
)


def _prefixed(state_dict, prefix):
    return {prefix + k: v for k, v in state_dict.items()}


def _checkpoint(kind: str, model: nn.Module):
    """The model's weights as the named training setup would save them."""
    sd = model.state_dict()
    if kind == "plain":
        return sd
    if kind == "ddp":  # DDAD: DataParallel's `module.`
        return nn.DataParallel(model).state_dict()
    if kind == "compile":  # torch.compile's `_orig_mod.` (the wrapper alone, nothing is compiled)
        return torch.compile(model).state_dict()
    if kind == "lightning_model":  # LightningModule with self.model and a loss module
        inner = {**_prefixed(sd, "model."), "criterion.weight": torch.ones(3)}
        return {"state_dict": inner, "epoch": 3, "global_step": 120, "hyper_parameters": {"lr": 1e-4}}
    if kind == "lightning_net_compiled":  # LightningModule with a compiled self.net
        return {"state_dict": _prefixed(sd, "net._orig_mod."), "epoch": 1}
    raise ValueError(kind)


KINDS = ["plain", "ddp", "compile", "lightning_model", "lightning_net_compiled"]


def _save(checkpoint, path):
    if path.suffix == ".safetensors":  # a flat tensor file: the wrapper's state dict, keys as saved
        save_file({k: v.contiguous() for k, v in extract_state_dict(checkpoint).items()}, str(path))
    else:
        torch.save(checkpoint, path)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("kind", KINDS)
def test_every_wrapper_loads_bit_identically(kind, suffix, tmp_path):
    original = make_pixel_unet(seed=0)
    path = tmp_path / f"{kind}{suffix}"
    _save(_checkpoint(kind, original), path)
    fresh = make_pixel_unet(seed=1)
    x, t = pixel_images(2), torch.tensor([10, 700])
    with torch.no_grad():
        assert not torch.equal(fresh(x, t).sample, original(x, t).sample)  # the load below has work to do
        adapter = DDADAdapter.from_checkpoint(path, fresh)
        assert adapter.model is fresh
        for name, value in original.state_dict().items():
            assert torch.equal(fresh.state_dict()[name], value), name
        x0 = adapter.encode(pixel_images(2))
        assert torch.equal(adapter(x0, t), DDADAdapter(original)(x0, t))


def test_diffusionad_checkpoint_dict(tmp_path):
    original = make_pixel_unet(seed=0)
    seg = nn.Conv2d(6, 1, 3)
    checkpoint = {
        "n_epoch": 300,
        "unet_model_state_dict": nn.DataParallel(original).state_dict(),
        "seg_model_state_dict": seg.state_dict(),
        "optimizer_state_dict": torch.optim.AdamW(original.parameters()).state_dict(),
    }
    torch.save(checkpoint, tmp_path / "diffusionad.pt")
    adapter = DiffusionADAdapter.from_checkpoint(tmp_path / "diffusionad.pt", make_pixel_unet(seed=1))
    x0, t = adapter.encode(pixel_images(2)), torch.tensor([3, 900])
    with torch.no_grad():
        assert torch.equal(adapter(x0, t), DiffusionADAdapter(original)(x0, t))


_UNPICKLED = []


def _record_unpickling() -> str:
    _UNPICKLED.append(True)
    return "payload"


class _Payload:
    """An object whose unpickling would run code."""

    def __reduce__(self):
        return (_record_unpickling, ())


def test_unsafe_pickle_is_refused_without_running_it(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": make_pixel_unet().state_dict(), "callback": _Payload()}, path)
    with pytest.raises(UnsafeCheckpointError, match="not unpickled"):
        load_checkpoint(path)
    with pytest.raises(UnsafeCheckpointError):
        DDADAdapter.from_checkpoint(path, make_pixel_unet())
    assert _UNPICKLED == []


def test_missing_unexpected_and_mis_shaped_keys_are_named():
    sd = dict(make_pixel_unet().state_dict())
    del sd["conv_in.bias"]
    sd["extra.weight"] = torch.zeros(1)
    sd["conv_out.weight"] = torch.zeros(3, 8, 1, 1)
    with pytest.raises(StateDictMismatchError) as info:
        load_weights(make_pixel_unet(), sd)
    message = str(info.value)
    assert "1 missing: conv_in.bias" in message
    assert "1 unexpected: extra.weight" in message
    assert "conv_out.weight: (3, 8, 1, 1) vs (3, 8, 3, 3)" in message
    assert info.value.missing == ["conv_in.bias"] and info.value.unexpected == ["extra.weight"]


def test_wrong_architecture_lists_many_keys():
    small = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(StateDictMismatchError, match=r"missing: 0\.bias, 0\.weight") as info:
        load_weights(small, make_pixel_unet().state_dict())
    assert "more)" in str(info.value)  # long lists are cut, with a count


def test_ambiguous_prefixes_need_a_choice():
    model, ema = make_pixel_unet(seed=0), make_pixel_unet(seed=2)
    checkpoint = {"state_dict": {**_prefixed(model.state_dict(), "model."), **_prefixed(ema.state_dict(), "ema.")}}
    with pytest.raises(ValueError, match="prefix="):
        load_weights(make_pixel_unet(seed=1), checkpoint)
    loaded = load_weights(make_pixel_unet(seed=1), checkpoint, prefix="ema.")
    assert torch.equal(loaded.conv_in.weight, ema.conv_in.weight)


def test_extract_state_dict_errors():
    with pytest.raises(ValueError, match="key="):
        extract_state_dict({"epoch": 3, "weights": {"a": torch.ones(1)}})
    assert set(extract_state_dict({"epoch": 3, "weights": {"a": torch.ones(1)}}, key="weights")) == {"a"}
    with pytest.raises(KeyError, match="epoch"):
        extract_state_dict({"epoch": 3}, key="model")
    with pytest.raises(ValueError, match="tensors"):
        extract_state_dict({"state_dict": {"a": 1}})


def test_strip_wrapper_prefixes():
    t = torch.zeros(1)
    stripped = strip_wrapper_prefixes({"module._orig_mod.a.b": t, "net._orig_mod.c": t, "module.module.d": t})
    assert list(stripped) == ["a.b", "net.c", "d"]
    assert list(strip_wrapper_prefixes({"my_module.x": t, "a.module.y": t})) == ["my_module.x", "a.module.y"]
    with pytest.raises(ValueError, match="collide"):
        strip_wrapper_prefixes({"module.a": t, "a": t})


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "absent.pt")
