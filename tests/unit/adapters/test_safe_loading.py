"""Safe loading opens the files peers really write and still refuses anything that could run code."""

from __future__ import annotations

import collections
import inspect
import operator
import os
import re

import pytest
import torch

from invert_ad.adapters import (
    DDADAdapter,
    DiffusionADAdapter,
    UnsafeCheckpointError,
    load_checkpoint,
    load_official_invad,
    load_weights,
)


def test_defaultdict_of_builtin_factory_loads_as_plain_dict(tmp_path):
    """DiffusionAD's save(): the run's ``args`` are a ``defaultdict(str)`` next to the state dicts."""
    args = collections.defaultdict(str, {"img_size": [32, 32], "channel_mults": (1, 2), "lr": 1e-4, "arg_num": "1"})
    path = tmp_path / "params-best.pt"
    torch.save({"n_epoch": 3, "unet_model_state_dict": {"w": torch.ones(2)}, "args": args}, path)
    loaded = load_checkpoint(path)
    assert type(loaded["args"]) is dict and loaded["args"] == dict(args)
    assert torch.equal(loaded["unet_model_state_dict"]["w"], torch.ones(2))


@pytest.mark.parametrize("factory", [os.getcwd, operator.attrgetter("x"), collections.OrderedDict])
def test_defaultdict_with_other_factory_is_refused(tmp_path, factory):
    path = tmp_path / "odd.pt"
    torch.save({"args": collections.defaultdict(factory)}, path)
    with pytest.raises(UnsafeCheckpointError, match="allow_unsafe_pickle=True"):
        load_checkpoint(path)


def test_the_option_the_error_names_exists_everywhere_it_is_suggested(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "hook": collections.defaultdict(os.getcwd)}, path)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_checkpoint(path)
    option = re.search(r"pass (\w+)=True", str(info.value)).group(1)
    for loader in (load_checkpoint, load_weights, load_official_invad, DDADAdapter.from_checkpoint):
        assert option in inspect.signature(loader).parameters, loader
    for adapter in (DDADAdapter, DiffusionADAdapter):
        assert option in inspect.signature(adapter.from_checkpoint).parameters
