"""Exported detectors give the Python path's scores: ExportableDetector, torch.export (.pt2), ONNX + onnxruntime.

Tolerances (differences relative to ``max(1, max |python|)`` of each output, on real tire images):

- ``ExportableDetector`` in eager mode vs ``AnomalyDetector.score``: bit-for-bit (same functions, same order);
- ``torch.export`` program vs Python: <= 1e-5 (same kernels, but eager Gaussian calls reuse the cached per-timestep
  matrix ``M_t`` while a traced graph rotates by the eigenvectors twice; measured 3e-6);
- ONNX run by onnxruntime vs Python: <= 1e-4 (other kernels and summation orders; measured 1e-6 to 5e-5).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from invert_ad.calibration import Calibration
from invert_ad.detector import AnomalyDetector
from invert_ad.export import (
    OUTPUT_NAMES,
    ExportableDetector,
    ExportMismatchError,
    export_onnx,
    export_program,
    export_torch,
    load_torch,
)
from invert_ad.scorer import InversionScorer
from invert_ad.scoring import HybridScorer

TORCH_TOLERANCE = 1e-5
ONNX_TOLERANCE = 1e-4


def relative_error(got, want: torch.Tensor) -> float:
    """``max |got - want| / max(1, max |want|)``."""
    got = torch.as_tensor(np.asarray(got), dtype=torch.float32)
    assert got.shape == want.shape
    return ((got - want).abs().max() / want.abs().max().clamp_min(1.0)).item()


def python_outputs(detector: AnomalyDetector, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The Python path's three outputs, the normalisation written out from the calibration's fields."""
    out = detector.score(images)
    c = detector.calibration
    spread = c.image_threshold - c.image_median
    normalized = 1 / (1 + torch.exp(-math.log(3) * (out.raw_score.double() - c.image_threshold) / spread))
    return out.raw_score, normalized.float(), out.raw_map


@pytest.mark.parametrize(
    ("denoiser", "scoring", "timesteps"),
    [
        ("gaussian", "hybrid", "paper"),
        ("gaussian", "nll", "official"),
        ("gaussian-residual-conv", "maxmin", "quad:5"),
        ("gaussian-residual-dit", "irf", "paper"),
    ],
)
def test_exportable_detector_is_the_python_path(make_detector, tire_images, denoiser, scoring, timesteps):
    detector = make_detector(denoiser, scoring, timesteps)
    images = tire_images["test"][2:5]  # a good image and two defective ones
    with torch.no_grad():
        got = ExportableDetector(detector)(images)
    want = python_outputs(detector, images)
    assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=1e-6)
    assert got[2].shape == (len(images), 128, 128)
    c = detector.calibration  # pred_score by hand from the raw score
    by_hand = 1 / (
        1 + torch.exp(-math.log(3) * (got[0].double() - c.image_threshold) / (c.image_threshold - c.image_median))
    )
    torch.testing.assert_close(got[1].double(), by_hand, rtol=1e-6, atol=1e-7)


@pytest.fixture(scope="module")
def residual_dit_detector(make_detector) -> AnomalyDetector:
    """Gaussian (einsum over eigenvectors) plus a random DiT residual (scaled_dot_product_attention), hybrid."""
    return make_detector("gaussian-residual-dit", "hybrid", "paper")


@pytest.mark.long
@pytest.mark.slow
def test_torch_export_matches_python_on_real_images(residual_dit_detector, tire_images, tmp_path):
    detector = residual_dit_detector
    result = export_torch(detector, tmp_path / "detector.pt2", check_images=tire_images["test"])
    assert result.format == "torch" and result.path.is_file() and result.check_batch == 6
    assert max(result.max_rel_diff.values()) <= TORCH_TOLERANCE
    images = tire_images["train"][:1]  # other images, another batch size than the traced one
    with torch.no_grad():
        got = load_torch(result.path)(images)
    for output, want in zip(got, python_outputs(detector, images), strict=True):
        assert relative_error(output, want) <= TORCH_TOLERANCE


@pytest.mark.long
@pytest.mark.slow
def test_onnx_matches_python_on_real_images(residual_dit_detector, tire_images, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime", reason="ONNX export needs the export extra (onnxruntime)")
    pytest.importorskip("onnxscript", reason="ONNX export needs the export extra (onnxscript)")
    detector = residual_dit_detector
    result = export_onnx(detector, tmp_path / "detector.onnx", check_images=tire_images["train"][:2])
    assert result.format == "onnx" and max(result.max_rel_diff.values()) <= ONNX_TOLERANCE
    session = onnxruntime.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == list(OUTPUT_NAMES)
    assert session.get_inputs()[0].name == "images" and session.get_inputs()[0].shape == ["batch", 3, 128, 128]
    for images in (tire_images["test"][:1], tire_images["test"]):
        got, want = session.run(None, {"images": images.numpy()}), python_outputs(detector, images)
        for name, output, reference in zip(OUTPUT_NAMES, got, want, strict=True):
            assert relative_error(output, reference) <= ONNX_TOLERANCE, name
    metadata = session.get_modelmeta().custom_metadata_map
    assert metadata["image_size"] == "128" and metadata["nfe"] == "3"
    calibration = json.loads(metadata["calibration"])
    assert Calibration.from_dict(calibration) == detector.calibration
    threshold, median = calibration["pixel_threshold"], calibration["pixel_median"]  # as docs/export.md does
    pixel_maps = 1 / (1 + np.exp(-np.log(3) * (got[2] - threshold) / (threshold - median)))
    assert relative_error(pixel_maps, detector.calibration.normalize_maps(want[2])) <= ONNX_TOLERANCE


def test_export_refuses_what_it_cannot_reproduce(make_detector):
    detector = make_detector("gaussian", "hybrid", "paper")
    denoiser, scheduler = detector.scorer.denoiser, detector.scorer.scheduler
    extractor = detector.feature_extractor

    def with_scorer(**kwargs) -> AnomalyDetector:
        scorer = InversionScorer(denoiser, scheduler, **kwargs)
        fitted = AnomalyDetector(extractor, scorer)
        fitted.calibration_ = detector.calibration
        return fitted

    cases = {
        "calibrated": AnomalyDetector(extractor, detector.scorer),
        "reconstruction": with_scorer(scoring="reconstruction"),
        "test-minmax": with_scorer(scoring=HybridScorer(normalization="test-minmax")),
        "autocast": with_scorer(scoring="nll", autocast_dtype=torch.bfloat16),
        "fit": with_scorer(scoring="hybrid"),
    }
    for message, case in cases.items():
        with pytest.raises(ValueError, match=message):
            ExportableDetector(case)


class ExportSensitiveDenoiser(nn.Module):
    """Predicts ``0.1 x`` in Python but ``0.2 x`` in an exported graph: an export that disagrees with Python."""

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x * (0.2 if torch.compiler.is_exporting() else 0.1)


def test_a_disagreeing_export_is_never_written(stand_in_detector, tmp_path):
    detector = stand_in_detector(ExportSensitiveDenoiser())
    target = tmp_path / "detector.pt2"
    target.write_bytes(b"the previous export")
    with pytest.raises(ExportMismatchError, match="disagrees with Python"):
        export_torch(detector, target)
    assert target.read_bytes() == b"the previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["detector.pt2"]


class ValueCheckingDenoiser(nn.Module):
    """Validates its input by value in Python, which no exported graph can hold."""

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if (x.abs() > 1e6).any():
            raise ValueError("features out of range")
        return 0.1 * x


def test_value_dependent_checks_are_reported_with_the_fix(stand_in_detector):
    detector = stand_in_detector(ValueCheckingDenoiser())
    with pytest.raises(ValueError, match=r"test_export\.py:\d+ \(forward\) branches on tensor values") as raised:
        export_program(detector)
    assert "torch.compiler.is_exporting()" in str(raised.value)


def test_the_exported_gaussian_inversion_is_one_matrix_product(make_detector):
    """However many calls the grid makes, the graph holds the Gaussian's inversion map: one bmm per position,
    no rotation by the eigenvectors (which the traced eps would do twice per call)."""
    detector = make_detector("gaussian", "hybrid", "exp:4")
    program = export_program(detector)
    nodes = [node for module in program.graph_module.modules() for node in module.graph.nodes]  # autocast regions
    assert sum(node.target == torch.ops.aten.bmm.default for node in nodes) == 1


def test_a_one_step_irf_detector_exports(make_detector, tire_images):
    """The IRF path reads its alpha-bar as a Python float while tracing (indexing a tensor there is data-dependent)."""
    detector = make_detector("gaussian", "irf", "paper")
    images = tire_images["test"][:3]
    got = export_program(detector).module()(images)
    want = python_outputs(detector, images)
    for have, expected in zip(got, want, strict=True):
        assert relative_error(have.detach(), expected) <= 1e-5
