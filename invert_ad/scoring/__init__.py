"""Scorers: statistics of inverted latents (NLL, max-min, hybrid), OSD-IRF and the reconstruction baseline.

Presets registered by name (``list_scorers()``):

- ``nll``, ``maxmin``, ``hybrid``, ``max``: read the DDIM-inverted latent;
- ``irf``: the hybrid of OSD-IRF's one-step latent ``eps(sqrt(ab_t) x0, t)``;
- ``reconstruction``: the baseline that noises, denoises and scores ``max ||x0 - x0hat||`` per position.

:class:`MahalanobisMap` forms anomaly maps from the features instead of the latent (``InversionScorer(...,
map_statistic=MahalanobisMap.fit(train_features, prior="shared", pool=3))``).
"""

from functools import partial

from ._registry import create_scorer, list_scorers, register_scorer, scorer_class
from .base import LATENT_KINDS, NotFittedError, ScoreOutput, Scorer
from .feature_maps import MahalanobisMap, load_map_statistic, local_average
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
    "MahalanobisMap",
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
    "load_map_statistic",
    "local_average",
    "max_min",
    "norm_map",
    "register_scorer",
    "scorer_class",
    "upsample_maps",
]
