"""Token-weighted overlap of context pairs on the CPU, in numpy.

For each requested pair ``(i, j)`` the result is the number of tokens of the
blocks that both contexts contain.  Pairs are processed in chunks with no
per-pair Python: the two rows of every pair are concatenated and sorted, and
an item both rows hold shows up as two equal neighbours (items are distinct
within a row).  That is ``2K log 2K`` work per pair instead of comparing all
``K x K`` cells, which is the fallback when weights are per cell.  Integer
arithmetic throughout, so the Triton kernel's results are bit-identical.
"""

from __future__ import annotations

import numpy as np

from .packed import PackedRows

__all__ = ["pair_overlap_cpu"]

#: pairs compared per chunk; bounds the temporary K x K boolean cube to ~64 MB at K=32
_CHUNK = 1 << 16


def pair_overlap_cpu(rows: PackedRows, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    left = np.asarray(left, dtype=np.int64)
    right = np.asarray(right, dtype=np.int64)
    if left.shape != right.shape:
        raise ValueError(f"left and right must have the same shape, got {left.shape} and {right.shape}")
    out = np.zeros(len(left), dtype=np.int64)
    ids, w = rows.ids, rows.weights
    if rows.item_weights is not None:
        item_w = rows.item_weights
        for lo in range(0, len(left), _CHUNK):
            both = np.concatenate([ids[left[lo : lo + _CHUNK]], ids[right[lo : lo + _CHUNK]]], axis=1)
            both.sort(axis=1)  # values only: stability is moot, and the default (SIMD) sort is ~8x faster
            twin = (both[:, 1:] == both[:, :-1]) & (both[:, 1:] >= 0)
            out[lo : lo + _CHUNK] = np.where(twin, item_w[np.maximum(both[:, 1:], 0)], 0).sum(axis=1)
        return out
    for lo in range(0, len(left), _CHUNK):
        li = left[lo : lo + _CHUNK]
        ri = right[lo : lo + _CHUNK]
        a = ids[li]  # (m, K)
        b = ids[ri]
        b = np.where(b < 0, -2, b)  # padding never matches padding
        hit = (a[:, :, None] == b[:, None, :]).any(axis=2)
        out[lo : lo + _CHUNK] = (w[li].astype(np.int64) * hit).sum(axis=1)
    return out
