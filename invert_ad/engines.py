"""Inference engines for a detector's exported scoring path: ONNX Runtime and OpenVINO, checked before use.

An engine is a function ``images (B, 3, S, S) in [0, 1] -> EngineOutput(raw_scores (B,), anomaly_maps (B, h, w))``
computing what the Python path (:meth:`AnomalyDetector.score <invert_ad.pipeline.AnomalyDetector.score>`)
computes: raw image scores and raw maps on the feature grid (resized afterwards, to ``S x S`` or to each image's
original size, by the caller). :func:`load_engine` builds one:

* ``torch``: the detector itself (eager PyTorch, with its :meth:`~invert_ad.pipeline.AnomalyDetector.optimize`
  settings);
* ``onnxruntime`` / ``openvino``: the detector's scoring path traced once with ``torch.export`` (batch axis
  dynamic; :meth:`ExportableDetector.raw_outputs <invert_ad.export.ExportableDetector.raw_outputs>`), converted
  to ONNX in memory and compiled by the engine for the CPU in float32.

Every non-torch engine is checked on ``check_images`` against the Python path before it is returned: scores and
maps must agree within ``tolerance`` relative to ``max(1, max |python|)`` (:data:`DEFAULT_TOLERANCE`), otherwise
:class:`EngineMismatchError` is raised. Real images make the stronger check.

Threads: one intra-op thread per CPU this process may run on (``os.sched_getaffinity``), no inter-op
parallelism (the graph is a chain), no spinning threads between calls; set ``threads`` on a shared machine.

:class:`EngineDetector` is an :class:`~invert_ad.pipeline.AnomalyDetector` whose :meth:`~EngineDetector.score`
runs an engine, so :func:`~invert_ad.predict.predict_paths` and :func:`~invert_ad.evaluation.evaluate_detector`
(through :meth:`EngineDetector.score_dataset`) give their usual outputs with it: ``invert-ad predict --engine``,
``invert-ad evaluate --engine``. ONNX Runtime needs the ``export`` extra, OpenVINO the ``openvino`` extra.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .data import ImageDataset, collate_samples
from .export import ExportableDetector, _example_images, _metadata, onnx_bytes, trace_images
from .pipeline import AnomalyDetector, DetectorOutput, upsample_maps
from .scorer import ScoreOutput

__all__ = [
    "DEFAULT_TOLERANCE",
    "ENGINES",
    "EngineDetector",
    "EngineMismatchError",
    "EngineOutput",
    "default_threads",
    "load_engine",
]

ENGINES: tuple[str, ...] = ("torch", "onnxruntime", "openvino")
"""Engine names accepted by :func:`load_engine` and ``--engine``."""
DEFAULT_TOLERANCE = 1e-3
"""Largest accepted ``max |engine - python| / max(1, max |python|)`` for raw scores and for maps."""
RAW_OUTPUT_NAMES = ("raw_image_scores", "grid_anomaly_maps")

EngineName = Literal["torch", "onnxruntime", "openvino"]


class EngineMismatchError(RuntimeError):
    """An engine's outputs differ from the Python path's by more than the tolerance."""


@dataclass(frozen=True)
class EngineOutput:
    """Raw outputs of an engine for a batch of images.

    Attributes:
        raw_scores: ``(B,)`` float32 raw image scores, higher is more anomalous.
        anomaly_maps: ``(B, h, w)`` float32 raw maps on the feature grid, higher is more anomalous.
    """

    raw_scores: torch.Tensor
    anomaly_maps: torch.Tensor


@dataclass
class Engine:
    """A loaded engine: call it on images ``(B, 3, S, S)`` float32 in ``[0, 1]``.

    Attributes:
        name: one of :data:`ENGINES`.
        run: the engine's own batch function, numpy ``(B, 3, S, S)`` -> ``(scores (B,), maps (B, h, w))``.
        threads: intra-op threads (``None`` for torch: the process's setting).
        batch_size: at most this many images per engine call (larger inputs are split); ``None``: as given.
        check: ``max_rel_diff`` per output on the check images (empty for torch).
    """

    name: str
    run: Callable[[np.ndarray], tuple[Any, Any]]
    threads: int | None = None
    batch_size: int | None = None
    check: dict[str, float] = field(default_factory=dict)

    def __call__(self, images: torch.Tensor) -> EngineOutput:
        """Raw scores ``(B,)`` and feature-grid maps ``(B, h, w)`` of images ``(B, 3, S, S)`` in ``[0, 1]``."""
        chunks = images.split(self.batch_size) if self.batch_size else (images,)
        scores, maps = [], []
        for chunk in chunks:
            s, m = self.run(chunk.detach().cpu().float().contiguous().numpy())
            scores.append(torch.as_tensor(np.asarray(s), dtype=torch.float32))
            maps.append(torch.as_tensor(np.asarray(m), dtype=torch.float32))
        return EngineOutput(torch.cat(scores), torch.cat(maps))


class _RawOutputs(nn.Module):
    """The traced module: :meth:`ExportableDetector.raw_outputs` as ``forward``."""

    def __init__(self, detector: AnomalyDetector) -> None:
        super().__init__()
        self.exportable = ExportableDetector(detector)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.exportable.raw_outputs(images)


def default_threads() -> int:
    """CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _import(name: str, extra: str) -> Any:
    try:
        return __import__(name)
    except ImportError as err:
        raise ImportError(f"the {name} engine needs the {extra!r} extra: pip install 'invert_ad[{extra}]'") from err


def _onnxruntime_run(model: bytes, threads: int) -> Callable[[np.ndarray], tuple[Any, Any]]:
    ort = _import("onnxruntime", "export")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads sleep between calls
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])

    def run(images: np.ndarray) -> tuple[Any, Any]:
        return tuple(session.run(list(RAW_OUTPUT_NAMES), {"images": images}))

    return run


def _openvino_run(model: bytes, threads: int) -> Callable[[np.ndarray], tuple[Any, Any]]:
    ov = _import("openvino", "openvino")
    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
    compiled = core.compile_model(core.read_model(model=model), "CPU", config)
    request = compiled.create_infer_request()

    def run(images: np.ndarray) -> tuple[Any, Any]:
        results = request.infer({"images": images})
        return tuple(np.array(results[compiled.output(name)]) for name in RAW_OUTPUT_NAMES)

    return run


_RUNNERS = {"onnxruntime": _onnxruntime_run, "openvino": _openvino_run}


def _check(engine: Engine, detector: AnomalyDetector, images: torch.Tensor, tolerance: float) -> dict[str, float]:
    """``max_rel_diff`` of the engine's outputs from the Python path's on ``images``, per output name.

    Raises:
        EngineMismatchError: a shape differs, or a relative difference exceeds ``tolerance``.
    """
    with torch.inference_mode():
        reference = detector.score(images)
    got = engine(images)
    relative = {}
    expected = (reference.image_scores, reference.scores.anomaly_maps)
    for name, have, want in zip(RAW_OUTPUT_NAMES, (got.raw_scores, got.anomaly_maps), expected, strict=True):
        want = want.detach().cpu().float()
        if have.shape != want.shape:
            raise EngineMismatchError(
                f"{engine.name}: {name} has shape {tuple(have.shape)}, Python {tuple(want.shape)}"
            )
        relative[name] = ((have - want).abs().max() / want.abs().max().clamp_min(1.0)).item()
        if not relative[name] <= tolerance:
            raise EngineMismatchError(
                f"the {engine.name} engine disagrees with Python: {name} differs by a relative {relative[name]:.3g} "
                f"> tolerance {tolerance:g} on the check images"
            )
    return relative


def load_engine(
    detector: AnomalyDetector,
    engine: EngineName = "onnxruntime",
    *,
    threads: int | None = None,
    batch_size: int | None = None,
    check_images: torch.Tensor | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    opset: int = 18,
) -> Engine:
    """Build an engine computing ``detector``'s raw scores and maps, checked against the Python path.

    Args:
        detector: a calibrated detector (see :class:`~invert_ad.export.ExportableDetector`); for ``torch``, any
            detector (it runs as it is, with its ``optimize`` settings).
        engine: one of :data:`ENGINES`.
        threads: intra-op threads of ``onnxruntime`` / ``openvino`` (default :func:`default_threads`).
        batch_size: at most this many images per engine call (``None``: as given).
        check_images: ``(B >= 2, 3, S, S)`` images in ``[0, 1]`` to trace and check on (default: two seeded
            noise images; real images make a stronger check).
        tolerance: largest accepted relative difference (see :data:`DEFAULT_TOLERANCE`).
        opset: the ONNX opset of the converted graph.

    Returns:
        The :class:`Engine`.

    Raises:
        ValueError: an unknown engine, bad ``threads`` / ``batch_size``, or a detector that cannot be exported.
        ImportError: the engine's package is missing (it names the extra to install).
        EngineMismatchError: the engine's outputs disagree with Python on the check images.
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    for name, value in (("threads", threads), ("batch_size", batch_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    if engine == "torch":

        def run_torch(images: np.ndarray) -> tuple[Any, Any]:
            with torch.inference_mode():
                out = detector.score(torch.from_numpy(images))
            return out.image_scores, out.scores.anomaly_maps.cpu()

        return Engine("torch", run_torch, None, batch_size)
    if detector.device.type != "cpu":
        raise ValueError(f"the {engine} engine runs on the CPU; load the detector on the CPU, not {detector.device}")
    runner = _RUNNERS[engine]
    _import("onnxscript", "export" if engine == "onnxruntime" else "openvino")  # torch.onnx's converter
    images = _example_images(detector, check_images)
    program = trace_images(_RawOutputs(detector), images)
    model = onnx_bytes(program, images, RAW_OUTPUT_NAMES, opset, _metadata(detector))
    threads = threads or default_threads()
    loaded = Engine(engine, runner(model, threads), threads, batch_size)
    loaded.check = _check(loaded, detector, images, tolerance)
    return loaded


class EngineDetector(AnomalyDetector):
    """An :class:`~invert_ad.pipeline.AnomalyDetector` whose :meth:`score` runs an :class:`Engine`.

    It shares the detector's modules, statistics and calibration; :meth:`predict` (and so
    :func:`~invert_ad.predict.predict_paths`) works as usual. The engine does not expose latents or score
    components: ``score(images).scores.latents`` is empty ``(B, 0, h, w)`` and ``components`` is ``{}``.

    Args:
        detector: the detector the engine was built from.
        engine: the engine (see :func:`load_engine`).
    """

    def __init__(self, detector: AnomalyDetector, engine: Engine) -> None:
        super().__init__(
            detector.feature_extractor,
            detector.scorer,
            feature_mean=detector.feature_mean,
            feature_std=detector.feature_std,
            calibration=detector.calibration,
        )
        self.engine = engine

    def score(self, images: torch.Tensor) -> DetectorOutput:
        """Raw image scores ``(B,)`` and maps ``(B, S, S)`` computed by the engine; higher is more anomalous."""
        out = self.engine(self._check_images(images))
        maps = upsample_maps(out.anomaly_maps, (self.image_size, self.image_size))
        latents = out.anomaly_maps.new_empty(out.anomaly_maps.shape[0], 0, *out.anomaly_maps.shape[1:])
        return DetectorOutput(out.raw_scores, maps, ScoreOutput(out.raw_scores, out.anomaly_maps, latents))

    def score_features(self, features: torch.Tensor, batch_size: int | None = None) -> DetectorOutput:
        """Not available: an engine scores images end to end (use :meth:`score` or :meth:`score_dataset`)."""
        raise TypeError(f"the {self.engine.name} engine scores images, not features: call score(images)")

    def score_dataset(
        self, dataset: ImageDataset, batch_size: int = 16, progress: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Score every readable image of ``dataset`` (unreadable ones are left out, as feature extraction does).

        Returns:
            Raw scores ``(N,)``, maps ``(N, S, S)`` and the ``N`` paths, in dataset order.
        """
        if dataset.image_size != self.image_size:
            raise ValueError(f"the dataset gives {dataset.image_size} px images, the model takes {self.image_size}")
        loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_samples)
        scores, maps, paths = [], [], []
        for batch in tqdm(loader, desc=f"scoring ({self.engine.name})", disable=not progress, unit="batch"):
            if batch["path"]:
                out = self.score(batch["image"])
                scores.append(out.image_scores)
                maps.append(out.anomaly_maps)
                paths += batch["path"]
        size = self.image_size
        if not paths:
            return torch.empty(0), torch.empty(0, size, size), []
        return torch.cat(scores), torch.cat(maps), paths
