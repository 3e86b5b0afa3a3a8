"""The ``invert-ad`` command: train, evaluate, predict, export, demo, info.

Heavy imports happen inside the subcommands, so ``invert-ad --help`` answers at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["main"]


def _grid(value: str) -> Any:
    """``paper``, ``official``, ``quad:5``, an int, or comma-separated points."""
    if "," in value:
        return [int(v) for v in value.split(",")]
    return int(value) if value.isdigit() else value


def _training_config(args: argparse.Namespace):
    from .training import TrainingConfig

    minutes = None if args.steps is not None and args.minutes is None else (args.minutes or 10.0)
    return TrainingConfig(
        steps=args.steps,
        minutes=minutes,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        seed=args.seed,
        autocast_dtype=args.autocast,
    )


def _add_training_args(p: argparse.ArgumentParser, minutes: float | None) -> None:
    from .defaults import DEFAULT_BACKBONE, DEFAULT_DENOISER

    p.add_argument("--backbone", default=DEFAULT_BACKBONE, help=f"feature extractor (default {DEFAULT_BACKBONE})")
    p.add_argument("--denoiser", default=DEFAULT_DENOISER, help=f"denoiser preset (default {DEFAULT_DENOISER})")
    p.add_argument("--minutes", type=float, default=minutes, help="training time budget")
    p.add_argument("--steps", type=int, default=None, help="training step budget (overrides --minutes' plan)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--autocast", choices=["bfloat16", "float16"], default=None, help="train under autocast")
    p.add_argument(
        "--timesteps", type=_grid, default="paper", help="inversion grid: paper, official, quad:5, 3, 0,500,999"
    )
    p.add_argument("--scoring", default="hybrid", help="nll, maxmin, hybrid, max, irf, reconstruction")
    p.add_argument("--fpr", type=float, default=0.01, help="false-positive rate on normal images for thresholds")
    p.add_argument("--device", default="cpu")
    p.add_argument("--cache-dir", type=Path, default=None, help="feature cache (default ~/.cache/invert_ad)")


def _train(args: argparse.Namespace, data: Any) -> Any:
    from .training.recipe import train_detector

    return train_detector(
        data,
        args.out if args.command == "train" else Path(args.out) / "model",
        backbone=args.backbone,
        denoiser=args.denoiser,
        timesteps=args.timesteps,
        scoring=args.scoring,
        training=_training_config(args),
        fpr=args.fpr,
        cache_dir=args.cache_dir,
        device=args.device,
        progress=not args.quiet,
    )


def cmd_train(args: argparse.Namespace) -> int:
    summary = _train(args, args.data)
    print(json.dumps({"model": str(summary.out_dir), **summary.info}, indent=2, default=str))
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


def _evaluate(args: argparse.Namespace, model: Any, data: Any, out: Path) -> dict[str, Any]:
    from .evaluation import evaluate_detector

    return evaluate_detector(
        _optimize(args, model),
        data,
        out,
        batch_size=args.eval_batch_size,
        mode=args.mode,
        transductive=args.transductive,
        heatmaps=args.heatmaps,
        timing=not args.no_timing,
        cache_dir=args.cache_dir,
        progress=not args.quiet,
        plots=True,
    )


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    from .metrics import METRIC_KEYS

    keys = (*METRIC_KEYS, "num_images", "nfe", "latency_ms_batch1", "throughput_images_per_s")
    return {k: report.get(k) for k in keys}


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .pipeline import AnomalyDetector

    overrides = {k: v for k, v in (("timesteps", args.timesteps), ("scoring", args.scoring)) if v is not None}
    if "scoring" in overrides:
        print("note: a new --scoring is calibrated on nothing; prefer the saved scorer", file=sys.stderr)
    detector = AnomalyDetector.from_pretrained(args.model, device=args.device, **overrides)
    report = _evaluate(args, detector, args.data, args.out)
    print(json.dumps(_summary(report), indent=2))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .predict import predict_paths

    written = predict_paths(
        args.model,
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

    from . import __version__
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
    from .export import export_onnx, export_torch
    from .pipeline import AnomalyDetector

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
    p.add_argument("--data", required=True, type=Path, help="MVTec-layout category folder or folder of normal images")
    p.add_argument("--out", required=True, type=Path, help="model folder to write")
    _add_training_args(p, minutes=10.0)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="metrics, timings and heatmaps of a saved detector on a test split")
    p.add_argument("--model", required=True, help="model folder or Hub repo id")
    p.add_argument("--data", required=True, type=Path, help="MVTec-layout category folder (its test split)")
    p.add_argument("--out", required=True, type=Path, help="JSON report to write")
    p.add_argument("--timesteps", type=_grid, default=None, help="override the saved grid")
    p.add_argument("--scoring", default=None, help="override the saved scorer")
    p.add_argument("--device", default="cpu")
    p.add_argument("--cache-dir", type=Path, default=None)
    _add_eval_args(p)
    _add_speed_args(p)
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
    _check_speed_args(parser, args)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, OSError, RuntimeError, ImportError) as err:
        print(f"invert-ad {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
