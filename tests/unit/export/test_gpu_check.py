"""``benchmarks/gpu_check.py --dry-run``: every stage of the prepared GPU check runs on the CPU at tiny sizes.

The GPU check is run once, when a GPU is lent for a few minutes: a typo must show here, not there.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("gpu_check", None)


def test_dry_run_runs_every_stage_and_writes_json(gpu_check, tmp_path):
    out = tmp_path / "gpu_check.json"
    result = gpu_check.main(["--dry-run", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result, default=str))
    assert list(result["stages"]) == list(gpu_check.STAGES)
    for name, stage in result["stages"].items():
        assert stage["status"] == "ok", (name, stage.get("errors"))
        assert not stage["errors"], (name, stage["errors"])
        assert all("error" not in row and "skipped" not in row for row in stage["rows"]), name
    assert sum(gpu_check.STAGES.values()) <= 330  # the hard time boxes leave room for start-up in 6 minutes
    dit_g = result["stages"]["dit-g"]
    assert [row["setting"] for row in dit_g["rows"]] == list(gpu_check.SETTINGS)
    assert all(row["images_per_s"] > 0 and row["spearman_vs_fp32"] is None for row in dit_g["rows"])  # batch 2
    assert dit_g["tflop_per_image_s3"] == 3 * 2 * dit_g["params"] * 16 / 1e12
    assert "bound_images_per_s_measured_bfloat16_tflops" in dit_g
    training = result["stages"]["training"]["rows"]
    assert training[0]["steps"] == 2 and 0.0 <= training[1]["image_auroc"] <= 1.0


def test_stage_failure_is_recorded_and_the_others_still_run(gpu_check, tmp_path, monkeypatch):
    def broken(rec, sizes, device):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(gpu_check, "stage_environment", broken)
    result = gpu_check.main(
        ["--dry-run", "--stages", "environment", "default_detector", "--out", str(tmp_path / "r.json")]
    )
    assert result["stages"]["environment"]["status"].startswith("failed: RuntimeError: CUDA out of memory")
    assert result["stages"]["default_detector"]["status"] == "ok"
    assert json.loads((tmp_path / "r.json").read_text())["stages"]["default_detector"]["rows"]


@pytest.mark.slow
def test_isolated_stage_runs_in_its_own_process(gpu_check, tmp_path):
    result = gpu_check.main(["--dry-run", "--isolate", "--stages", "environment", "--out", str(tmp_path / "r.json")])
    stage = result["stages"]["environment"]
    assert stage["status"] == "ok" and stage["rows"][0]["tflops"] > 0
