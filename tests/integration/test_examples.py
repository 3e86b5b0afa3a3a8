"""The scripts in examples/ run as they are (small settings so CI stays fast)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "args",
    [["examples/retrofit_diad.py"], ["examples/retrofit_ddad.py", "--steps", "20", "--size", "32"]],
    ids=["diad", "ddad"],
)
def test_example_runs(args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip(), "an example should say what it did"
