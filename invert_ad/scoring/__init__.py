"""Scorers: statistics of inverted latents (NLL, max-min, hybrid), OSD-IRF and the reconstruction baseline.

Presets registered by name (``list_scorers()``):

- ``nll``, ``maxmin``, ``hybrid``, ``max``: read the DDIM-inverted latent;
- ``irf``: the hybrid of OSD-IRF's one-step latent ``eps(sqrt(ab_t) x0, t)``;
- ``reconstruction``: the baseline that noises, denoises and scores ``max ||x0 - x0hat||`` per position.
"""

from functools import partial

from ._registry import create_scorer, list_scorers, register_scorer, scorer_class
from .base import LATENT_KINDS, NotFittedError, ScoreOutput, Scorer
from .functional import gaussian_nll, max_min, norm_map, upsample_maps
from .statistics import HybridScorer, MaxMinScorer, MaxNormScorer, NLLScorer, hybrid_from_components

register_scorer("nll", NLLScorer)
register_scorer("maxmin", MaxMinScorer)
register_scorer("max", MaxNormScorer)
register_scorer("hybrid", HybridScorer)
register_scorer("irf", partial(HybridScorer, latent="irf"))
register_scorer("reconstruction", partial(MaxNormScorer, latent="reconstruction"))

__all__ = [
    "LATENT_KINDS",
    "HybridScorer",
    "MaxMinScorer",
    "MaxNormScorer",
    "NLLScorer",
    "NotFittedError",
    "ScoreOutput",
    "Scorer",
    "create_scorer",
    "gaussian_nll",
    "hybrid_from_components",
    "list_scorers",
    "max_min",
    "norm_map",
    "register_scorer",
    "scorer_class",
    "upsample_maps",
]
