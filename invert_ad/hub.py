"""Saving and loading models as folders (diffusers-style), locally or through the Hugging Face Hub.

A model folder::

    MODEL_DIR/
      scorer_config.json            InversionScorer: grid, scorer, IRF / reconstruction settings
      scorer_state.safetensors      the fitted statistic (e.g. the hybrid normalisation)
      denoiser/                     the denoiser (diffusers save_pretrained: config.json + safetensors)
      scheduler/                    the scheduler config
      detector_config.json          (AnomalyDetector only) the backbone spec, the thresholds (calibration)
                                    and the domain statistics
      detector_state.safetensors    (AnomalyDetector only) the per-channel feature standardisation
      README.md                     a model card
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._version import __version__

__all__ = [
    "detector_model_card",
    "load_json",
    "model_class",
    "push_folder_to_hub",
    "resolve_model_dir",
    "scheduler_class",
    "write_model_card",
]


def resolve_model_dir(name_or_path: str | os.PathLike, revision: str | None = None, token: str | None = None) -> Path:
    """A local folder as is, else a Hub repo id downloaded (or found in the cache).

    Raises:
        OSError: not a folder and not obtainable from the Hub (offline, unknown repo, no network), with a
            message saying which.
    """
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"{path} is a file; a model is a folder (see invert_ad.hub)")
    name = str(name_or_path)
    if name.count("/") != 1 or name.startswith((".", "/")):
        raise FileNotFoundError(f"model folder not found: {path} (and {name!r} is not a Hub repo id)")
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        return Path(
            snapshot_download(
                name,
                revision=revision,
                token=token,
                local_files_only=offline,
                etag_timeout=5,
                library_name="invert_ad",
                library_version=__version__,
            )
        )
    except Exception as err:
        why = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else f"{type(err).__name__}: {err}"
        raise OSError(f"cannot load model {name!r} from the Hugging Face Hub: {why}") from err


def load_json(path: Path) -> dict[str, Any]:
    """Read a JSON config file with an error naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path.name} not found in {path.parent}: not an invert_ad model folder")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def model_class(name: str) -> type:
    """The denoiser class named in a saved config: invert_ad's own models first, then diffusers models.

    Raises:
        ValueError: not a known ``ModelMixin`` class (nothing else is ever instantiated from a config).
    """
    import diffusers
    from diffusers import ModelMixin

    try:
        from . import models as own_models
    except ImportError:  # pragma: no cover - models are part of the package
        own_models = None
    for module in (own_models, diffusers):
        cls = getattr(module, name, None) if module is not None else None
        if isinstance(cls, type) and issubclass(cls, ModelMixin):
            return cls
    raise ValueError(f"unknown denoiser class {name!r}: expected an invert_ad.models or diffusers model class")


def scheduler_class(name: str) -> type:
    """The diffusers scheduler class named in a saved config."""
    import diffusers
    from diffusers import SchedulerMixin

    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise ValueError(f"unknown scheduler class {name!r}: expected a diffusers scheduler")
    return cls


def write_model_card(folder: Path, *, title: str, body: str, metadata: dict[str, Any]) -> None:
    """Write README.md with YAML front matter (Hub metadata) and a Markdown body."""
    from .io import atomic_write_text

    lines = ["---"]
    for key, value in metadata.items():
        if isinstance(value, list | tuple):
            lines.append(f"{key}:")
            lines.extend(f"- {item}" for item in value)
        else:
            lines.append(f"{key}: {value}")
    lines += ["---", "", f"# {title}", "", body.strip(), ""]
    atomic_write_text(folder / "README.md", "\n".join(lines))


def push_folder_to_hub(
    save: Callable[[Path], Any], repo_id: str, *, private: bool = True, token: str | None = None, **kwargs: Any
) -> str:
    """Save a model with ``save(folder)`` into a temporary folder and upload it as a Hub model repo.

    Args:
        save: writes the model folder (a ``save_pretrained`` method).
        repo_id: ``user/repo``.
        private: create the repo private.
        token: a Hub token (default: the logged-in one).
        **kwargs: passed to ``HfApi.upload_folder`` (``commit_message``, ``revision``, ...).

    Returns:
        The commit URL.
    """
    import tempfile

    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        save(Path(tmp))
        return str(api.upload_folder(repo_id=repo_id, folder_path=tmp, **kwargs))


def detector_model_card(detector: Any, folder: Path, facts: dict[str, Any]) -> None:
    """Write the model card of an :class:`~invert_ad.AnomalyDetector` into ``folder``.

    Args:
        detector: the detector being saved.
        folder: its model folder.
        facts: ``dataset`` (str), ``metrics`` (name -> float), ``training`` (str or dict).
    """
    metrics = facts.get("metrics") or {}
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in metrics.items() if isinstance(v, float))
    table = "| metric | value |\n|---|---|\n" + rows if rows else "none recorded"
    scorer, size = detector.scorer, detector.image_size
    extractor = detector.feature_extractor.get_config().get("name")
    body = f"""
An `invert_ad` anomaly detector: {extractor} features, a `{type(scorer.denoiser).__name__}` denoiser, scored as
`{scorer!r}` ({scorer.nfe} network calls per image).

Trained on: {facts.get("dataset", "unspecified")}.

## Use

```python
from invert_ad import AnomalyDetector
detector = AnomalyDetector.from_pretrained("path/or/hub-id")
out = detector.predict(images)  # images (B, 3, {size}, {size}) in [0, 1]; out.pred_score, out.pred_label, ...
```

or `invert-ad predict --model path/or/hub-id IMAGES...`.

## Metrics measured at training time
{table}

## Training
{facts.get("training", "unspecified")}
"""
    metadata: dict[str, Any] = {"library_name": "invert_ad", "tags": ["anomaly-detection", "diffusion", "invad"]}
    if facts.get("dataset"):
        metadata["datasets"] = [facts["dataset"]]
    write_model_card(folder, title="invert_ad anomaly detector", body=body, metadata=metadata)
