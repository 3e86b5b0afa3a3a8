"""Pictures: heatmap overlays on a fixed, calibrated colour scale; score histograms and ROC curves."""

from .plots import save_heatmaps, save_roc_curve, save_score_histogram

__all__ = ["save_heatmaps", "save_roc_curve", "save_score_histogram"]
