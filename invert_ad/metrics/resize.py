"""Bring anomaly maps and masks to a common evaluation size.

Maps are resized bilinearly with ``align_corners=False`` (the InvAD convention for upsampling the latent norm
map); masks with torch's ``"nearest"`` mode (source index ``floor(dst * in / out)``, as torchvision's
``Resize(..., NEAREST)`` on tensors), so binary masks stay binary.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..scoring.functional import upsample_maps
from ._validation import ArrayLike

__all__ = ["resize_maps", "resize_masks"]


def _as_size(size: int | tuple[int, int]) -> tuple[int, int]:
    height, width = (size, size) if isinstance(size, int) else size
    if height < 1 or width < 1:
        raise ValueError(f"size must be positive, got {size}")
    return int(height), int(width)


def _as_batch(values: ArrayLike, name: str) -> torch.Tensor:
    tensor = values if isinstance(values, torch.Tensor) else torch.from_numpy(np.asarray(values))
    if tensor.dim() != 3:
        raise ValueError(f"{name} must have shape (N, H, W), got {tuple(tensor.shape)}")
    return tensor


def _like_input(result: torch.Tensor, original: ArrayLike) -> ArrayLike:
    return result if isinstance(original, torch.Tensor) else result.numpy()


def resize_maps(maps: ArrayLike, size: int | tuple[int, int]) -> ArrayLike:
    """Bilinear resize (``align_corners=False``) of anomaly maps: ``(N, h, w) -> (N, H, W)``.

    Args:
        maps: numpy array or torch tensor, shape ``(N, h, w)``. Floating dtypes are kept (float16 and bfloat16
            are computed in float32 and cast back); other dtypes give float32.
        size: ``H`` (square) or ``(H, W)``.

    Returns:
        Maps of shape ``(N, H, W)``, a numpy array for numpy input and a tensor (same device) for tensor input.

    Raises:
        ValueError: on a shape other than ``(N, h, w)`` or a non-positive size.
    """
    tensor = _as_batch(maps, "maps")
    out_dtype = tensor.dtype if tensor.is_floating_point() else torch.float32
    resized = upsample_maps(tensor.to(torch.promote_types(out_dtype, torch.float32)), _as_size(size))
    return _like_input(resized.to(out_dtype), maps)


def resize_masks(masks: ArrayLike, size: int | tuple[int, int]) -> ArrayLike:
    """Nearest-neighbour resize (torch ``"nearest"``) of masks: ``(N, h, w) -> (N, H, W)``, dtype kept.

    Args:
        masks: numpy array or torch tensor, shape ``(N, h, w)``, any dtype (bool included).
        size: ``H`` (square) or ``(H, W)``.

    Returns:
        Masks of shape ``(N, H, W)`` with the input's dtype and type (numpy or tensor).

    Raises:
        ValueError: on a shape other than ``(N, h, w)`` or a non-positive size.
    """
    tensor = _as_batch(masks, "masks")
    resized = F.interpolate(tensor[:, None].to(torch.float32), size=_as_size(size), mode="nearest")[:, 0]
    return _like_input(resized.to(tensor.dtype), masks)
