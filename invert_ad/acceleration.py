"""Inference speed settings: ``torch.compile`` (with CUDA graphs), autocast, channels-last.

None of these change what a model is, only how fast it runs; nothing here is saved with a model. The functions
are pure wrappers used by :class:`~invert_ad.scorer.InversionScorer` (the latent computation) and
:class:`~invert_ad.pipeline.AnomalyDetector` (the backbone).

``torch.compile`` modes:

* ``"default"``: fuse kernels (Inductor); works on CPU (needs a C++ compiler) and GPU.
* ``"reduce-overhead"``: also captures CUDA graphs on a GPU, removing the per-kernel launch cost that dominates
  small denoisers at small batches; on CPU it behaves like ``"default"``. Shapes are static: every new batch
  size compiles (and captures) once more.
* ``"max-autotune"`` / ``"max-autotune-no-cudagraphs"``: benchmark kernel choices while compiling (slow to
  compile, sometimes faster to run).

The first call of a compiled function compiles it (seconds to minutes); later calls with the same shapes reuse it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

__all__ = ["COMPILE_MODES", "autocast", "check_autocast_dtype", "check_compile_mode", "compile_function"]

COMPILE_MODES: tuple[str, ...] = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
"""The ``torch.compile`` modes accepted by ``compile_mode`` arguments."""

_CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
_AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def check_compile_mode(mode: str | None) -> str | None:
    """Return ``mode`` if it is ``None`` or one of :data:`COMPILE_MODES`, else raise ``ValueError``."""
    if mode is not None and mode not in COMPILE_MODES:
        raise ValueError(f"compile_mode must be None or one of {', '.join(COMPILE_MODES)}; got {mode!r}")
    return mode


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


def compile_function(fn: Callable[[torch.Tensor], torch.Tensor], mode: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """``torch.compile`` a tensor -> tensor function for inference with static shapes.

    Modes that capture CUDA graphs return outputs living in buffers that the next call overwrites: the wrapper
    marks each call as a new step and returns a copy, so results stay valid however many batches follow.

    Args:
        fn: e.g. :meth:`InversionScorer.compute_latent` or a backbone's ``forward``.
        mode: one of :data:`COMPILE_MODES`.

    Returns:
        A function with ``fn``'s signature and results (up to floating-point reassociation).
    """
    check_compile_mode(mode)
    compiled = torch.compile(fn, mode=mode, dynamic=False)
    if mode in _CUDA_GRAPH_MODES:

        def run_graph(x: torch.Tensor, *args: Any) -> torch.Tensor:
            if x.is_cuda:
                torch.compiler.cudagraph_mark_step_begin()
                return compiled(x, *args).clone()
            return compiled(x, *args)

        return run_graph
    return compiled
