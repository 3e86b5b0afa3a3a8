"""The ``invert-ad`` command: train, evaluate, predict, export, demo, info.

Heavy imports happen inside the subcommands, so ``invert-ad --help`` answers at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

__all__ = ["main"]


def _grid(value: str) -> Any:
    """``paper``, ``official``, ``quad:5``, an int, or comma-separated points."""
    if "," in value:
        return [int(v) for v in value.split(",")]
    return int(value) if value.isdigit() else value


def _positive(kind: type) -> Any:
    """An argparse type: a number of ``kind`` above zero, with one message for 0 and negatives."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
        return value

    return parse


def _training_config(args: argparse.Namespace):
    from .training import TrainingConfig

    minutes = args.minutes
    if minutes is None and args.steps is None:
        minutes = args.default_minutes
    return TrainingConfig(
        steps=args.steps,
        minutes=minutes,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        seed=args.seed,
        autocast_dtype=None if args.autocast == "none" else args.autocast,
    )


def _add_training_args(p: argparse.ArgumentParser, minutes: float | None) -> None:
    from .defaults import DEFAULT_BACKBONE, DEFAULT_DENOISER, DEFAULT_MAP_PRIOR, DEFAULT_TIMESTEPS

    p.add_argument("--backbone", default=DEFAULT_BACKBONE, help=f"feature extractor (default {DEFAULT_BACKBONE})")
    p.add_argument("--denoiser", default=DEFAULT_DENOISER, help=f"denoiser preset (default {DEFAULT_DENOISER})")
    p.add_argument("--minutes", type=_positive(float), default=None, help=f"training time budget (default {minutes:g})")
    p.add_argument("--steps", type=_positive(int), default=None, help="training step budget (with --minutes: both)")
    p.set_defaults(default_minutes=minutes)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--autocast",
        choices=["auto", "bfloat16", "float16", "none"],
        default="auto",
        help="train under autocast (default auto: bfloat16 where the CPU has AVX512-BF16 or AMX, or the GPU runs "
        "it natively, else float32; none: float32)",
    )
    p.add_argument(
        "--timesteps",
        type=_grid,
        default=DEFAULT_TIMESTEPS,
        help=f"inversion grid: paper, official, exp:4, quad:5, 3, 0,500,999 (default {DEFAULT_TIMESTEPS})",
    )
    p.add_argument("--scoring", default="hybrid", help="nll, maxmin, hybrid, max, irf, reconstruction")
    p.add_argument("--fpr", type=float, default=0.01, help="false-positive rate on normal images for thresholds")
    p.add_argument(
        "--folds", type=_positive(int), default=5, help="out-of-fold calibration folds for closed-form denoisers"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--cache-dir", type=Path, default=None, help="feature cache (default ~/.cache/invert_ad)")
    p.add_argument("--grid", type=int, default=16, help="feature grid side (16: stride 16 at 256 px, 32: stride 8)")
    p.add_argument(
        "--map-prior",
        choices=["shared", "position", "window", "none"],
        default=DEFAULT_MAP_PRIOR,
        help=f"anomaly maps from a Mahalanobis map with this Gaussian prior (default {DEFAULT_MAP_PRIOR}; shared "
        "suits unaligned parts, position aligned ones); none: the inverted latent's map",
    )
    p.add_argument("--map-pool", type=int, default=1, help="local averaging window of --map-prior's features")


def _train(args: argparse.Namespace, data: Any) -> Any:
    from .training.train import train_detector

    return train_detector(
        data,
        args.out if args.command == "train" else Path(args.out) / "model",
        backbone=args.backbone,
        denoiser=args.denoiser,
        timesteps=args.timesteps,
        scoring=args.scoring,
        training=_training_config(args),
        fpr=args.fpr,
        folds=args.folds,
        cache_dir=args.cache_dir,
        device=args.device,
        progress=not args.quiet,
        grid=args.grid,
        map_prior=None if args.map_prior == "none" else args.map_prior,
        map_pool=args.map_pool,
        unified=getattr(args, "unified", "routed"),
    )


def _categories(folders: list[Path]) -> list[Path]:
    """``--data`` with every dataset root replaced by its category folders (:func:`invert_ad.data.category_folders`)."""
    from .data import category_folders

    return [category for folder in folders for category in category_folders(folder)]


def cmd_train(args: argparse.Namespace) -> int:
    args.data = _categories(args.data)
    summary = _train(args, args.data if len(args.data) > 1 else args.data[0])
    print(json.dumps({"model": str(summary.out_dir), **summary.info}, indent=2, default=str))
    if summary.info.get("verdict"):
        print(f"verdict: {summary.info['verdict']}", file=sys.stderr)
    return 0


def _add_speed_args(p: argparse.ArgumentParser, *, autocast: bool = True) -> None:
    """Inference speed flags (see :mod:`invert_ad.acceleration`); ``autocast=False`` where ``--autocast`` trains."""
    from .acceleration import COMPILE_MODES

    g = p.add_argument_group("speed (inference only; nothing is saved with the model)")
    g.add_argument(
        "--compile",
        choices=COMPILE_MODES,
        default=None,
        metavar="MODE",
        help=f"torch.compile the backbone and the inversion: {', '.join(COMPILE_MODES)} (compiles on first use)",
    )
    g.add_argument("--channels-last", action="store_true", help="run the backbone in channels-last memory format")
    if autocast:
        g.add_argument(
            "--autocast",
            dest="inference_autocast",
            choices=["bfloat16", "float16"],
            default=None,
            help="run the denoiser under autocast in this dtype",
        )
        g.add_argument(
            "--autocast-backbone",
            action="store_true",
            help="run the backbone under --autocast too (faster, but costs accuracy: opt-in)",
        )


def _check_speed_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if getattr(args, "autocast_backbone", False) and args.inference_autocast is None:
        parser.error(f"{args.command}: --autocast-backbone needs --autocast (the dtype to run the backbone in)")


def _speed_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of :meth:`AnomalyDetector.optimize` from the speed flags; ``{}`` when none is given."""
    settings = {
        "compile_mode": args.compile,
        "channels_last": args.channels_last,
        "autocast_dtype": getattr(args, "inference_autocast", None),
        "autocast_backbone": getattr(args, "autocast_backbone", False),
    }
    return settings if any(settings.values()) else {}


def _optimize(args: argparse.Namespace, detector: Any) -> Any:
    """Apply the speed flags to a loaded detector (nothing to do without them)."""
    settings = _speed_settings(args)
    return detector.optimize(**settings) if settings else detector


def _evaluation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of :func:`~invert_ad.evaluation.evaluate_detector` from the evaluation flags."""
    return {
        "batch_size": args.eval_batch_size,
        "mode": args.mode,
        "transductive": args.transductive,
        "heatmaps": args.heatmaps,
        "timing": not args.no_timing,
        "cache_dir": args.cache_dir,
        "progress": not args.quiet,
        "plots": True,
    }


def _evaluate(args: argparse.Namespace, model: Any, data: Any, out: Path) -> dict[str, Any]:
    from .evaluation import evaluate_detector

    return evaluate_detector(_optimize(args, model), data, out, **_evaluation_kwargs(args))


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    from .metrics import METRIC_KEYS

    keys = (*METRIC_KEYS, "num_images", "nfe", "latency_ms_batch1", "throughput_images_per_s")
    return {k: report.get(k) for k in keys}


def cmd_evaluate(args: argparse.Namespace) -> int:
    args.data = _categories(args.data)
    from .detector import AnomalyDetector

    overrides = {k: v for k, v in (("timesteps", args.timesteps), ("scoring", args.scoring)) if v is not None}
    detector = AnomalyDetector.from_pretrained(args.model, device=args.device, **overrides)
    if overrides:  # the saved fit and thresholds belong to the saved settings: refit them on normal images
        _refit(detector, args)
    detector = _with_engine(args, detector)
    if len(args.data) > 1:  # the unified setting: one model, a table per category and their mean
        from .evaluation import evaluate_categories

        summary = evaluate_categories(_optimize(args, detector), args.data, args.out, **_evaluation_kwargs(args))
        print(json.dumps({"mean": summary["mean"], "table": str(Path(args.out).with_suffix(".md"))}, indent=2))
        return 0
    report = _evaluate(args, detector, args.data[0], args.out)
    print(json.dumps(_summary(report), indent=2))
    return 0


def _refit(detector: Any, args: argparse.Namespace) -> None:
    """Fit the statistic and thresholds of a detector loaded with new settings on the data's normal train images."""
    import torch

    from .data import open_dataset

    datasets = [open_dataset(root, "train", detector.image_size) for root in args.data]
    refittable = callable(getattr(detector.scorer.denoiser, "refit", None))
    print(
        f"note: --timesteps/--scoring change the latent, so the statistic and thresholds are refitted on the "
        f"{sum(map(len, datasets))} normal training images of {', '.join(map(str, args.data))}"
        + ("" if refittable else " (in sample for this trained denoiser: thresholds are optimistic)"),
        file=sys.stderr,
    )
    images = torch.stack([d[i]["image"] for d in datasets for i in range(len(d))])
    detector.fit(images, fpr=args.fpr, progress=not args.quiet)


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    from .engines import ENGINES

    p.add_argument(
        "--engine",
        choices=ENGINES,
        default="torch",
        help="run the scoring path in PyTorch, or exported to ONNX Runtime / OpenVINO (CPU; checked against "
        "PyTorch when loaded)",
    )
    p.add_argument("--threads", type=int, default=None, help="engine threads (default: the CPUs this process may use)")


def _with_engine(args: argparse.Namespace, detector: Any) -> Any:
    """The detector itself for ``--engine torch``, else an :class:`~invert_ad.engines.EngineDetector`."""
    if args.engine == "torch":
        return detector
    from .engines import EngineDetector, load_engine

    return EngineDetector(detector, load_engine(detector, args.engine, threads=args.threads))


def cmd_predict(args: argparse.Namespace) -> int:
    from .predict_files import predict_paths

    model = args.model
    if args.engine != "torch":
        from .detector import AnomalyDetector

        model = _with_engine(args, AnomalyDetector.from_pretrained(args.model, device=args.device))
    written = predict_paths(
        model,
        args.inputs,
        args.out,
        maps_dir=args.maps_dir,
        threshold=args.threshold,
        batch_size=args.batch_size,
        device=args.device,
        progress=not args.quiet,
        optimize=_speed_settings(args) or None,
    )
    print(json.dumps(written, indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .data.elpv import elpv_dataset

    out = Path(args.out)
    if args.data is None:
        train_data, test_data = elpv_dataset("train"), elpv_dataset("test")
        print(
            f"demo data: ELPV solar cells, {len(train_data)} normal cells to train on, "
            f"{len(test_data)} test cells ({sum(test_data.labels)} defective)",
            file=sys.stderr,
        )
    else:
        train_data = test_data = args.data
    summary = _train(args, train_data)
    report = _evaluate(args, summary.detector, test_data, out / "report.json")
    print(json.dumps({"model": str(summary.out_dir), "report": str(out / "report.json"), **_summary(report)}, indent=2))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from ._version import __version__
    from .features import list_feature_extractors
    from .models import list_denoisers
    from .scoring import list_scorers

    print(
        json.dumps(
            {
                "invert_ad": __version__,
                "torch": torch.__version__,
                "cuda": torch.cuda.is_available(),
                "backbones": list_feature_extractors(),
                "denoisers": list_denoisers(),
                "scorers": list_scorers(),
            },
            indent=2,
        )
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .detector import AnomalyDetector
    from .export import export_onnx, export_torch

    detector = AnomalyDetector.from_pretrained(args.model, device=args.device)
    fmt = args.format or ("torch" if args.out.suffix == ".pt2" else "onnx")
    if fmt == "onnx":
        result = export_onnx(detector, args.out, **({} if args.opset is None else {"opset": args.opset}))
    else:
        result = export_torch(detector, args.out)
    print(json.dumps({"out": str(result.path), "format": fmt, "max_rel_diff": result.max_rel_diff}, indent=2))
    return 0


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--mode", choices=["exact", "histogram", "invad"], default="exact", help="metric computation")
    p.add_argument("--transductive", action="store_true", help="official test-set min-max hybrid (tables only)")
    p.add_argument("--heatmaps", type=int, default=8, help="overlays to save beside the report")
    p.add_argument("--no-timing", action="store_true", help="skip latency / throughput measurement")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="invert-ad", description="Anomaly detection by diffusion inversion.")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a detector on normal images and save it")
    p.add_argument(
        "--data",
        required=True,
        type=Path,
        nargs="+",
        metavar="DIR",
        help="MVTec-layout category folder, folder of normal images, or a dataset root (its category folders); "
        "several: one detector for all (unified)",
    )
    p.add_argument("--out", required=True, type=Path, help="model folder to write")
    p.add_argument(
        "--unified",
        choices=["routed", "joint"],
        default="routed",
        help="several --data: one detector per folder behind a router (routed, default), or one denoiser on "
        "the union with pooled thresholds (joint)",
    )
    _add_training_args(p, minutes=10.0)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="metrics, timings and heatmaps of a saved detector on a test split")
    p.add_argument("--model", required=True, help="model folder or Hub repo id")
    p.add_argument(
        "--data",
        required=True,
        type=Path,
        nargs="+",
        metavar="DIR",
        help="MVTec-layout category folder(s) or a dataset root (test splits); several: a table per category and "
        "the mean",
    )
    p.add_argument("--out", required=True, type=Path, help="JSON report to write")
    p.add_argument(
        "--timesteps", type=_grid, default=None, help="override the saved grid (refits on the data's train split)"
    )
    p.add_argument("--scoring", default=None, help="override the saved scorer (refits on the data's train split)")
    p.add_argument("--fpr", type=float, default=0.01, help="false-positive rate of the refit thresholds")
    p.add_argument("--device", default="cpu")
    p.add_argument("--cache-dir", type=Path, default=None)
    _add_eval_args(p)
    _add_speed_args(p)
    _add_engine_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="score images or folders: per-image score, label, map, mask")
    p.add_argument("--model", required=True, help="model folder or Hub repo id")
    p.add_argument("inputs", nargs="+", type=Path, help="image files or folders")
    p.add_argument("--out", required=True, type=Path, help="results file (.json or .csv)")
    p.add_argument("--maps-dir", type=Path, default=None, help="save anomaly maps and masks as PNG here")
    p.add_argument("--threshold", type=float, default=None, help="normalised threshold (default 0.5)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    _add_speed_args(p)
    _add_engine_args(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("demo", help="the main job on a built-in dataset (ELPV solar cells) or --data")
    p.add_argument("--data", type=Path, default=None, help="an MVTec-layout category instead of ELPV")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    _add_training_args(p, minutes=3.0)
    _add_eval_args(p)
    _add_speed_args(p, autocast=False)  # its --autocast is the training one
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("export", help="write the whole scoring path as one ONNX or torch.export file, checked")
    p.add_argument("--model", required=True, help="model folder or Hub repo id")
    p.add_argument("--out", required=True, type=Path, help="file to write (.onnx, or .pt2 for torch.export)")
    p.add_argument("--format", choices=["onnx", "torch"], default=None, help="default: torch for .pt2, else onnx")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("info", help="versions and registered components")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="invert-ad: %(message)s")  # phase lines, also under --quiet
    _check_speed_args(parser, args)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, OSError, RuntimeError, ImportError) as err:
        print(f"invert-ad {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
