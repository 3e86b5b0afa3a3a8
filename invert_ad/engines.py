"""Inference engines for a detector's exported scoring path: ONNX Runtime and OpenVINO, checked before use.

An engine is a function ``images (B, 3, S, S) in [0, 1] -> ScoreOutput(raw_score (B,), raw_map (B, h, w))``
computing what the Python path (:meth:`AnomalyDetector.score <invert_ad.detector.AnomalyDetector.score>`)
computes: raw image scores and raw maps on the feature grid (resized afterwards, to ``S x S`` or to each image's
original size, by the caller). :func:`load_engine` builds one:

* ``torch``: the detector itself (eager PyTorch, with its :meth:`~invert_ad.detector.AnomalyDetector.optimize`
  settings);
* ``onnxruntime`` / ``openvino``: the detector's scoring path traced once with ``torch.export`` (batch axis
  dynamic; :meth:`ExportableDetector.raw_outputs <invert_ad.export.ExportableDetector.raw_outputs>`), converted
  to ONNX in memory and compiled by the engine for the CPU in float32.

Every non-torch engine is checked on ``check_images`` against the Python path before it is returned: scores and
maps must agree within ``tolerance`` relative to ``max(1, max |python|)`` (:data:`DEFAULT_TOLERANCE`), otherwise
:class:`EngineMismatchError` is raised. Real images make the stronger check.

Threads: one intra-op thread per CPU this process may run on (``os.sched_getaffinity``), no inter-op
parallelism (the graph is a chain), no spinning threads between calls; set ``threads`` on a shared machine.

:class:`EngineDetector` is an :class:`~invert_ad.detector.AnomalyDetector` whose :meth:`~EngineDetector.score`
runs an engine, so :func:`~invert_ad.predict_files.predict_paths` and :func:`~invert_ad.evaluation.evaluate_detector`
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

from .calibration import domain_scores
from .data import ImageDataset, collate_samples
from .detector import AnomalyDetector
from .export import ExportableDetector, _example_images, _metadata, onnx_bytes, trace_images
from .routing import RoutedDetector
from .scoring import ScoreOutput, upsample_maps

__all__ = [
    "DEFAULT_TOLERANCE",
    "ENGINES",
    "EngineDetector",
    "EngineMismatchError",
    "default_threads",
    "load_engine",
]

ENGINES: tuple[str, ...] = ("torch", "onnxruntime", "openvino")
"""Engine names accepted by :func:`load_engine` and ``--engine``."""
DEFAULT_TOLERANCE = 1e-3
"""Largest accepted ``max |engine - python| / max(1, max |python|)`` for raw scores and for maps."""
RAW_OUTPUT_NAMES = ("raw_score", "raw_map", "domain_score")
"""The engines' graph outputs, those of :meth:`invert_ad.export.ExportableDetector.raw_outputs`."""

EngineName = Literal["torch", "onnxruntime", "openvino"]


class EngineMismatchError(RuntimeError):
    """An engine's outputs differ from the Python path's by more than the tolerance."""


@dataclass
class Engine:
    """A loaded engine: call it on images ``(B, 3, S, S)`` float32 in ``[0, 1]``.

    Attributes:
        name: one of :data:`ENGINES`.
        run: the engine's own batch function, numpy ``(B, 3, S, S)`` -> ``(raw_score (B,), raw_map (B, h, w),
            domain_score (B,))``.
        threads: intra-op threads (``None`` for torch: the process's setting).
        batch_size: at most this many images per engine call (larger inputs are split); ``None``: as given.
        check: ``max_rel_diff`` per output on the check images (empty for torch).
    """

    name: str
    run: Callable[[np.ndarray], tuple[Any, ...]]
    threads: int | None = None
    batch_size: int | None = None
    check: dict[str, float] = field(default_factory=dict)

    def __call__(self, images: torch.Tensor) -> ScoreOutput:
        """Scores of images ``(B, 3, S, S)`` in ``[0, 1]``: ``raw_score`` ``(B,)``, ``raw_map`` ``(B, h, w)`` on the
        feature grid, and the images' ``domain_score`` ``(B,)`` in ``components``."""
        chunks = images.split(self.batch_size) if self.batch_size else (images,)
        parts = []
        for chunk in chunks:
            score, raw_map, domain = self.run(chunk.detach().cpu().float().contiguous().numpy())
            parts.append(
                ScoreOutput(
                    torch.as_tensor(np.asarray(score), dtype=torch.float32),
                    torch.as_tensor(np.asarray(raw_map), dtype=torch.float32),
                    {"domain_score": torch.as_tensor(np.asarray(domain), dtype=torch.float64)},
                )
            )
        return ScoreOutput.cat(parts)


class _RawOutputs(nn.Module):
    """The traced module: :meth:`ExportableDetector.raw_outputs` as ``forward``."""

    def __init__(self, detector: AnomalyDetector) -> None:
        super().__init__()
        self.exportable = ExportableDetector(detector)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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


def _onnxruntime_run(model: bytes, threads: int) -> Callable[[np.ndarray], tuple[Any, ...]]:
    ort = _import("onnxruntime", "export")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads sleep between calls
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])

    def run(images: np.ndarray) -> tuple[Any, ...]:
        return tuple(session.run(list(RAW_OUTPUT_NAMES), {"images": images}))

    return run


def _openvino_run(model: bytes, threads: int) -> Callable[[np.ndarray], tuple[Any, ...]]:
    ov = _import("openvino", "openvino")
    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
    compiled = core.compile_model(core.read_model(model=model), "CPU", config)
    request = compiled.create_infer_request()

    def run(images: np.ndarray) -> tuple[Any, ...]:
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
        features = detector.extract(images)
        reference = detector.scorer.score(features)
    got = engine(images)
    relative = {}
    expected = (reference.raw_score, reference.raw_map, domain_scores(features))
    have_all = (got.raw_score, got.raw_map, got.components["domain_score"])
    for name, have, want in zip(RAW_OUTPUT_NAMES, have_all, expected, strict=True):
        want, have = want.detach().cpu().float(), have.float()
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
    if isinstance(detector, RoutedDetector):
        raise ValueError(
            "engines run one detector: a RoutedDetector's experts are separate models (use --engine torch, or "
            "load an expert folder <model>/experts/<name> on its own)"
        )
    for name, value in (("threads", threads), ("batch_size", batch_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    if engine == "torch":

        def run_torch(images: np.ndarray) -> tuple[Any, ...]:
            with torch.inference_mode():
                features = detector.extract(torch.from_numpy(images))
                out = detector.scorer.score(features)
            return out.raw_score.cpu(), out.raw_map.cpu(), domain_scores(features).cpu()

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
    """An :class:`~invert_ad.detector.AnomalyDetector` whose scores come from an :class:`Engine`.

    It shares the detector's modules, statistics and calibration; :meth:`predict` (and so
    :func:`~invert_ad.predict_files.predict_paths`) works as usual, the domain check included. The engine does
    not expose latents or the statistic's components: ``score(images).latent`` is ``None``.

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
        )
        if detector.is_fitted:
            self.calibration_ = detector.calibration
        self.engine = engine

    def _score_with_domain(self, images: torch.Tensor, batch_size: int) -> tuple[ScoreOutput, torch.Tensor]:
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor of shape (B, 3, H, W), got {type(images).__name__}")
        check = getattr(self.feature_extractor, "check_images", None)
        if check is not None:
            check(images)
        out = self.engine(images)
        raw_map = upsample_maps(out.raw_map, (self.image_size, self.image_size))
        return ScoreOutput(out.raw_score, raw_map), out.components["domain_score"]

    def score(self, images: torch.Tensor, batch_size: int = 32) -> ScoreOutput:
        """Raw image scores ``(B,)`` and maps ``(B, S, S)`` computed by the engine; higher is more anomalous."""
        return self._score_with_domain(images, batch_size)[0]

    def score_features(self, features: torch.Tensor, batch_size: int | None = None) -> ScoreOutput:
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
                scores.append(out.raw_score)
                maps.append(out.raw_map)
                paths += batch["path"]
        size = self.image_size
        if not paths:
            return torch.empty(0), torch.empty(0, size, size), []
        return torch.cat(scores), torch.cat(maps), paths
