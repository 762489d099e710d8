"""Execution order for a batch: shared prefixes back to back, nobody waits too long.

Once every context's block order is fixed, running the prompts in
lexicographic order of their block sequences visits the prefix tree depth
first, which keeps a shared prefix in an LRU cache for all of its users (for
a cache at least as large as one request this is optimal: SGLang's LPM/DFS
result).  The same sort gives the tree's size: the prefix reuse of a batch is
the sum of the longest common prefixes of lexicographic neighbours.

Depth-first order alone can push one request to the very end of a large
batch, so it is merged with arrival order under an *aging bound*: request
``i`` (its position in the input) runs at position ``i + max_delay`` at the
latest.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["lexicographic_order", "arrival_dfs_order", "prefix_reuse", "apply_aging_bound", "schedule"]

#: above this many matrix cells the sort falls back to Python tuples (a few very long contexts)
_MAX_CELLS = 50_000_000
#: ... or above this many times the cells the sequences fill: a context-by-width matrix is as wide
#: as the longest context for every context, so one long context among short ones would make it
#: mostly padding (and the depth-first order loops over its width)
_MAX_PADDING = 16


def _padded(lengths: np.ndarray, starts: np.ndarray, seq: np.ndarray) -> np.ndarray | None:
    n = len(lengths)
    width = int(lengths.max()) if n else 0
    cells = n * max(width, 1)
    if cells > _MAX_CELLS or cells > max(_MAX_PADDING * len(seq), 1 << 16):
        return None
    mat = np.full((n, max(width, 1)), -1, dtype=np.int64)
    ctx = np.repeat(np.arange(n, dtype=np.int64), lengths)
    col = np.arange(len(seq), dtype=np.int64) - starts[ctx]
    mat[ctx, col] = seq
    return mat


def lexicographic_order(lengths: np.ndarray, starts: np.ndarray, seq: np.ndarray) -> np.ndarray:
    """Context indices sorted by their item sequence (a proper prefix first, stable on ties)."""
    return _lexicographic(lengths, starts, seq, _padded(lengths, starts, seq))


def _lexicographic(lengths: np.ndarray, starts: np.ndarray, seq: np.ndarray, mat: np.ndarray | None) -> np.ndarray:
    """:func:`lexicographic_order` from the padded matrix already built (None: too large to build)."""
    n = len(lengths)
    if mat is None:
        rows = [tuple(seq[starts[c] : starts[c + 1]].tolist()) for c in range(n)]
        return np.asarray(sorted(range(n), key=lambda c: (rows[c], c)), dtype=np.int64)
    keys = [np.arange(n)] + [mat[:, c] for c in range(mat.shape[1] - 1, -1, -1)]
    return np.lexsort(keys)


def arrival_dfs_order(lengths: np.ndarray, starts: np.ndarray, seq: np.ndarray) -> np.ndarray:
    """A depth-first order of the prefix tree that visits earlier arrivals first.

    Any depth-first order keeps every shared prefix contiguous (what an LRU
    cache needs); among them, this one orders the children of each tree node
    by the earliest arrival (input index) in their subtree.  The result stays
    close to arrival order at every level, so the aging bound rarely has to
    pull a request out of its subtree, which would cost cache hits.
    """
    n = len(lengths)
    if n < 2:
        return np.arange(n, dtype=np.int64)
    mat = _padded(lengths, starts, seq)
    if mat is None:
        return _arrival_dfs_by_tree(lengths, starts, seq)
    lex = _lexicographic(lengths, starts, seq, mat)
    rows = mat[lex]
    width = rows.shape[1]
    # new_group[r, d]: row r starts a new group of identical prefixes [0..d]
    differs = np.ones((n, width), dtype=bool)
    differs[1:] = rows[1:] != rows[:-1]
    new_group = np.logical_or.accumulate(differs, axis=1)
    keys = np.empty((n, width), dtype=np.int64)
    for d in range(width):
        heads = np.flatnonzero(new_group[:, d])
        earliest = np.minimum.reduceat(lex, heads)
        keys[:, d] = np.repeat(earliest, np.diff(np.r_[heads, n]))
    keys[rows < 0] = -1  # a context that ends here comes before its extensions
    order = np.lexsort([lex] + [keys[:, d] for d in range(width - 1, -1, -1)])
    return lex[order]


def _arrival_dfs_by_tree(lengths: np.ndarray, starts: np.ndarray, seq: np.ndarray) -> np.ndarray:
    """:func:`arrival_dfs_order` on a prefix tree of dicts, for batches whose padded matrix is too large.

    Contexts are inserted in arrival order, so each node's children are in
    the order of the earliest arrival below them, and the contexts that end
    at a node (before its extensions) in arrival order: a pre-order walk is
    the same order as the matrix version, in time linear in the items.
    """
    flat, bounds = seq.tolist(), starts.tolist()
    root: list = [{}, []]  # children by item, contexts ending here
    for c in range(len(lengths)):
        node = root
        for item in flat[bounds[c] : bounds[c + 1]]:
            child = node[0].get(item)
            if child is None:
                child = node[0][item] = [{}, []]
            node = child
        node[1].append(c)
    out: list[int] = []
    stack = [root]
    while stack:
        node = stack.pop()
        out.extend(node[1])
        stack.extend(reversed(list(node[0].values())))
    return np.asarray(out, dtype=np.int64)


def prefix_reuse(
    lengths: np.ndarray, starts: np.ndarray, seq: np.ndarray, weights: np.ndarray
) -> tuple[int, np.ndarray]:
    """Tokens a prefix tree of all sequences saves (infinite cache), and the lexicographic order."""
    mat = _padded(lengths, starts, seq)
    order = _lexicographic(lengths, starts, seq, mat)
    if len(order) < 2:
        return 0, order
    if mat is None:
        total = 0
        prev: list[int] = []
        for c in order.tolist():
            cur = seq[starts[c] : starts[c + 1]].tolist()
            for a, b in zip(prev, cur):
                if a != b:
                    break
                total += int(weights[b])
            prev = cur
        return total, order
    sorted_mat = mat[order]
    same = (sorted_mat[1:] == sorted_mat[:-1]) & (sorted_mat[1:] >= 0)
    common = np.cumprod(same, axis=1, dtype=np.int8).astype(bool)
    w = np.where(sorted_mat[1:] >= 0, weights[np.maximum(sorted_mat[1:], 0)], 0)
    return int((w * common).sum()), order


def apply_aging_bound(preferred: Sequence[int], max_delay: int | None) -> list[int]:
    """Merge a preferred order with arrival order so no request is delayed past ``max_delay``.

    Request ``i`` must start at position ``i + max_delay`` at the latest.  At
    each position the request whose deadline has come (there is at most one,
    since deadlines are distinct) goes first; otherwise the next request of
    the preferred order.  The result is a permutation and satisfies every
    deadline: ``position(i) <= i + max_delay``.
    """
    preferred = list(preferred)
    n = len(preferred)
    if max_delay is None or max_delay >= n:
        return preferred
    if max_delay < 0:
        raise ValueError(f"max_delay must be >= 0, got {max_delay}")
    placed = bytearray(n)
    out: list[int] = []
    cursor = 0
    for pos in range(n):
        due = pos - max_delay
        if due >= 0 and not placed[due]:
            pick = due
        else:
            while placed[preferred[cursor]]:
                cursor += 1
            pick = preferred[cursor]
        placed[pick] = 1
        out.append(pick)
    return out


def schedule(sequences: Sequence[Sequence[int]], max_delay: int | None = None) -> list[int]:
    """Depth-first order of ``sequences`` (lists of ints) under the aging bound."""
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    starts = np.zeros(len(sequences) + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    flat = np.fromiter((x for s in sequences for x in s), dtype=np.int64, count=int(starts[-1]))
    return apply_aging_bound(lexicographic_order(lengths, starts, flat).tolist(), max_delay)
