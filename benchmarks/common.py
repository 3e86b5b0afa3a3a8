"""Shared helpers of the benchmark scripts: run metadata, result writers, per-category features, configs.

Every benchmark writes one JSON file (settings, figures, :func:`run_info`) and a Markdown file beside it, both
atomically (:mod:`invert_ad.io`), after every finished unit of work, so a stopped run keeps what it measured.
Features come from :class:`invert_ad.data.FeatureCache`: each image's lite0 features are computed once for all
benchmarks sharing a ``--cache-dir``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from invert_ad.data import FeatureCache, MVTecDataset, cached_features, load_mask
from invert_ad.defaults import DEFAULT_BACKBONE
from invert_ad.detector import channel_statistics, upsample_maps
from invert_ad.features import create_feature_extractor
from invert_ad.io import atomic_write_json, atomic_write_text
from invert_ad.metrics import METRIC_NAMES, evaluate_metrics
from invert_ad.training.train import holdout_split

__all__ = [
    "DEFAULT_CACHE_DIR",
    "DEFAULT_DATA",
    "DEFAULT_RUNS_DIR",
    "DENOISER_CONFIGS",
    "REPO_ROOT",
    "RESULTS_DIR",
    "CategoryFeatures",
    "DenoiserConfig",
    "Timer",
    "add_threads_argument",
    "default_data_dirs",
    "evaluate_maps",
    "fmt",
    "load_category",
    "load_json_file",
    "load_results",
    "markdown_table",
    "median_seconds",
    "parse_args",
    "peak_rss_mb",
    "run_info",
    "write_results",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data"
DEFAULT_CACHE_DIR = Path(os.environ.get("INVERT_AD_BENCH_CACHE", "/tmp/invert_ad_cache"))
DEFAULT_RUNS_DIR = Path(os.environ.get("INVERT_AD_BENCH_RUNS", "/tmp/invert_ad_bench_runs"))


# ----------------------------------------------------------------------------------------------- run metadata
def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_info(device: str = "cpu") -> dict[str, Any]:
    """Who ran what where: machine, device, library versions, git commit, load average, command line.

    Args:
        device: the torch device the benchmark ran on.

    Returns:
        A JSON-serialisable dict.
    """
    status = _git("status", "--porcelain")
    info: dict[str, Any] = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "machine": {
            "platform": platform.platform(),
            "cpu": _cpu_model(),
            "logical_cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "load_average_1_5_15": list(os.getloadavg()),
        },
        "device": device,
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else _cpu_model(),
        "dtype": "float32",
        "versions": {
            "python": platform.python_version(),
            **{p: _version(p) for p in ("invert_ad", "torch", "diffusers", "timm", "numpy", "scikit-learn")},
        },
    }
    return info


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports kibibytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Timer:
    """Wall-clock context manager: ``with Timer() as t: ...; t.seconds``."""

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


# ----------------------------------------------------------------------------------------------- writers
def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: floats rounded, ``None`` and NaN as an em dash, everything else ``str``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[str], headers: dict[str, str] | None = None
) -> str:
    """A GitHub Markdown table of ``rows`` (dicts) restricted to ``columns``.

    Args:
        rows: one dict per row.
        columns: keys to show, in order.
        headers: display names by key (default: :data:`invert_ad.metrics.METRIC_NAMES`, else the key).

    Returns:
        The table, ending with a newline.
    """
    names = {**METRIC_NAMES, **(headers or {})}
    lines = [
        "| " + " | ".join(names.get(c, c) for c in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _clean(value: Any) -> Any:
    """Replace NaN and infinities (not valid JSON) by ``None``, recursively; numpy scalars to Python."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_results(json_path: str | os.PathLike, data: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """Write ``data`` as JSON and ``markdown`` beside it (same stem, ``.md``), both atomically.

    Returns:
        The two paths.
    """
    json_path = Path(json_path)
    md_path = json_path.with_suffix(".md")
    atomic_write_json(json_path, _clean(data))
    atomic_write_text(md_path, markdown)
    return json_path, md_path


def load_json_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a JSON file written by :func:`write_results` or :func:`invert_ad.io.atomic_write_json`."""
    return json.loads(Path(path).read_text())


def load_results(json_path: str | os.PathLike) -> dict[str, Any] | None:
    """A previous run's JSON (for resuming), or ``None`` when absent or unreadable."""
    path = Path(json_path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


# ----------------------------------------------------------------------------------------------- data
def default_data_dirs() -> list[Path]:
    """Every MVTec-layout category under ``../shared/data`` (folders holding ``train/``)."""
    if not DEFAULT_DATA.is_dir():
        return []
    return sorted(p for p in DEFAULT_DATA.iterdir() if (p / "train").is_dir())


# ----------------------------------------------------------------------------------------------- command line
def median_seconds(fn: Any, rounds: int) -> float:
    """Median wall time of ``rounds`` calls of ``fn()`` in seconds, after one warm-up call (which builds caches)."""
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """``--threads``: torch CPU threads, applied by :func:`parse_args`."""
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (1 is steadier on a shared 2-core machine)"
    )


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None, data: bool = True) -> argparse.Namespace:
    """Parse ``argv``, set torch's thread count from ``--threads`` and, with ``data``, fill ``args.data``.

    ``args.data`` defaults to every category of ``../shared/data``; none at all is a usage error.
    """
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if data:
        args.data = args.data or default_data_dirs()
        if not args.data:
            parser.error("no --data given and ../shared/data holds no category")
    return args


@dataclass
class CategoryFeatures:
    """One category's standardised features, split exactly as :func:`invert_ad.training.train_detector` does.

    Attributes:
        name: the category folder's name.
        root: the category folder.
        train: ``(N_train, C, h, w)`` standardised features the denoiser (and the baselines) learn from.
        holdout: ``(N_holdout, C, h, w)`` standardised held-out normal features (calibration only).
        test: ``(N_test, C, h, w)`` standardised test features.
        labels: ``(N_test,)`` 0 normal, 1 anomalous.
        masks: ``(N_test, S, S)`` bool ground truth at the image size.
        defect_types: per test image.
        mean, std: ``(C,)`` the per-channel statistics of ``train`` before standardisation.
        image_size: S.
        seconds: time to load (or compute) the features.
    """

    name: str
    root: Path
    train: torch.Tensor
    holdout: torch.Tensor
    test: torch.Tensor
    labels: np.ndarray
    masks: np.ndarray
    defect_types: list[str]
    mean: torch.Tensor
    std: torch.Tensor
    image_size: int
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """Counts for a report."""
        return {
            "category": self.name,
            "data": str(self.root),
            "num_train": int(self.train.shape[0]),
            "num_holdout": int(self.holdout.shape[0]),
            "num_test": int(self.test.shape[0]),
            "num_test_anomalous": int(self.labels.sum()),
            "feature_shape": list(self.test.shape[1:]),
            "image_size": self.image_size,
        }


def load_category(
    root: str | os.PathLike,
    cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR,
    *,
    backbone: str = DEFAULT_BACKBONE,
    holdout_fraction: float = 0.1,
    seed: int = 0,
    image_size: int = 256,
    grid: int = 16,
    layers: tuple[int, ...] | None = None,
    progress: bool = True,
) -> CategoryFeatures:
    """Cached backbone features of one MVTec-layout category, standardised with the training statistics.

    The split into training and held-out normal images is the one of :func:`~invert_ad.training.train_detector`
    with the same ``holdout_fraction`` and ``seed`` (the default training seed is 0), so baselines and
    calibrations see exactly what the trained detector saw.

    Args:
        root: the category folder.
        cache_dir: the shared feature cache.
        backbone: feature extractor name.
        holdout_fraction: share of normal training images held out for calibration.
        seed: the training seed (it draws the split).
        image_size: images are resized to this square size (masks too, with nearest).
        grid: side of the feature grid every backbone stage is resized to.
        layers: backbone stages (``None``: the backbone's default).
        progress: progress bars for features still to compute.

    Returns:
        A :class:`CategoryFeatures`.
    """
    start = time.perf_counter()
    root = Path(root)
    options = {} if layers is None else {"layers": tuple(layers)}
    extractor = create_feature_extractor(backbone, image_size=image_size, grid=grid, **options)
    cache = FeatureCache(cache_dir)
    train_set = MVTecDataset(root, "train", extractor.image_size, skip_bad=True)
    test_set = MVTecDataset(root, "test", extractor.image_size, skip_bad=True)
    raw_train, _ = cached_features(extractor, train_set, cache, progress=progress)
    raw_test, test_paths = cached_features(extractor, test_set, cache, progress=progress)
    train_idx, holdout_idx = holdout_split(raw_train.shape[0], holdout_fraction, seed)
    mean, std = channel_statistics(raw_train[train_idx])

    def standardise(x: torch.Tensor) -> torch.Tensor:
        return (x - mean.reshape(1, -1, 1, 1)) / std.reshape(1, -1, 1, 1)

    by_path = {str(r.path): r for r in test_set.records}
    records = [by_path[p] for p in test_paths]
    size = extractor.image_size
    masks = np.zeros((len(records), size, size), dtype=bool)
    for i, record in enumerate(records):
        if record.mask_path is not None:
            masks[i] = load_mask(record.mask_path, size)
    train_all = standardise(raw_train)
    return CategoryFeatures(
        name=root.name,
        root=root,
        train=train_all[train_idx],
        holdout=train_all[holdout_idx],
        test=standardise(raw_test),
        labels=np.array([r.label for r in records]),
        masks=masks,
        defect_types=[r.defect_type for r in records],
        mean=mean,
        std=std,
        image_size=size,
        seconds=time.perf_counter() - start,
        info={"backbone": backbone, "holdout_fraction": holdout_fraction, "seed": seed, **extractor.get_config()},
    )


def evaluate_maps(
    image_scores: torch.Tensor | np.ndarray, grid_maps: torch.Tensor, category: CategoryFeatures
) -> dict[str, float | None]:
    """The seven metrics and mAD from image scores and feature-grid maps ``(N, h, w)``.

    Maps are upsampled bilinearly (``align_corners=False``, no smoothing) to the image size, as
    :class:`~invert_ad.detector.AnomalyDetector` does, and compared with the masks there (exact metrics).
    """
    scores = image_scores.detach().cpu().double().numpy() if isinstance(image_scores, torch.Tensor) else image_scores
    maps = upsample_maps(grid_maps.detach().cpu().float(), (category.image_size, category.image_size)).numpy()
    return evaluate_metrics(scores, category.labels, maps, category.masks, mode="exact")


# ----------------------------------------------------------------------------------------------- denoisers
@dataclass(frozen=True)
class DenoiserConfig:
    """A named denoiser configuration for :func:`invert_ad.training.train_detector`.

    Attributes:
        name: short name used on the command line and in tables.
        preset: the :func:`invert_ad.models.create_denoiser` preset.
        overrides: its constructor / fit arguments.
        trained: whether it has parameters to train (else it is fitted in seconds).
        note: one line for the tables.
    """

    name: str
    preset: str
    overrides: dict[str, Any] = field(default_factory=dict)
    trained: bool = True
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "preset": self.preset, "overrides": self.overrides, "trained": self.trained}


def _configs(items: Iterable[DenoiserConfig]) -> dict[str, DenoiserConfig]:
    return {c.name: c for c in items}


DENOISER_CONFIGS: dict[str, DenoiserConfig] = _configs(
    [
        DenoiserConfig("gaussian", "gaussian", {}, False, "per-position Gaussian, Ledoit-Wolf full covariance"),
        DenoiserConfig(
            "gaussian-diag", "gaussian", {"shrinkage": "diagonal"}, False, "per-position Gaussian, diagonal"
        ),
        DenoiserConfig(
            "gaussian-floor0.05",
            "gaussian",
            {"min_variance": 0.05},
            False,
            "per-position Gaussian, Ledoit-Wolf, eigenvalues floored at 0.05",
        ),
        DenoiserConfig(
            "gaussian-floor0.2",
            "gaussian",
            {"min_variance": 0.2},
            False,
            "per-position Gaussian, Ledoit-Wolf, eigenvalues floored at 0.2",
        ),
        DenoiserConfig(
            "residual-conv-128x2",
            "gaussian-residual-conv",
            {"residual_config": {"width": 128, "depth": 2}},
            True,
            "Gaussian + conv residual, width 128, depth 2",
        ),
        DenoiserConfig(
            "residual-conv-256x4",
            "gaussian-residual-conv",
            {"residual_config": {"width": 256, "depth": 4}},
            True,
            "Gaussian + conv residual, width 256, depth 4",
        ),
        DenoiserConfig(
            "residual-mlp-256x2",
            "gaussian-residual-mlp",
            {"residual_config": {"hidden_size": 256, "depth": 2}},
            True,
            "Gaussian + per-position MLP residual, hidden 256, depth 2",
        ),
        DenoiserConfig(
            "residual-dit-s",
            "gaussian-residual-dit-s",
            {},
            True,
            "Gaussian + DiT residual (dit-s size: hidden 256, depth 4, 4 heads)",
        ),
        DenoiserConfig("dit-s", "dit-s", {}, True, "plain DiT, hidden 256, depth 4, 4 heads"),
        DenoiserConfig(
            "dit-s-skip", "dit-s-skip", {}, True, "dit-s learning the residual of sqrt(1 - ab_t) x_t (trivial skip)"
        ),
        DenoiserConfig("dit-s-edm", "dit-s-edm", {}, True, "dit-s, trivial skip + EDM output scaling sqrt(ab_t)"),
        DenoiserConfig("dit-b", "dit-b", {}, True, "InvAD's DiT-base (hidden 1024, depth 8): speed runs only"),
        DenoiserConfig("dit-g", "dit-g", {}, True, "the paper's DiT-g (1.2e9 parameters): GPU speed runs only"),
        DenoiserConfig(
            "conv-128x2", "conv", {"width": 128, "depth": 2}, True, "plain conv net, width 128, depth 2 (no Gaussian)"
        ),
    ]
)
"""Denoiser configurations the benchmarks know by name."""
