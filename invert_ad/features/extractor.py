"""Frozen timm backbones turned into one multi-level feature map per image.

The chosen stages of a timm ``features_only`` model are resized bilinearly (``align_corners=False``) to a common
grid and concatenated on channels, InvAD's feature space (METHOD.md section 4).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from .weights import match_state_dict, read_weights

__all__ = ["FeatureExtractor", "TimmFeatureExtractor", "take_indices"]

_RANGE_TOLERANCE = 1e-3
# timm's FeatureGetterNet (ViT and other token models) keeps the network under this attribute name.
_GETTER_PREFIX = "model."


@runtime_checkable
class FeatureExtractor(Protocol):
    """What the rest of invert_ad needs from a feature extractor.

    Calling it maps images ``(B, 3, S, S)`` float in [0, 1] (``S = image_size``) to features
    ``(B, channels, *grid)`` float32; it normalises with its own ``mean`` / ``std`` inside.
    """

    channels: int
    grid: tuple[int, int]
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...

    def get_config(self) -> dict[str, Any]: ...


def take_indices(indices: int | Sequence[int], count: int) -> tuple[int, ...]:
    """Absolute, sorted, distinct stage indices out of ``count`` stages; negative ones count from the end.

    Raises:
        ValueError: an index outside ``[-count, count)`` or an empty selection.
    """
    indices = (indices,) if isinstance(indices, int) else tuple(indices)
    if not indices:
        raise ValueError("select at least one layer")
    bad = [i for i in indices if not -count <= i < count]
    if bad:
        raise ValueError(f"layer indices {bad} out of range: this backbone has {count} stages (0..{count - 1})")
    return tuple(sorted({i % count for i in indices}))


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or any(int(v) < 1 for v in pair):
        raise ValueError(f"grid must be a positive int or (h, w), got {value!r}")
    return int(pair[0]), int(pair[1])


class TimmFeatureExtractor(nn.Module):
    """A frozen timm backbone giving multi-level feature maps ``(B, C, h, w)``.

    Normalisation is applied inside :meth:`forward`: pass images in [0, 1], already resized to
    ``image_size`` (the datasets of :mod:`invert_ad.data` do that). The backbone always stays in eval mode
    (``train()`` does not switch it, so batch-norm statistics never move) and has ``requires_grad=False``.

    Usually built through a registered preset (``create_feature_extractor("efficientnet_lite0")``), which
    resolves default weights and normalisation.

    Args:
        architecture: timm model name, e.g. ``"tf_efficientnet_lite0"``.
        name: registered name, written to :meth:`get_config`.
        layers: stage indices into the backbone's ``feature_info`` (EfficientNet: stage ends, ViT: blocks);
            negative ones count from the end.
        grid: ``(h, w)`` (or one int) every stage is resized to.
        image_size: side S of the square input images, in pixels.
        weights: ``"package"``, ``"hub:<repo id>"``, a path to a weights file or folder, or ``None`` for random
            weights (warns: shape tests only). See :func:`invert_ad.features.weights.read_weights`.
        mean: per-channel mean of the backbone's normalisation (RGB, for images in [0, 1]).
        std: per-channel standard deviation of that normalisation.
        model_kwargs: extra ``timm.create_model`` arguments (e.g. ``dynamic_img_size=True`` for ViTs).

    Attributes:
        channels: ``C``, the sum of ``layer_channels``.
        layer_channels: channels of each selected stage.
        reductions: stride of each selected stage relative to the input.
        grid: ``(h, w)`` of the output.

    Raises:
        ValueError: bad ``layers`` or ``grid``.
        WeightsError, ImportError, FileNotFoundError: the weights cannot be had or do not fit.
    """

    def __init__(
        self,
        architecture: str,
        *,
        name: str,
        layers: int | Sequence[int],
        grid: int | Sequence[int] = 16,
        image_size: int = 256,
        weights: str | os.PathLike | None,
        mean: Sequence[float],
        std: Sequence[float],
        model_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        import timm

        self.name = name
        self.architecture = architecture
        self.grid = _pair(grid)
        self.image_size = int(image_size)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got {mean!r} and {std!r}")
        model_kwargs = dict(model_kwargs or {})
        with torch.device("meta"):  # names, shapes and stage count without allocating or initialising
            reference = timm.create_model(architecture, **model_kwargs)
        self.layers = take_indices(layers, len(reference.feature_info))
        self.weights = None if weights is None else _resolved_spec(weights)
        state = read_weights(self.weights, architecture, reference, backbone=name)
        self.backbone = timm.create_model(architecture, features_only=True, out_indices=self.layers, **model_kwargs)
        if state is None:
            warnings.warn(
                f"{name}: weights=None gives RANDOM features, meaningful for shape tests only",
                UserWarning,
                stacklevel=2,
            )
        else:
            prefix = _GETTER_PREFIX if all(k.startswith(_GETTER_PREFIX) for k in self.backbone.state_dict()) else ""
            origin = self.weights if self.weights != "package" else f"the {architecture} weights package"
            self.backbone.load_state_dict(
                match_state_dict(state, self.backbone, origin=origin, prefix=prefix), strict=False
            )
        self.backbone.requires_grad_(False)
        self.layer_channels = tuple(int(c) for c in self.backbone.feature_info.channels())
        self.reductions = tuple(int(r) for r in self.backbone.feature_info.reduction())
        self.channels = sum(self.layer_channels)
        self.register_buffer("_mean", torch.tensor(self.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.std).view(1, 3, 1, 1), persistent=False)
        self.train(False)

    def train(self, mode: bool = True) -> TimmFeatureExtractor:
        """Keep the frozen backbone in eval mode whatever ``mode`` is (batch-norm statistics must not move)."""
        return super().train(False)

    def get_config(self) -> dict[str, Any]:
        """JSON-serialisable arguments that rebuild this extractor with ``create_feature_extractor(**config)``.

        Returns:
            ``name``, ``layers``, ``grid`` ``[h, w]``, ``image_size``, ``weights`` (resolved source: ``"package"``,
            ``"hub:<repo id>"``, an absolute path or ``None``), ``mean`` and ``std``.
        """
        return {
            "name": self.name,
            "layers": list(self.layers),
            "grid": list(self.grid),
            "image_size": self.image_size,
            "weights": self.weights,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``(images - mean) / std`` per channel, for images ``(B, 3, H, W)`` in [0, 1]."""
        return (images - self._mean) / self._std

    def check_images(self, images: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``images`` is ``(B, 3, S, S)`` with ``S = image_size`` and values in [0, 1].

        Inside ``torch.export`` and ``torch.compile`` graphs only the shape is checked (a value check would
        branch on data); :class:`~invert_ad.detector.AnomalyDetector` calls this before its compiled backbone.
        """
        expected = (3, self.image_size, self.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"{self.name} expects images (B, {', '.join(map(str, expected))}) in [0, 1], "
                f"got {tuple(images.shape)}: resize to image_size={self.image_size} first"
            )
        if torch.compiler.is_exporting() or torch.compiler.is_compiling():
            return
        low, high = float(images.min()), float(images.max())
        if low < -_RANGE_TOLERANCE or high > 1 + _RANGE_TOLERANCE:
            raise ValueError(
                f"{self.name} expects images in [0, 1] (it normalises them itself), "
                f"got values in [{low:.3g}, {high:.3g}]"
            )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Multi-level features of a batch, without gradients.

        Args:
            images: ``(B, 3, S, S)`` float in [0, 1], ``S = image_size``.

        Returns:
            ``(B, channels, h, w)`` float, ``(h, w) = grid``: each selected stage resized bilinearly
            (``align_corners=False``, no antialiasing) and concatenated in stage order.

        Raises:
            ValueError: wrong shape or values outside [0, 1].
        """
        self.check_images(images)
        with torch.no_grad():
            maps = self.backbone(self.normalize(images.to(self._mean.dtype)))
            resized = [
                m
                if tuple(m.shape[-2:]) == self.grid
                else F.interpolate(m, self.grid, mode="bilinear", align_corners=False)
                for m in maps
            ]
            return torch.cat(resized, dim=1)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, channels={self.channels}, grid={self.grid}, image_size={self.image_size}"


def _resolved_spec(weights: str | os.PathLike) -> str:
    """Keywords stay; paths become absolute so a saved config does not depend on the working directory."""
    text = os.fspath(weights)
    if text == "package" or text.startswith("hub:"):
        return text
    return str(os.path.abspath(os.path.expanduser(text)))
