"""``invert-ad export``: a saved model folder in, the right exporter called, a JSON summary out.

The exporters themselves are tested on real images in ``test_export.py``; here they are replaced by recorders.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import invert_ad.export
from invert_ad.cli import main
from invert_ad.detector import AnomalyDetector
from invert_ad.export import ExportResult


@pytest.fixture(scope="module")
def saved(make_detector, tmp_path_factory) -> tuple[Path, AnomalyDetector]:
    """A saved model folder and the detector that was saved."""
    folder = tmp_path_factory.mktemp("model") / "tire"
    detector = make_detector("gaussian", "hybrid", "official")
    detector.save_pretrained(folder)
    return folder, detector


@pytest.fixture
def calls(monkeypatch) -> list[tuple[str, AnomalyDetector, Path, dict]]:
    """Replace both exporters by recorders of ``(format, detector, path, keywords)``."""
    recorded = []

    def recorder(fmt: str):
        def export(detector, path, **kwargs):
            recorded.append((fmt, detector, Path(path), kwargs))
            return ExportResult(Path(path), fmt, {"raw_score": 0.0}, {"raw_score": 0.0}, 2)

        return export

    monkeypatch.setattr(invert_ad.export, "export_onnx", recorder("onnx"))
    monkeypatch.setattr(invert_ad.export, "export_torch", recorder("torch"))
    return recorded


@pytest.mark.parametrize(
    ("extra", "name", "fmt", "kwargs"),
    [
        ([], "detector.onnx", "onnx", {}),
        ([], "detector.pt2", "torch", {}),
        (["--format", "onnx", "--opset", "17"], "detector.pt2", "onnx", {"opset": 17}),
    ],
)
def test_cli_calls_the_exporter_of_the_format(saved, calls, tmp_path, capsys, extra, name, fmt, kwargs):
    folder, original = saved
    out = tmp_path / name
    assert main(["export", "--model", str(folder), "--out", str(out), *extra]) == 0
    [(called, detector, path, keywords)] = calls
    assert (called, path, keywords) == (fmt, out, kwargs)
    assert detector.calibration == original.calibration and detector.scorer.grid == original.scorer.grid
    printed = json.loads(capsys.readouterr().out)
    assert printed == {"out": str(out), "format": fmt, "max_rel_diff": {"raw_score": 0.0}}


def test_cli_reports_a_missing_model(calls, tmp_path, capsys):
    assert main(["export", "--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "d.onnx")]) == 2
    assert "invert-ad export: error" in capsys.readouterr().err
    assert calls == []
