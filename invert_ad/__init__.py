"""invert_ad: reconstruction-free anomaly detection by diffusion inversion (InvAD, OSD-IRF)."""

from ._version import __version__
from .schedule import InversionGrid, resolve_grid
from .scorer import InversionScorer, ScoreOutput
from .scoring import NotFittedError, Scorer, create_scorer, list_scorers, register_scorer

__all__ = [
    "InversionGrid",
    "InversionScorer",
    "NotFittedError",
    "ScoreOutput",
    "Scorer",
    "__version__",
    "create_scorer",
    "list_scorers",
    "register_scorer",
    "resolve_grid",
]
