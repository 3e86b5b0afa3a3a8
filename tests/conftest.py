"""Shared fixtures: real data from ../shared/data (skipped when absent) and a fixed seed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

SHARED_DATA = Path(os.environ.get("INVERT_AD_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


@pytest.fixture
def global_random_seed() -> int:
    return 0


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (or ``$INVERT_AD_DATA``): real MVTec-layout categories."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (set INVERT_AD_DATA to an MVTec-layout root)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tire_dir(shared_data: Path) -> Path:
    path = shared_data / "mvtec3d_tire"
    if not path.is_dir():
        pytest.skip(f"{path} is absent")
    return path


@pytest.fixture(scope="session")
def mtd_dir(shared_data: Path) -> Path:
    path = shared_data / "mtd_magnetic_tile"
    if not path.is_dir():
        pytest.skip(f"{path} is absent")
    return path
