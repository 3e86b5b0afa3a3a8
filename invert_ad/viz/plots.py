"""Matplotlib figures saved as PNG (the ``viz`` extra: ``pip install invert_ad[viz]``).

Heatmaps use the detector's calibration, not per-image min-max: 0.5 on the colour scale is the pixel
threshold fitted on normal images, so a normal image looks calm and a defect stands out.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["save_heatmaps", "save_roc_curve", "save_score_histogram"]


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("pictures need matplotlib: pip install 'invert_ad[viz]'") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_heatmaps(detector: Any, samples: Sequence[dict[str, Any]], folder: str | os.PathLike) -> list[Path]:
    """One PNG per sample: image, calibrated anomaly map, overlay, and the ground truth when there is one.

    Args:
        detector: a fitted :class:`~invert_ad.detector.AnomalyDetector` (the colour scale is its calibration).
        samples: dataset samples (``image`` ``(3, S, S)``, ``label``, ``mask`` ``(1, S, S)``, ``path``,
            ``defect_type``, which names the file: ``003_crack_000.png``).
        folder: output folder.

    Returns:
        The written files.
    """
    plt = _pyplot()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    images = torch.stack([s["image"] for s in samples])
    out = detector.predict(images, warn=False)  # NotFittedError without a calibration: the colour scale needs it
    normalized, masks, scores = out.anomaly_map.numpy(), out.pred_mask.numpy(), out.pred_score.numpy()
    written = []
    for i, sample in enumerate(samples):
        has_mask = int(sample["label"]) == 1 and float(sample["mask"].sum()) > 0
        panels = 4 if has_mask else 3
        fig, axes = plt.subplots(1, panels, figsize=(3.2 * panels, 3.4))
        image = sample["image"].permute(1, 2, 0).numpy()
        axes[0].imshow(image)
        axes[0].set_title("image")
        heat = axes[1].imshow(normalized[i], cmap="jet", vmin=0.0, vmax=1.0)
        axes[1].set_title("anomaly map (0.5 = threshold)")
        fig.colorbar(heat, ax=axes[1], fraction=0.046, pad=0.04)
        axes[2].imshow(image)
        axes[2].imshow(normalized[i], cmap="jet", vmin=0.0, vmax=1.0, alpha=0.45)
        if masks[i].any():
            axes[2].contour(masks[i], levels=[0.5], colors="white", linewidths=0.8)
        axes[2].set_title("overlay, predicted mask")
        if has_mask:
            axes[3].imshow(sample["mask"][0].numpy(), cmap="gray", vmin=0, vmax=1)
            axes[3].set_title("ground truth")
        for ax in axes:
            ax.axis("off")
        verdict = "ANOMALOUS" if out.pred_label[i] else "normal"
        kind = str(sample.get("defect_type") or ("defect" if int(sample["label"]) == 1 else "good"))
        domain = "" if out.in_domain[i] else "  [unlike the training images]"
        title = f"{Path(sample['path']).name}  ({kind})  pred_score {scores[i]:.2f} -> {verdict}{domain}"
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        path = folder / f"{i:03d}_{kind}_{Path(sample['path']).stem}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    return written


def save_score_histogram(
    scores: np.ndarray, labels: np.ndarray, path: str | os.PathLike, threshold: float | None = None
) -> Path:
    """Histogram of image scores, normal vs anomalous, with the threshold marked."""
    plt = _pyplot()
    scores, labels = np.asarray(scores, dtype=float), np.asarray(labels)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.histogram_bin_edges(scores, bins=30)
    ax.hist(scores[labels == 0], bins=bins, alpha=0.6, label=f"normal ({int((labels == 0).sum())})", color="tab:blue")
    ax.hist(scores[labels == 1], bins=bins, alpha=0.6, label=f"anomalous ({int((labels == 1).sum())})", color="tab:red")
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", label="threshold")
    ax.set_xlabel("image score")
    ax.set_ylabel("images")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def save_roc_curve(scores: np.ndarray, labels: np.ndarray, path: str | os.PathLike) -> Path:
    """The image-level ROC curve with its AUROC."""
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = _pyplot()
    fpr, tpr, _ = roc_curve(labels, scores)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot(fpr, tpr, label=f"AUROC {roc_auc_score(labels, scores):.3f}")
    ax.plot([0, 1], [0, 1], color="gray", linestyle=":")
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
