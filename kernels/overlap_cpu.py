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

#: pairs compared per chunk at most
_CHUNK = 1 << 16
#: temporary cells per chunk at most (pairs x row width, or x width squared for the cube), so a
#: batch with very long rows works through them in smaller chunks instead of allocating gigabytes
_CHUNK_CELLS = 1 << 22


def pair_overlap_cpu(rows: PackedRows, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    left = np.asarray(left, dtype=np.int64)
    right = np.asarray(right, dtype=np.int64)
    if left.shape != right.shape:
        raise ValueError(f"left and right must have the same shape, got {left.shape} and {right.shape}")
    out = np.zeros(len(left), dtype=np.int64)
    ids, w = rows.ids, rows.weights
    width = max(1, rows.width)
    if rows.item_weights is not None:
        item_w = rows.item_weights
        chunk = max(1, min(_CHUNK, _CHUNK_CELLS // (2 * width)))
        for lo in range(0, len(left), chunk):
            both = np.concatenate([ids[left[lo : lo + chunk]], ids[right[lo : lo + chunk]]], axis=1)
            both.sort(axis=1)  # values only: stability is moot, and the default (SIMD) sort is ~8x faster
            twin = (both[:, 1:] == both[:, :-1]) & (both[:, 1:] >= 0)
            out[lo : lo + chunk] = np.where(twin, item_w[np.maximum(both[:, 1:], 0)], 0).sum(axis=1)
        return out
    chunk = max(1, min(_CHUNK, _CHUNK_CELLS // (width * width)))
    for lo in range(0, len(left), chunk):
        li = left[lo : lo + chunk]
        ri = right[lo : lo + chunk]
        a = ids[li]  # (m, K)
        b = ids[ri]
        b = np.where(b < 0, -2, b)  # padding never matches padding
        hit = (a[:, :, None] == b[:, None, :]).any(axis=2)
        out[lo : lo + chunk] = (w[li].astype(np.int64) * hit).sum(axis=1)
    return out
