"""invert_ad: reconstruction-free anomaly detection by diffusion inversion (InvAD, OSD-IRF).

Core objects: :class:`InversionScorer` (features in, scores out), :class:`AnomalyDetector` (images in,
decisions out) and :class:`RoutedDetector` (one detector per product behind a router). Subpackages:
``adapters``, ``data``, ``features``, ``metrics``, ``models``, ``scoring``, ``training``, ``viz``.
"""

from ._version import __version__
from .calibration import Calibration
from .detector import AnomalyDetector, DetectorOutput
from .routing import RoutedDetector
from .schedule import InversionGrid, resolve_grid
from .scorer import InversionScorer
from .scoring import NotFittedError, ScoreOutput, Scorer, create_scorer, list_scorers, register_scorer

__all__ = [
    "AnomalyDetector",
    "Calibration",
    "DetectorOutput",
    "InversionGrid",
    "InversionScorer",
    "NotFittedError",
    "RoutedDetector",
    "ScoreOutput",
    "Scorer",
    "__version__",
    "create_scorer",
    "list_scorers",
    "register_scorer",
    "resolve_grid",
]
