"""Inference speed settings: ``torch.compile`` (with CUDA graphs), autocast, channels-last.

None of these change what a model is, only how fast it runs; nothing here is saved with a model. The functions
are pure wrappers used by :class:`~invert_ad.scorer.InversionScorer` (the latent computation) and
:class:`~invert_ad.detector.AnomalyDetector` (the backbone).

``torch.compile`` modes:

* ``"default"``: fuse kernels (Inductor); works on CPU (needs a C++ compiler) and GPU.
* ``"reduce-overhead"``: also captures CUDA graphs on a GPU, removing the per-kernel launch cost that dominates
  small denoisers at small batches; on CPU it behaves like ``"default"``.
* ``"max-autotune"`` / ``"max-autotune-no-cudagraphs"``: benchmark kernel choices while compiling (slow to
  compile, sometimes faster to run).

The first call of a compiled function compiles it (seconds to minutes); later calls with the same shapes reuse it.
Shapes are static: every new batch size compiles (and captures) once more, unless smaller batches are padded to
a fixed ``batch_size`` (:func:`compile_function`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

__all__ = [
    "COMPILE_MODES",
    "autocast",
    "check_autocast_dtype",
    "check_batch_size",
    "check_compile_mode",
    "compile_function",
    "pad_batch",
]

COMPILE_MODES: tuple[str, ...] = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
"""The ``torch.compile`` modes accepted by ``compile_mode`` arguments."""

_CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
_AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def check_compile_mode(mode: str | None) -> str | None:
    """Return ``mode`` if it is ``None`` or one of :data:`COMPILE_MODES`, else raise ``ValueError``."""
    if mode is not None and mode not in COMPILE_MODES:
        raise ValueError(f"compile_mode must be None or one of {', '.join(COMPILE_MODES)}; got {mode!r}")
    return mode


def check_batch_size(batch_size: int | None, name: str = "compile batch_size") -> int | None:
    """Return ``batch_size`` if it is ``None`` or a positive int, else raise ``ValueError`` naming it ``name``."""
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"{name} must be a positive int or None, got {batch_size!r}")
    return batch_size


def check_autocast_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``None``, ``torch.bfloat16`` / ``torch.float16`` or their names -> the dtype (``ValueError`` otherwise)."""
    if dtype is None or dtype in _AUTOCAST_DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in _AUTOCAST_DTYPES:
        return _AUTOCAST_DTYPES[dtype]
    raise ValueError(f"autocast dtype must be None, 'bfloat16' or 'float16'; got {dtype!r}")


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """``torch.autocast`` on ``device``'s type with ``dtype``; a no-op when ``dtype`` is ``None``."""
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def pad_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """Repeat the last sample of ``x`` ``(B, ...)`` until it holds ``size`` samples (``x`` itself if ``B >= size``)."""
    missing = size - x.shape[0]
    if missing <= 0:
        return x
    return torch.cat([x, x[-1:].expand(missing, *x.shape[1:])])


def compile_function(
    fn: Callable[[torch.Tensor], torch.Tensor], mode: str, batch_size: int | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``torch.compile`` a per-sample tensor -> tensor function for inference with static shapes.

    Modes that capture CUDA graphs return outputs living in buffers that the next call overwrites: the wrapper
    marks each call as a new step and returns a copy, so results stay valid however many batches follow.

    Args:
        fn: e.g. :meth:`InversionScorer.compute_latent` or a backbone's ``forward``: every output row must depend
            on its own input row only (true of the library's denoisers and backbones in eval mode).
        mode: one of :data:`COMPILE_MODES`.
        batch_size: pad smaller batches to this size (repeating their last sample, whose extra outputs are
            dropped), so a last, smaller batch reuses the compiled graph instead of compiling again. Larger
            batches run as they are (and compile once for their size).

    Returns:
        A function with ``fn``'s signature and results (up to floating-point reassociation).
    """
    check_compile_mode(mode)
    check_batch_size(batch_size)
    compiled = torch.compile(fn, mode=mode, dynamic=False)
    graphs = mode in _CUDA_GRAPH_MODES

    def run(x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if batch_size is not None:
            x = pad_batch(x, batch_size)
        if graphs and x.is_cuda:
            torch.compiler.cudagraph_mark_step_begin()
            return compiled(x)[:n].clone()
        return compiled(x)[:n]

    return run
