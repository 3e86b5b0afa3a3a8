"""Reading a peer's recorded configuration: the ``config.json`` that sits beside a checkpoint.

A peer's configuration is what its own code was run with (its YAML or argparse values). This library reads it
in the layout of ``config.json``: ``constructor_arguments`` (the network's constructor), ``schedule``
(``kind``, ``beta_start``, ``beta_end``, ``num_train_timesteps``) and, for DiAD, ``full_model_params`` (the
``model.params`` block of its YAML). Anything the file does not record can be passed as a plain mapping of
the same layout.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .base import NoiseSchedule

__all__ = ["read_peer_config", "schedule_from_config"]


def read_peer_config(config: str | os.PathLike[str] | Mapping[str, Any]) -> dict[str, Any]:
    """A peer configuration as a dict: ``config`` itself (copied) or the JSON file it names.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a JSON object.
        TypeError: ``config`` is neither a mapping nor a path.
    """
    if isinstance(config, Mapping):
        return dict(config)
    if not isinstance(config, (str, os.PathLike)):
        raise TypeError(f"config must be a mapping or the path of a config.json, got {type(config).__name__}")
    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"peer config not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def schedule_from_config(config: Mapping[str, Any], default: NoiseSchedule) -> NoiseSchedule:
    """The noise schedule a peer configuration records under ``schedule`` (``default`` when it records none).

    ``kind`` is ``linear`` or ``scaled_linear`` (LDM's ``linear``, which spaces ``sqrt(beta)`` evenly, is
    recorded as ``scaled_linear``); ``beta_start``, ``beta_end`` and ``num_train_timesteps`` default to
    ``default``'s.

    Raises:
        ValueError: an unknown ``kind``.
    """
    schedule = config.get("schedule")
    if not isinstance(schedule, Mapping):
        return default
    kind = str(schedule.get("kind", default.beta_schedule)).split()[0]
    if kind not in ("linear", "scaled_linear"):
        raise ValueError(f"unknown schedule kind {schedule.get('kind')!r}; expected 'linear' or 'scaled_linear'")
    return NoiseSchedule(
        kind,
        float(schedule.get("beta_start", default.beta_start)),
        float(schedule.get("beta_end", default.beta_end)),
        int(schedule.get("num_train_timesteps", default.num_train_timesteps)),
    )
