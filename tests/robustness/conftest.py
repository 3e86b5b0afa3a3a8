"""Fixtures of the robustness suite: one small real detector per session and its saved folder.

The suite runs torch on one thread: on a shared two-core machine two intra-op threads oversubscribe the
cores and the backbone runs up to eight times slower. Determinism is checked at a fixed thread count.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from robust_helpers import build_small_detector

from invert_ad.detector import AnomalyDetector


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread for this folder's tests, restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def small_detector() -> AnomalyDetector:
    """Real lite0 features at 32 px, a fitted Gaussian denoiser, hybrid scores, calibrated thresholds."""
    return build_small_detector()


@pytest.fixture(scope="session")
def saved_model(small_detector, tmp_path_factory) -> Path:
    """``small_detector`` saved once; copy it (``model_copy``) before editing."""
    folder = tmp_path_factory.mktemp("saved") / "model"
    small_detector.save_pretrained(folder)
    return folder


@pytest.fixture
def model_copy(saved_model, tmp_path) -> Path:
    """A private copy of the saved model folder, free to damage."""
    target = tmp_path / "model"
    shutil.copytree(saved_model, target)
    return target
