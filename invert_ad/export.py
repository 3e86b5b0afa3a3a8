"""Export a detector's whole scoring path as one graph: ONNX and ``torch.export`` (``.pt2``).

:class:`ExportableDetector` is an ``nn.Module`` built from an :class:`~invert_ad.detector.AnomalyDetector`:
images ``(B, 3, S, S)`` in ``[0, 1]`` go in; ``raw_score``, ``pred_score`` and ``raw_map`` at ``S x S`` come out
(the names of :class:`~invert_ad.DetectorOutput`). Its forward calls the library's own functions, nothing
re-implemented: the extractor's forward,
:meth:`AnomalyDetector.standardize <invert_ad.detector.AnomalyDetector.standardize>`,
:func:`~invert_ad.inversion.ddim_integrate` over the grid's alpha-bars (the Gaussian denoiser's
``closed_form_inversion``, where the scorer uses it; or :func:`~invert_ad.inversion.one_step_irf`), the
statistic's own ``score``, :func:`~invert_ad.scoring.upsample_maps`
and :meth:`Calibration.normalize_scores <invert_ad.calibration.Calibration.normalize_scores>`.
Tracing unrolls the loop into a fixed sequence of network calls with constant coefficients; fitted state (the
feature statistics, the Gaussian's inversion map, the hybrid normalisation's location and scale, the thresholds)
becomes constants of the graph.

Both exporters trace once with ``torch.export`` (batch axis dynamic), serialise the graph, run the serialised
bytes (with onnxruntime, or ``torch.export.load``) and the Python path (:meth:`AnomalyDetector.score`) on the
same check images, and write the bytes (atomically) only if every output agrees within ``tolerance`` (relative
to the output's largest magnitude); otherwise they raise :class:`ExportMismatchError` and leave the target
untouched. An artifact that disagrees with Python is never written.

ONNX needs the ``export`` extra: ``onnx``, ``onnxscript`` (the converter) and ``onnxruntime`` (the check).
"""

from __future__ import annotations

import io
import json
import os
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

from ._version import __version__
from .calibration import domain_scores
from .detector import AnomalyDetector
from .io import atomic_write_bytes
from .routing import RoutedDetector
from .scoring import upsample_maps

__all__ = [
    "DEFAULT_OPSET",
    "DEFAULT_TOLERANCE",
    "OUTPUT_NAMES",
    "ExportMismatchError",
    "ExportResult",
    "ExportableDetector",
    "export_onnx",
    "export_program",
    "export_torch",
    "load_torch",
    "onnx_bytes",
    "trace_images",
]

INPUT_NAME = "images"
OUTPUT_NAMES = ("raw_score", "pred_score", "raw_map")
"""Names of the exported graph's outputs, in the order :meth:`ExportableDetector.forward` returns them."""
DEFAULT_OPSET = 18
DEFAULT_TOLERANCE = 1e-3
"""Largest accepted ``max |exported - python| / max(1, max |python|)`` per output when an export is checked."""
_EXPORTABLE_LATENTS = ("inversion", "irf")
_CHECK_SEED = 0


class ExportMismatchError(RuntimeError):
    """An exported artifact's outputs differ from the Python path's by more than the tolerance."""


@dataclass(frozen=True)
class ExportResult:
    """A written, checked export.

    Attributes:
        path: the file.
        format: ``onnx`` or ``torch``.
        max_abs_diff: per output name, ``max |exported - python|`` on the check images.
        max_rel_diff: per output name, that difference divided by ``max(1, max |python|)``.
        check_batch: number of images the check ran on.
    """

    path: Path
    format: str
    max_abs_diff: dict[str, float]
    max_rel_diff: dict[str, float]
    check_batch: int


def _check_exportable(detector: AnomalyDetector) -> None:
    """Refuse detectors whose scores an exported graph could not reproduce, saying why."""
    if isinstance(detector, RoutedDetector):
        raise ValueError(
            "a routed detector is one model per product: export each expert on its own (<model>/experts/<name>)"
        )
    scorer = detector.scorer
    if not detector.is_fitted:
        raise ValueError("export needs a calibrated detector (its thresholds normalise the scores): call fit first")
    statistic = scorer.statistic
    if statistic.latent not in _EXPORTABLE_LATENTS:
        raise ValueError(
            f"scorers reading the {statistic.latent!r} latent are not exported (the reconstruction baseline draws "
            f"fixed noise per batch position); export a scorer reading one of {_EXPORTABLE_LATENTS}"
        )
    if getattr(statistic, "normalization", None) == "test-minmax":
        raise ValueError(
            "the transductive 'test-minmax' hybrid normalises over the scored batch itself: it reproduces tables, "
            "it cannot be deployed; export a hybrid fitted on normal images ('standardize' or 'minmax')"
        )
    if scorer.autocast_dtype is not None:
        raise ValueError(
            f"the scorer runs its denoiser under autocast ({scorer.autocast_dtype}); exports are traced in the "
            "model's own dtype: load the detector without autocast_dtype to export it"
        )


class ExportableDetector(nn.Module):
    """The whole scoring path of an :class:`~invert_ad.detector.AnomalyDetector` as one traceable module.

    It shares the detector's modules (no copy) and reads its fitted state when traced. Unlike
    :meth:`AnomalyDetector.score`, :meth:`forward` checks shapes only (never values), so that it traces.

    Args:
        detector: a calibrated detector whose scorer reads the inverted (``nll``, ``maxmin``, ``hybrid``,
            ``max``, ...) or the one-step IRF latent, without autocast.

    Raises:
        ValueError: no calibration, the reconstruction baseline, the transductive ``test-minmax`` hybrid, or an
            autocast scorer.
        NotFittedError: the scorer needs ``fit`` first.

    Example:
        >>> module = ExportableDetector(detector)                          # doctest: +SKIP
        >>> raw_score, pred_score, raw_map = module(images)   # (B,), (B,), (B, S, S) # doctest: +SKIP
    """

    def __init__(self, detector: AnomalyDetector) -> None:
        super().__init__()
        _check_exportable(detector)
        scorer = detector.scorer
        self.detector = detector
        self.feature_extractor = detector.feature_extractor
        self.denoiser = scorer.denoiser
        self.image_size = detector.image_size

    def latents(self, features: torch.Tensor) -> torch.Tensor:
        """The latent the scorer reads, as :meth:`InversionScorer.latents` computes it, without its value checks.

        Args:
            features: standardised features ``(B, C, h, w)``.

        Returns:
            The contiguous latent ``(B, C, h, w)`` (``InversionScorer.latents`` concatenates its chunks, and the
            scores' channel reductions depend on the memory layout in the last bit).
        """
        return self.detector.scorer.compute_latent(features)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Score a batch of images.

        Args:
            images: ``(B, 3, S, S)`` float32 in ``[0, 1]``, ``S = image_size``.

        Returns:
            ``raw_score`` ``(B,)``, ``pred_score`` ``(B,)`` float32 in ``(0, 1)`` with the threshold at 0.5, and
            ``raw_map`` ``(B, S, S)`` upsampled bilinearly, as in :class:`~invert_ad.DetectorOutput`; higher is more
            anomalous in all three.
        """
        raw, grid_maps, _ = self.raw_outputs(images)
        maps = upsample_maps(grid_maps, (self.image_size, self.image_size))
        return raw, self.detector.calibration.normalize_scores(raw).float(), maps

    def raw_outputs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``raw_score`` ``(B,)``, ``raw_map`` on the feature grid ``(B, h, w)`` and the images'
        :func:`~invert_ad.calibration.domain_scores` ``(B,)``, all float32.

        What :meth:`forward` computes before upsampling and calibration (the engines of
        :mod:`invert_ad.engines` export this, so that maps can be resized to each image's original size once).
        """
        detector = self.detector
        features = detector.standardize(self.feature_extractor(images))
        result = detector.scorer.statistic.score(self.latents(features))
        grid_map = detector.scorer.final_maps(features, result.raw_map)
        return result.raw_score.float(), grid_map.float(), domain_scores(features).float()

    def extra_repr(self) -> str:
        scorer = self.detector.scorer
        return f"image_size={self.image_size}, statistic={scorer.statistic!r}, nfe={scorer.nfe}"


def _example_images(detector: AnomalyDetector, images: torch.Tensor | None) -> torch.Tensor:
    """The given images on the detector's device, or two seeded uniform-noise images (valid inputs)."""
    size = detector.image_size
    if images is None:
        generator = torch.Generator().manual_seed(_CHECK_SEED)
        images = torch.rand(2, 3, size, size, generator=generator)
    if images.dim() != 4 or tuple(images.shape[1:]) != (3, size, size) or images.shape[0] < 2:
        raise ValueError(f"check images must have shape (B >= 2, 3, {size}, {size}), got {tuple(images.shape)}")
    return images.to(detector.device, torch.float32)


def export_program(detector: AnomalyDetector, images: torch.Tensor | None = None) -> torch.export.ExportedProgram:
    """Trace a detector's scoring path with ``torch.export``, the batch axis dynamic.

    Args:
        detector: a calibrated detector (see :class:`ExportableDetector`).
        images: example images ``(B >= 2, 3, S, S)`` in ``[0, 1]`` (default: two seeded noise images); their
            values do not shape the graph.

    Returns:
        The exported program; ``program.module()(images)`` returns the three outputs of
        :meth:`ExportableDetector.forward`.

    Raises:
        ValueError: the detector cannot be exported, or a module on the path branches on tensor values.
    """
    return trace_images(ExportableDetector(detector), _example_images(detector, images))


def trace_images(module: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """``torch.export`` of a module taking images ``(B, 3, S, S)``, the batch axis dynamic.

    The module runs once eagerly on ``example`` first, so that what it builds lazily from its weights (such as
    the Gaussian denoiser's inversion map) exists before tracing and enters the graph as a constant.

    Raises:
        ValueError: a module on the path branches on tensor values (named with its file and line).
    """
    with torch.no_grad():
        module(example)
    batch = torch.export.Dim("batch", min=1)
    try:
        return torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
    except GuardOnDataDependentSymNode as err:
        raise ValueError(
            f"{_traced_line(err)} branches on tensor values (an input check such as `if (t < 0).any()`), which an "
            "exported graph cannot hold: skip such checks while tracing with "
            f"`if not torch.compiler.is_exporting(): ...`. torch.export said: {str(err).splitlines()[0]}"
        ) from err


def _traced_line(err: BaseException) -> str:
    """``file:line (function)`` of the innermost frame outside torch where ``err`` arose (the model's code)."""
    torch_dir = os.path.dirname(torch.__file__)
    frames = [f for f in traceback.extract_tb(err.__traceback__) if not f.filename.startswith(torch_dir)]
    return f"{frames[-1].filename}:{frames[-1].lineno} ({frames[-1].name})" if frames else "a module"


def _compare(
    detector: AnomalyDetector, images: torch.Tensor, outputs: list[Any], fmt: str, tolerance: float
) -> tuple[dict[str, float], dict[str, float]]:
    """Max differences of an artifact's outputs from the Python path's, per output name (absolute, relative).

    Raises:
        ExportMismatchError: a shape differs, or a relative difference exceeds ``tolerance``.
    """
    reference = detector.score(images)
    expected = (
        reference.raw_score,
        detector.calibration.normalize_scores(reference.raw_score).float(),
        reference.raw_map,
    )
    absolute, relative = {}, {}
    for name, got, want in zip(OUTPUT_NAMES, outputs, expected, strict=True):
        got = torch.as_tensor(got).detach().cpu().float()
        if got.shape != want.shape:
            raise ExportMismatchError(f"exported {name} has shape {tuple(got.shape)}, Python {tuple(want.shape)}")
        absolute[name] = (got - want).abs().max().item()
        relative[name] = absolute[name] / max(1.0, want.abs().max().item())
        if not relative[name] <= tolerance:
            raise ExportMismatchError(
                f"the exported {fmt} model disagrees with Python: {name} differs by {absolute[name]:.3g} "
                f"(relative {relative[name]:.3g} > tolerance {tolerance:g}); nothing was written"
            )
    return absolute, relative


def _write_checked(
    path: str | os.PathLike,
    fmt: str,
    data: bytes,
    outputs: list[Any],
    detector: AnomalyDetector,
    images: torch.Tensor,
    tolerance: float,
) -> ExportResult:
    """Compare what the serialised ``data`` computed with Python; only then write ``data`` to ``path`` atomically."""
    absolute, relative = _compare(detector, images, outputs, fmt, tolerance)
    written = atomic_write_bytes(path, data)
    return ExportResult(written, fmt, absolute, relative, int(images.shape[0]))


def export_torch(
    detector: AnomalyDetector,
    path: str | os.PathLike,
    *,
    check_images: torch.Tensor | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
) -> ExportResult:
    """Write the scoring path as a ``torch.export`` program (``.pt2``) and check it against Python.

    Load it with :func:`load_torch` (or ``torch.export.load(path).module()``); it needs ``torch`` only.

    Args:
        detector: a calibrated detector (see :class:`ExportableDetector`).
        path: the file to write (``.pt2`` by convention), replaced atomically.
        check_images: ``(B >= 2, 3, S, S)`` images in ``[0, 1]`` to trace and check on (default: two seeded
            noise images; real images make a stronger check).
        tolerance: largest accepted relative difference (see :data:`DEFAULT_TOLERANCE`).

    Returns:
        An :class:`ExportResult` with the measured differences.

    Raises:
        ValueError: the detector cannot be exported.
        ExportMismatchError: the written program disagrees with Python (``path`` is left as it was).
    """
    images = _example_images(detector, check_images)
    buffer = io.BytesIO()
    torch.export.save(export_program(detector, images), buffer)
    data = buffer.getvalue()
    with torch.no_grad():
        outputs = list(load_torch(io.BytesIO(data))(images))
    return _write_checked(path, "torch", data, outputs, detector, images, tolerance)


def load_torch(path: str | os.PathLike | io.BytesIO) -> nn.Module:
    """A module from a file written by :func:`export_torch`: ``module(images) -> (raw_score, pred_score, raw_map)``."""
    return torch.export.load(path if isinstance(path, io.BytesIO) else os.fspath(path)).module()


def _metadata(detector: AnomalyDetector) -> dict[str, str]:
    """What a deployment needs beside the graph: names, image size, thresholds (for normalising maps)."""
    scorer = detector.scorer
    return {
        "invert_ad_version": __version__,
        "image_size": str(detector.image_size),
        "input": f"{INPUT_NAME}: (batch, 3, {detector.image_size}, {detector.image_size}) float32 RGB in [0, 1]",
        "outputs": ", ".join(OUTPUT_NAMES),
        "calibration": json.dumps(detector.calibration.to_dict(), sort_keys=True),
        "scorer": repr(scorer.statistic),
        "grid": json.dumps(scorer.grid.to_dict()),
        "nfe": str(scorer.nfe),
        "feature_extractor": json.dumps(detector.feature_extractor.get_config(), sort_keys=True),
    }


def _onnx_runtime() -> Any:
    """The ``onnxruntime`` module, after checking that the converter's ``onnxscript`` is there too."""
    try:
        import onnxruntime
        import onnxscript  # noqa: F401  (torch.onnx's converter imports it)
    except ImportError as err:
        raise ImportError(
            "ONNX export needs onnx, onnxscript and onnxruntime (to check the file): pip install 'invert_ad[export]'"
        ) from err
    return onnxruntime


def onnx_bytes(
    program: torch.export.ExportedProgram,
    example: torch.Tensor,
    output_names: tuple[str, ...],
    opset: int = DEFAULT_OPSET,
    metadata: dict[str, str] | None = None,
) -> bytes:
    """Convert a traced image program (see :func:`trace_images`) to a serialised ONNX model.

    Args:
        program: the traced program.
        example: the images it was traced on.
        output_names: names of the program's outputs, in order.
        opset: the ONNX opset.
        metadata: string properties stored in the model.

    Returns:
        The model's bytes: input ``images`` with the batch axis named ``batch``.
    """
    onnx_program = torch.onnx.export(
        program,
        (example,),
        input_names=[INPUT_NAME],
        output_names=list(output_names),
        opset_version=opset,
        dynamo=True,
        verbose=False,
    )
    onnx_program.rename_axes({onnx_program.model.graph.inputs[0].shape[0]: "batch"})
    onnx_program.model.metadata_props.update(metadata or {})
    return onnx_program.model_proto.SerializeToString()


def export_onnx(
    detector: AnomalyDetector,
    path: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    check_images: torch.Tensor | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
) -> ExportResult:
    """Write the scoring path as one ONNX model and check it with onnxruntime against Python.

    The graph has input ``images`` ``(batch, 3, S, S)`` float32 in ``[0, 1]`` and outputs
    :data:`OUTPUT_NAMES`; the batch axis is dynamic. The model's metadata holds the calibration (the pixel
    threshold and median normalise ``raw_map`` as :meth:`Calibration.normalize_maps
    <invert_ad.calibration.Calibration.normalize_maps>` does), the image size, the scorer and the grid.
    Models above protobuf's 2 GB limit (DiT-gigant) do not fit one file: use :func:`export_torch`.

    Args:
        detector: a calibrated detector (see :class:`ExportableDetector`).
        path: the ``.onnx`` file to write, replaced atomically.
        opset: the ONNX opset.
        check_images: ``(B >= 2, 3, S, S)`` images in ``[0, 1]`` to trace and check on (default: two seeded
            noise images; real images make a stronger check).
        tolerance: largest accepted relative difference (see :data:`DEFAULT_TOLERANCE`).

    Returns:
        An :class:`ExportResult` with the measured differences.

    Raises:
        ImportError: ``onnxscript`` (to convert) or ``onnxruntime`` (to check) is missing.
        ValueError: the detector cannot be exported.
        ExportMismatchError: onnxruntime's outputs disagree with Python (``path`` is left as it was).
    """
    onnxruntime = _onnx_runtime()
    images = _example_images(detector, check_images)
    data = onnx_bytes(export_program(detector, images), images, OUTPUT_NAMES, opset, _metadata(detector))
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    outputs = session.run(list(OUTPUT_NAMES), {INPUT_NAME: images.cpu().numpy()})
    return _write_checked(path, "onnx", data, outputs, detector, images, tolerance)
