"""Overlap kernels: token-weighted intersections of context pairs.

The batch reorder scores candidate pairs of contexts by the tokens they share
(:func:`pair_overlap`).  Two backends compute exactly the same integers:

* ``numpy``: the default, fast on its own on a CPU;
* ``triton``: a Triton kernel on a CUDA GPU, or under Triton's interpreter
  on the CPU when ``TRITON_INTERPRET=1`` (for tests).

:func:`select_backend` implements the ``use_gpu`` switch of the public API:
``use_gpu=True`` without a usable GPU logs one warning and falls back to
numpy (or raises with ``strict=True``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .overlap_cpu import pair_overlap_cpu
from .packed import PAD, PackedRows, pack_rows

__all__ = [
    "PAD",
    "PackedRows",
    "pack_rows",
    "pair_overlap",
    "pair_overlap_cpu",
    "OverlapBackend",
    "select_backend",
    "GpuUnavailableError",
]

log = logging.getLogger("contextpilot_engine.kernels")


class GpuUnavailableError(RuntimeError):
    """``use_gpu=True`` with ``strict=True`` on a machine where Triton cannot run."""


@dataclass(frozen=True)
class OverlapBackend:
    name: str  # "numpy" or "triton"
    device: str  # "cpu" or "cuda"
    fn: Callable[[PackedRows, np.ndarray, np.ndarray], np.ndarray]

    def pair_overlap(self, rows: PackedRows, left: np.ndarray, right: np.ndarray) -> np.ndarray:
        return self.fn(rows, left, right)


NUMPY_BACKEND = OverlapBackend("numpy", "cpu", pair_overlap_cpu)


def _triton_backend(device: str) -> OverlapBackend:
    from .overlap_triton import pair_overlap_triton

    def run(rows: PackedRows, left: np.ndarray, right: np.ndarray) -> np.ndarray:
        return pair_overlap_triton(rows, left, right, device=device)

    return OverlapBackend("triton", device, run)


def select_backend(use_gpu: bool, strict: bool = False) -> OverlapBackend:
    """The backend for ``use_gpu``; see the module docstring for the fallback rule."""
    if not use_gpu:
        return NUMPY_BACKEND
    reason = None
    try:
        import torch  # noqa: F401
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        reason = f"torch/triton are not importable ({exc.__class__.__name__}: {exc})"
    else:
        if torch.cuda.is_available():
            return _triton_backend("cuda")
        if os.environ.get("TRITON_INTERPRET") == "1":
            return _triton_backend("cpu")
        reason = "no CUDA device is available"
    if strict:
        raise GpuUnavailableError(f"use_gpu=True but {reason}; install the 'gpu' extra on a CUDA machine")
    log.warning("use_gpu=True but %s; falling back to the numpy CPU path", reason)
    return NUMPY_BACKEND


def pair_overlap(rows: PackedRows, left, right, backend: OverlapBackend | None = None) -> np.ndarray:
    """Tokens shared by each pair ``(left[m], right[m])`` of packed rows."""
    return (backend or NUMPY_BACKEND).pair_overlap(rows, np.asarray(left), np.asarray(right))
