"""Speed settings from the command line and in evaluation: the flags reach ``AnomalyDetector.optimize``.

Nothing is compiled here: ``optimize`` is replaced by a recorder where a flag asks for compiling (the numerics
of each setting are tested in ``test_acceleration.py``); the settings that run cheaply (bf16 autocast,
channels-last) run for real on real lite0 features of real tire images.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

import invert_ad.evaluation
from invert_ad.acceleration import COMPILE_MODES
from invert_ad.cli import _training_config, build_parser, main
from invert_ad.data import ImageDataset, ImageRecord
from invert_ad.detector import AnomalyDetector
from invert_ad.evaluation import evaluate_detector, time_detector
from invert_ad.predict_files import predict_paths

EAGER = {"compile_mode": None, "channels_last": False, "autocast_dtype": None, "autocast_backbone": False}


@pytest.fixture(scope="module")
def saved(make_detector, tmp_path_factory) -> Path:
    """A saved model folder."""
    folder = tmp_path_factory.mktemp("model") / "tire"
    make_detector("gaussian", "hybrid", "official").save_pretrained(folder)
    return folder


@pytest.fixture
def optimized(monkeypatch) -> list[tuple[AnomalyDetector, dict]]:
    """Replace ``AnomalyDetector.optimize`` by a recorder of ``(detector, keywords)`` that changes nothing."""
    calls = []

    def record(self, **kwargs):
        calls.append((self, kwargs))
        return self

    monkeypatch.setattr(AnomalyDetector, "optimize", record)
    return calls


@pytest.fixture
def evaluated(monkeypatch) -> list[AnomalyDetector]:
    """Replace ``evaluate_detector`` by a recorder of the detector it is given."""
    calls = []

    def evaluate(detector, data, out, **kwargs):
        calls.append(detector)
        return {"num_images": 0}

    monkeypatch.setattr(invert_ad.evaluation, "evaluate_detector", evaluate)
    return calls


@pytest.fixture(scope="module")
def test_images(tire_dir) -> list[Path]:
    """Two good and two defective tire test images."""
    return [*sorted((tire_dir / "test/good").iterdir())[:2], *sorted((tire_dir / "test/cut").iterdir())[:2]]


def evaluate_args(saved: Path, tmp_path: Path, *flags: str) -> list[str]:
    return ["evaluate", "--model", str(saved), "--data", str(tmp_path), "--out", str(tmp_path / "r.json"), *flags]


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--compile", "default"], {**EAGER, "compile_mode": "default"}),
        (["--channels-last"], {**EAGER, "channels_last": True}),
        (["--autocast", "float16"], {**EAGER, "autocast_dtype": "float16"}),
        (
            ["--compile", "reduce-overhead", "--channels-last", "--autocast", "bfloat16", "--autocast-backbone"],
            {
                "compile_mode": "reduce-overhead",
                "channels_last": True,
                "autocast_dtype": "bfloat16",
                "autocast_backbone": True,
            },
        ),
    ],
)
def test_evaluate_flags_reach_optimize(saved, optimized, evaluated, tmp_path, flags, expected) -> None:
    assert main(evaluate_args(saved, tmp_path, *flags)) == 0
    [(detector, kwargs)] = optimized
    assert kwargs == expected
    assert evaluated == [detector]  # the optimised detector is the one evaluated


def test_no_speed_flag_leaves_the_detector_alone(saved, optimized, evaluated, tmp_path) -> None:
    assert main(evaluate_args(saved, tmp_path)) == 0
    assert optimized == [] and len(evaluated) == 1


def test_predict_flags_reach_optimize(saved, optimized, test_images, tmp_path, capsys) -> None:
    out = tmp_path / "p.json"
    flags = ["--compile", "max-autotune", "--autocast", "bfloat16", "--batch-size", "8"]
    assert main(["--quiet", "predict", "--model", str(saved), str(test_images[0]), "--out", str(out), *flags]) == 0
    [(_, kwargs)] = optimized
    expected = {**EAGER, "compile_mode": "max-autotune", "autocast_dtype": "bfloat16", "compile_batch_size": 8}
    assert kwargs == expected  # the last, smaller batch is padded to --batch-size instead of compiled again
    assert json.loads(capsys.readouterr().out)["num_images"] == 1 and len(json.loads(out.read_text())) == 1


def test_predict_paths_applies_the_settings_to_a_given_detector(make_detector, test_images, tmp_path) -> None:
    detector = make_detector("gaussian", "hybrid", "official")
    eager = predict_paths(detector, test_images, tmp_path / "eager.json", progress=False)
    try:
        fast = predict_paths(
            detector,
            test_images,
            tmp_path / "fast.json",
            progress=False,
            optimize={"channels_last": True, "autocast_dtype": "bfloat16"},
        )
        assert detector.scorer.autocast_dtype is torch.bfloat16 and detector.channels_last
        assert detector.backbone_autocast_dtype is None and detector.scorer.compile_mode is None
    finally:
        detector.optimize()  # the backbone is shared by the module's detectors
    assert eager["num_images"] == fast["num_images"] == 4 and fast["num_failed"] == 0
    rows = [json.loads((tmp_path / name).read_text()) for name in ("eager.json", "fast.json")]
    raw = [torch.tensor([r["raw_score"] for r in table]) for table in rows]
    assert float((raw[1] - raw[0]).norm() / raw[0].norm()) < 0.02  # bf16 denoiser: close to fp32
    with pytest.raises(ValueError, match="compile_mode must be None or one of"):
        predict_paths(detector, test_images, tmp_path / "bad.json", progress=False, optimize={"compile_mode": "x"})


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_autocast_backbone_needs_autocast(command, optimized, evaluated, capsys) -> None:
    args = ["--model", "m", "--out", "r.json", "--autocast-backbone"]
    args += ["--data", "d"] if command == "evaluate" else ["image.png"]
    with pytest.raises(SystemExit) as exit_info:
        main([command, *args])
    assert exit_info.value.code == 2
    assert "--autocast-backbone needs --autocast" in capsys.readouterr().err
    assert optimized == [] and evaluated == []


@pytest.mark.parametrize("command", ["evaluate", "predict", "demo"])
def test_compile_takes_the_acceleration_modes(command, capsys) -> None:
    required = {
        "evaluate": ["--model", "m", "--data", "d", "--out", "r"],
        "predict": ["--model", "m", "x", "--out", "r"],
    }
    parser = build_parser()
    for mode in COMPILE_MODES:
        assert parser.parse_args([command, *required.get(command, []), "--compile", mode]).compile == mode
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args([command, *required.get(command, []), "--compile", "fast"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'fast'" in capsys.readouterr().err


def test_train_and_demo_keep_autocast_for_training(capsys) -> None:
    parser = build_parser()
    for argv in (["train", "--data", "d", "--out", "o"], ["demo"]):
        args = parser.parse_args([*argv, "--autocast", "bfloat16"])
        assert _training_config(args).autocast_dtype == "bfloat16"
    demo = parser.parse_args(["demo", "--compile", "default", "--channels-last"])
    assert (demo.compile, demo.channels_last, demo.autocast) == ("default", True, "auto")  # bf16 where native
    with pytest.raises(SystemExit):  # demo's --autocast trains; its evaluation has no autocast flags
        parser.parse_args(["demo", "--autocast-backbone"])
    assert "unrecognized arguments: --autocast-backbone" in capsys.readouterr().err


class FirstCallPerShapeIsSlow:
    """A stand-in detector whose first call at each batch size takes 0.3 s, like a compile, and later calls none."""

    def __init__(self) -> None:
        self.shapes: list[int] = []

    def score(self, images: torch.Tensor) -> None:
        if len(images) not in self.shapes:
            time.sleep(0.3)
        self.shapes.append(len(images))


def test_timing_leaves_out_first_calls() -> None:
    detector = FirstCallPerShapeIsSlow()
    timings = time_detector(detector, torch.zeros(3, 3, 8, 8), repeats=3, batch_size=5)
    assert detector.shapes == [1, 1, 1, 1, 5, 5]
    assert timings["latency_ms_batch1"] < 100
    assert timings["throughput_images_per_s"] > 5 / 0.1


def test_evaluation_records_the_settings_and_scores_with_the_backbone_dtype(make_detector, tire_dir, tmp_path):
    records = [
        ImageRecord(path=p, label=int(p.parent.name != "good"), defect_type=p.parent.name)
        for p in [*sorted((tire_dir / "test/good").iterdir())[:2], *sorted((tire_dir / "test/cut").iterdir())[:2]]
    ]
    detector = make_detector("gaussian", "hybrid", "official")
    dataset = ImageDataset(records, image_size=detector.image_size)
    cache = tmp_path / "cache"
    options = {"batch_size": 4, "timing": False, "cache_dir": cache, "progress": False}
    eager = evaluate_detector(detector, dataset, **options)
    assert eager["inference"] == {
        "compile_mode": None,
        "channels_last": False,
        "autocast_dtype": None,
        "backbone_autocast_dtype": None,
        "backbone_batch_size": "auto",
    }
    cached = sorted(cache.rglob("*"))
    detector.optimize(channels_last=True, autocast_dtype="bfloat16", autocast_backbone=True)
    try:
        low = evaluate_detector(detector, dataset, tmp_path / "report.json", **options)
    finally:
        detector.optimize()
    expected = {**eager["inference"], "channels_last": True}
    assert low["inference"] == {**expected, "autocast_dtype": "bfloat16", "backbone_autocast_dtype": "bfloat16"}
    assert json.loads((tmp_path / "report.json").read_text())["inference"] == low["inference"]
    assert sorted(cache.rglob("*")) == cached  # bf16 features are not cached as the float32 ones
    scores = [torch.tensor([r["raw_score"] for r in report["per_image"]]) for report in (eager, low)]
    assert 0 < float((scores[1] - scores[0]).norm() / scores[0].norm()) < 0.5  # the backbone ran in bf16
