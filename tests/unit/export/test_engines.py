"""Inference engines (ONNX Runtime, OpenVINO) give the Python path's raw scores and maps, or refuse to load.

Tolerance: ``max |engine - python| / max(1, max |python|)`` <= 1e-4 for scores and maps (other kernels and
summation orders; measured 1e-7 to 1e-5 on the tiny stand-ins and on real tire images at 128 px).
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

from invert_ad.engines import ENGINES, EngineDetector, EngineMismatchError, load_engine
from invert_ad.models import GaussianDenoiser
from invert_ad.predict_files import predict_paths

TOLERANCE = 1e-4
NATIVE = [e for e in ENGINES if e != "torch"]


def _require(engine: str) -> None:
    pytest.importorskip("onnxscript", reason="engines convert through ONNX: needs the export extra (onnxscript)")
    if engine == "onnxruntime":
        pytest.importorskip("onnxruntime", reason="needs the export extra (onnxruntime)")
    if engine == "openvino":
        pytest.importorskip("openvino", reason="needs the openvino extra")


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    assert got.shape == want.shape
    return ((got - want).abs().max() / want.abs().max().clamp_min(1.0)).item()


@pytest.fixture
def gaussian_stand_in(stand_in_detector):
    features = torch.randn(40, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    return stand_in_detector(GaussianDenoiser.fit(features).eval())


@pytest.mark.parametrize("engine", ENGINES)
def test_engine_gives_the_python_scores_and_grid_maps(gaussian_stand_in, engine):
    if engine != "torch":
        _require(engine)
    detector = gaussian_stand_in
    images = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    loaded = load_engine(detector, engine, threads=1, batch_size=2)
    assert loaded.name == engine and (engine == "torch" or max(loaded.check.values()) <= TOLERANCE)
    got = loaded(images)  # 5 images in chunks of 2: the batch axis is dynamic
    want = detector.scorer.score(detector.extract(images))
    assert got.raw_score.shape == (5,) and got.raw_map.shape == (5, 4, 4)
    assert _relative(got.raw_score, want.raw_score) <= TOLERANCE
    assert _relative(got.raw_map, want.raw_map) <= TOLERANCE
    domain = detector.extract(images).double().square().mean(dim=(1, 2, 3))  # the domain score by hand
    assert _relative(got.components["domain_score"], domain) <= TOLERANCE
    wrapped = EngineDetector(detector, loaded)
    out = wrapped.score(images)
    assert _relative(out.raw_map, detector.score(images).raw_map) <= TOLERANCE
    decided, reference = wrapped.predict(images, warn=False), detector.predict(images, warn=False)
    assert torch.equal(decided.pred_label, reference.pred_label)
    assert torch.equal(decided.in_domain, reference.in_domain)
    assert _relative(decided.pred_score, reference.pred_score) <= TOLERANCE
    assert _relative(decided.anomaly_map, reference.anomaly_map) <= TOLERANCE


class _Skewed(nn.Module):
    """A denoiser whose traced graph differs from its eager calls (eps doubled only while exporting)."""

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 0.1 * x * (2.0 if torch.compiler.is_exporting() else 1.0)


@pytest.mark.parametrize("engine", NATIVE)
def test_engine_that_disagrees_with_python_is_refused(stand_in_detector, engine):
    _require(engine)
    with pytest.raises(EngineMismatchError, match=f"{engine} engine disagrees"):
        load_engine(stand_in_detector(_Skewed()), engine, threads=1)


def test_bad_engine_arguments_are_named(gaussian_stand_in):
    with pytest.raises(ValueError, match="unknown engine 'tensorrt'"):
        load_engine(gaussian_stand_in, "tensorrt")
    with pytest.raises(ValueError, match="threads"):
        load_engine(gaussian_stand_in, "onnxruntime", threads=0)
    wrapped = EngineDetector(gaussian_stand_in, load_engine(gaussian_stand_in, "torch"))
    with pytest.raises(TypeError, match="scores images, not features"):
        wrapped.score_features(torch.zeros(1, 3, 4, 4))


@pytest.mark.long
@pytest.mark.slow
@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_engine_matches_python_on_real_images(make_detector, tire_images, engine):
    """The default detector's path (lite0 features, Gaussian, hybrid on the paper grid) on real tire images."""
    _require(engine)
    detector = make_detector("gaussian", "hybrid", "paper")
    loaded = load_engine(detector, engine, threads=2, check_images=tire_images["train"][:2])
    images = tire_images["test"]  # other images, another batch size
    got = loaded(images)
    want = detector.scorer.score(detector.extract(images))
    assert _relative(got.raw_score, want.raw_score) <= TOLERANCE
    assert _relative(got.raw_map, want.raw_map) <= TOLERANCE
    order = torch.argsort(want.raw_score)
    assert torch.equal(torch.argsort(got.raw_score), order)  # same ranking of the six images


def test_predict_paths_with_an_engine_keeps_rows_and_bad_files(gaussian_stand_in, tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (20 + i, 16), color=(40 * i, 90, 200)).save(folder / f"img{i}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    engine = EngineDetector(gaussian_stand_in, load_engine(gaussian_stand_in, "torch"))
    for model, name in ((gaussian_stand_in, "python.json"), (engine, "engine.json")):
        with pytest.warns(UserWarning):
            predict_paths(model, [folder], tmp_path / name, batch_size=2, progress=False)
    python_rows = json.loads((tmp_path / "python.json").read_text())
    engine_rows = json.loads((tmp_path / "engine.json").read_text())
    assert [r["path"] for r in engine_rows] == [r["path"] for r in python_rows]
    assert [r["error"] for r in engine_rows] == [r["error"] for r in python_rows] and engine_rows[0]["error"]
    for p, r in zip(python_rows, engine_rows, strict=True):
        if p["error"] is None:
            assert abs(p["raw_score"] - r["raw_score"]) <= TOLERANCE * max(1.0, abs(p["raw_score"]))


@pytest.mark.long
@pytest.mark.slow
def test_cli_predict_and_evaluate_with_onnxruntime_match_torch(make_detector, tire_dir, tmp_path, capsys):
    """``--engine onnxruntime`` writes the rows and the report ``--engine torch`` writes (a bad file included)."""
    import shutil

    from invert_ad.cli import main

    _require("onnxruntime")
    model = tmp_path / "model"
    make_detector("gaussian", "hybrid", "paper").save_pretrained(model)
    data = tmp_path / "tire"
    for split, names in (("good", ["000.png", "001.png"]), ("cut", ["000.png", "001.png"])):
        (data / "test" / split).mkdir(parents=True)
        for name in names:
            shutil.copy(tire_dir / "test" / split / name, data / "test" / split / name)
            if split != "good":
                (data / "ground_truth" / split).mkdir(parents=True, exist_ok=True)
                mask = name.replace(".png", "_mask.png")
                shutil.copy(tire_dir / "ground_truth" / split / mask, data / "ground_truth" / split / mask)
    (data / "test" / "good" / "broken.png").write_bytes(b"not a png")
    rows, reports = {}, {}
    for engine in ("torch", "onnxruntime"):
        out = tmp_path / f"{engine}.json"
        with warnings.catch_warnings():  # the broken file: its row says why, a dataset warning may also say so
            warnings.simplefilter("ignore")
            assert (
                main(
                    [
                        "--quiet",
                        "predict",
                        "--model",
                        str(model),
                        str(data / "test" / "good"),
                        str(data / "test" / "cut"),
                        "--out",
                        str(out),
                        "--engine",
                        engine,
                        "--threads",
                        "1",
                    ]
                )
                == 0
            )
        rows[engine] = json.loads(out.read_text())
        report = tmp_path / f"{engine}_report.json"
        with warnings.catch_warnings():  # the broken file: its row says why, a dataset warning may also say so
            warnings.simplefilter("ignore")
            assert (
                main(
                    [
                        "--quiet",
                        "evaluate",
                        "--model",
                        str(model),
                        "--data",
                        str(data),
                        "--out",
                        str(report),
                        "--engine",
                        engine,
                        "--heatmaps",
                        "0",
                        "--no-timing",
                        "--eval-batch-size",
                        "2",
                    ]
                )
                == 0
            )
        reports[engine] = json.loads(report.read_text())
    capsys.readouterr()
    assert [r["path"] for r in rows["onnxruntime"]] == [r["path"] for r in rows["torch"]]
    assert [r["error"] for r in rows["onnxruntime"]] == [r["error"] for r in rows["torch"]]
    for want, got in zip(rows["torch"], rows["onnxruntime"], strict=True):
        if want["error"] is None:
            assert got["pred_label"] == want["pred_label"]
            assert abs(got["raw_score"] - want["raw_score"]) <= TOLERANCE * max(1.0, abs(want["raw_score"]))
    torch_report, onnx_report = reports["torch"], reports["onnxruntime"]
    assert onnx_report["engine"]["name"] == "onnxruntime" and torch_report["engine"] == {"name": "torch"}
    assert onnx_report["num_images"] == torch_report["num_images"] == 4
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert abs(onnx_report[key] - torch_report[key]) <= 1e-3
