"""A batch of contexts as flat integer arrays, the form every batch algorithm works on.

Blocks become dense *item* ids ranked by batch popularity (0 = the block that
occurs in most contexts, then heavier blocks, then by content hash), so "more
popular first" is simply ascending item order and ties never depend on input
order.  A block repeated inside one context becomes a distinct item for each
copy (``(key, copy)``), which keeps multiset semantics: every algorithm below
permutes items, so every output is a permutation of its input.

Layout is CSR: ``items[starts[c]:starts[c+1]]`` are context ``c``'s items in
input order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .blocks import Block

__all__ = ["InternedBatch", "intern_batch"]

_MASK63 = (1 << 63) - 1


@dataclass
class InternedBatch:
    lengths: np.ndarray  # int64[n]: blocks per context
    starts: np.ndarray  # int64[n+1]: CSR offsets
    items: np.ndarray  # int64[total]: item id of every block, contexts one after another
    weights: np.ndarray  # int64[U]: tokens of each item
    counts: np.ndarray  # int64[U]: occurrences of each item in the batch
    keys: list  # U entries: block key, or (key, copy) for a repeated block

    @property
    def n_contexts(self) -> int:
        return len(self.lengths)

    @property
    def n_items(self) -> int:
        return len(self.weights)

    def context_of(self) -> np.ndarray:
        """Context index of every flat position."""
        return np.repeat(np.arange(self.n_contexts, dtype=np.int64), self.lengths)

    def row(self, c: int) -> np.ndarray:
        return self.items[self.starts[c] : self.starts[c + 1]]

    def gather(self, contexts: np.ndarray) -> np.ndarray:
        """Flat positions of the given contexts' items, context after context."""
        lengths = self.lengths[contexts]
        starts = np.zeros(len(contexts) + 1, dtype=np.int64)
        np.cumsum(lengths, out=starts[1:])
        offset = np.arange(int(starts[-1]), dtype=np.int64) - np.repeat(starts[:-1], lengths)
        return np.repeat(self.starts[contexts], lengths) + offset

    def permuted(self, contexts: np.ndarray) -> "InternedBatch":
        """The same batch with its contexts in the order ``contexts``."""
        lengths = self.lengths[contexts]
        starts = np.zeros(len(contexts) + 1, dtype=np.int64)
        np.cumsum(lengths, out=starts[1:])
        return InternedBatch(lengths, starts, self.items[self.gather(contexts)], self.weights, self.counts, self.keys)

    def canonical_order(self) -> np.ndarray:
        """Contexts sorted by their item *sets* (content only), so arrival order cannot matter."""
        from .schedule import lexicographic_order

        ctx = self.context_of()
        span = max(1, self.n_items)
        sorted_items = self.items[np.argsort(ctx * span + self.items)]  # unique keys: any sort kind
        return lexicographic_order(self.lengths, self.starts, sorted_items)


def intern_batch(contexts: Sequence[Sequence[Block]]) -> InternedBatch:
    n = len(contexts)
    lengths = np.fromiter((len(c) for c in contexts), dtype=np.int64, count=n)
    starts = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    blocks = [b for ctx in contexts for b in ctx]
    # intern by object first (parsing hands out one Block object per distinct text), in C;
    # then merge objects that carry the same key (dict blocks with different labels)
    obj = np.fromiter(map(id, blocks), dtype=np.int64, count=len(blocks))
    _, first_obj, obj_of = np.unique(obj, return_index=True, return_inverse=True)
    first_id: dict = {}
    get_id = first_id.setdefault
    obj_key = np.fromiter(
        (get_id(blocks[p].key, len(first_id)) for p in first_obj.tolist()), dtype=np.int64, count=len(first_obj)
    )
    raw_arr = obj_key[obj_of.reshape(-1)]
    keys: list = list(first_id)
    # a block repeated inside one context: its later copies become items of their own
    ctx = np.repeat(np.arange(n, dtype=np.int64), lengths)
    if len(raw_arr) > 1:
        # (context, key) codes sorted: a repeat is two equal neighbours (no context-by-width matrix,
        # whose size one very long context would set for the whole batch)
        codes = np.sort(ctx * max(1, len(keys)) + raw_arr)
        twins = codes[1:][codes[1:] == codes[:-1]]
        repeats = np.unique(twins // max(1, len(keys)))
        for c in repeats.tolist():
            copies: dict = {}
            for p in range(int(starts[c]), int(starts[c + 1])):
                k = blocks[p].key
                copy = copies.get(k, 0)
                copies[k] = copy + 1
                if copy:
                    raw_arr[p] = get_id((k, copy), len(first_id))
        if len(repeats):
            keys = list(first_id)
    _, first_pos = np.unique(raw_arr, return_index=True)  # earliest position of each id (ids are 0..U-1)
    w = np.fromiter((blocks[p].tokens for p in first_pos.tolist()), dtype=np.int64, count=len(keys))
    counts = np.bincount(raw_arr, minlength=len(keys)).astype(np.int64)
    tie = np.fromiter(
        ((k if isinstance(k, int) else k[0] + k[1]) & _MASK63 for k in keys), dtype=np.int64, count=len(keys)
    )
    order = np.lexsort((tie, -w, -counts))  # most frequent first, then heavier, then by hash
    rank = np.empty(len(keys), dtype=np.int64)
    rank[order] = np.arange(len(keys), dtype=np.int64)
    return InternedBatch(lengths, starts, rank[raw_arr], w[order], counts[order], [keys[i] for i in order])
