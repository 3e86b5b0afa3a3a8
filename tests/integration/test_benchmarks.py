"""The benchmark scripts run end to end on real tire images (tiny settings), and their arithmetic is right.

Full runs take minutes to hours (their results are committed in benchmarks/results); here each script runs its
whole path once, in process, with the Gaussian-diagonal denoiser (fitted in a second) and a shared feature cache.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import speed  # noqa: E402
import steps  # noqa: E402


@pytest.fixture(autouse=True)
def keep_thread_count():
    threads = torch.get_num_threads()  # the scripts' --threads sets it for the whole process
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bench_dirs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("bench")
    return {"cache": base / "cache", "runs": base / "runs", "out": base / "out"}


def test_flop_bound_by_hand() -> None:
    model = torch.nn.Linear(10, 10)  # 110 parameters
    measured = [
        {"config": "x", "part": "end to end, hybrid S=3", "images_per_s": 2.0},
        {"config": "x", "part": "end to end, IRF", "images_per_s": 9.0},  # one call: not the S = 3 path
        {"config": "x", "setting": "compile default", "images_per_s": 3.0},
        {"config": "y", "setting": "compile default", "images_per_s": 50.0},
    ]
    row = speed.flop_bound("x", model, tokens=256, peak_tflops=1.0, measured=measured)
    flop = 3 * 2 * 110 * 256  # S = 3 calls of 2 x params x tokens
    assert row["tflop_per_image_s3"] == pytest.approx(flop / 1e12)
    assert row["bound_images_per_s"] == pytest.approx(1e12 / flop)
    assert row["best_images_per_s"] == 3.0
    assert row["fraction_of_bound"] == pytest.approx(3.0 * flop / 1e12)


@pytest.mark.long
def test_speed_script_runs(tire_dir, bench_dirs) -> None:
    out = bench_dirs["out"] / "speed.json"
    speed.main(
        [
            *("--category", str(tire_dir), "--configs", "gaussian-diag", "--rounds-batch1", "1"),
            *("--rounds-batch32", "1", "--no-memory", "--settings", "fp32 eager", "channels-last backbone"),
            *("--threads", "2", "--cache-dir", str(bench_dirs["cache"]), "--out", str(out)),
        ]
    )
    result = json.loads(out.read_text())
    parts = {(r["batch"], r["part"]): r for r in result["timings"]}
    assert {b for b, _ in parts} == {1, 32} and len(parts) == 14
    assert parts[(32, "inversion S=3")]["nfe"] == 3 and parts[(32, "reconstruction NFE 50")]["nfe"] == 50
    assert all(r["images_per_s"] > 0 for r in result["timings"])
    assert parts[(32, "end to end, hybrid S=3")]["overhead_ratio"] > 0
    settings = {r["setting"]: r for r in result["settings_runs"]}
    assert settings["fp32 eager"]["score_rel_error"] == 0.0
    assert settings["channels-last backbone"]["score_spearman"] > 0.999
    assert "## Batch 32" in out.with_suffix(".md").read_text()


@pytest.mark.long
def test_steps_script_runs(tire_dir, bench_dirs) -> None:
    out = bench_dirs["out"] / "steps.json"
    steps.main(
        [
            *("--data", str(tire_dir), "--config", "gaussian-diag", "--steps-list", "1", "3", "20"),
            *("--full-max", "3", "--subset", "12", "--subset-holdout", "6", "--spacings", "uniform", "exp"),
            *("--spacing-steps", "3", "--threads", "2", "--cache-dir", str(bench_dirs["cache"])),
            *("--runs-dir", str(bench_dirs["runs"]), "--out", str(out)),
        ]
    )
    entry = json.loads(out.read_text())["categories"]["mvtec3d_tire"]
    full = {(r["nfe"], r["scoring"]): r for r in entry["steps_full"]}
    assert set(full) == {(s, k) for s in (1, 3) for k in ("nll", "maxmin", "hybrid", "max")}  # 20 > --full-max
    subset = {r["nfe"] for r in entry["steps_subset"]}
    assert subset == {1, 3, 20}
    assert entry["subset_info"]["subset_of_test"] == 12
    assert {r["label"] for r in entry["spacings"]} == {"uniform, S=3", "exp, S=3"}
    assert all(0.0 <= r["image_auroc"] <= 1.0 for r in entry["steps_full"])
    # one latent per grid: the per-pixel maps of every scorer rank pixels alike, so AU-PRO is shared
    assert len({round(full[(3, k)]["aupro"], 12) for k in ("nll", "maxmin", "hybrid", "max")}) == 1
