"""Contexts packed as fixed-width integer rows, the input format of the overlap kernels.

Row ``i`` holds the item ids of context ``i`` sorted ascending, padded with
``-1`` to a power-of-two width (Triton tiles need one), and a parallel row of
token weights (0 in the padding).  Items are already distinct within a row
(the batch interning turns the second copy of a block into its own item), so a
token-weighted multiset intersection is a plain sum over equal ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["PackedRows", "pack_rows", "PAD"]

PAD = -1


@dataclass(frozen=True)
class PackedRows:
    ids: np.ndarray  # int32[N, K]
    weights: np.ndarray  # int32[N, K]
    #: token weight of every item id, when weights are per item (they always are here); lets the
    #: numpy path sort instead of comparing all K x K cells
    item_weights: np.ndarray | None = None

    @property
    def width(self) -> int:
        return int(self.ids.shape[1])

    def __len__(self) -> int:
        return int(self.ids.shape[0])


def _pow2(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


def pack_rows(lengths: np.ndarray, items: np.ndarray, item_weights: np.ndarray, pow2: bool = True) -> PackedRows:
    """Pack CSR contexts (``lengths``, flat ``items``) with per-item token weights.

    ``pow2`` rounds the width up to a power of two, which the Triton kernel
    needs; the numpy path runs faster on the exact width.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    n = len(lengths)
    width = max(1, int(lengths.max()) if n else 1)
    if pow2:
        width = _pow2(width)
    starts = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    row = np.repeat(np.arange(n, dtype=np.int64), lengths)
    order = np.argsort(row * (int(items.max()) + 1 if len(items) else 1) + items)  # unique keys
    col = np.arange(len(items), dtype=np.int64) - starts[row]
    ids = np.full((n, width), PAD, dtype=np.int32)
    w = np.zeros((n, width), dtype=np.int32)
    sorted_items = items[order]
    ids[row, col] = sorted_items
    item_weights = np.asarray(item_weights, dtype=np.int64)
    w[row, col] = item_weights[sorted_items]
    return PackedRows(ids, w, item_weights)
