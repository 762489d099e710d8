"""Batch reorder strategy 2: merge contexts into a tree of shared *cores*, strongest pairs first.

A cluster of contexts has a *core*: the items all of its members contain.
Putting the core first in every member's order (in one canonical order)
makes all members share it as a prefix.  Merging two clusters ``A`` and ``B``
under a parent whose core is ``core(A) & core(B)`` gains exactly
``tokens(core(A) & core(B))`` of prefix reuse, whatever the cluster sizes:
the parent's core is shared by ``|A| + |B| - 1`` more members than before,
and ``A``'s and ``B``'s own parts lose exactly that much.  So the total reuse
of a merge tree is the sum of its merge gains, and merging the pair with the
largest gain first is a Kruskal-style greedy over the candidate pairs of
:mod:`.candidates`.

The greedy runs as *reciprocal nearest-neighbour* rounds: in each round every
cluster finds its best partner by exact current gain (one call of the overlap
kernel over all live candidate pairs), and all mutual best pairs merge at
once.  The gain is a reducible linkage (a merged cluster is never closer to a
third cluster than either part was), so merging mutual best pairs in
parallel gives the same tree as merging the single best pair at a time,
with a few vectorised rounds instead of a Python loop per pair.

Tree shape: when the merged core equals one side's core, the other side
becomes a child of that side instead of creating a new node, so cores grow
strictly from root to leaf and every path has at most one node per item.
Order: each item of a context is placed at the topmost ancestor whose core
holds it, and items placed at the same node follow popularity order
(ascending item id), so sibling clusters that share a popular item still line
it up.

This is the offline analogue of hierarchical clustering (which the reference
builds from an all-pairs distance matrix and scipy's average linkage) at
near-linear cost, with token weights instead of block counts.
"""

from __future__ import annotations

import numpy as np

from .kernels import OverlapBackend, PackedRows, pack_rows, pair_overlap

__all__ = ["merge_tree"]


def _best_partner(a: np.ndarray, b: np.ndarray, gain: np.ndarray, n_nodes: int) -> np.ndarray:
    """For every node, the index of its best edge (max gain, then smaller partner id); -1 if none.

    Edges are distinct node pairs, so the (gain, partner) score of a node's
    edges never ties and the best edge is the one reaching the node's maximum.
    """
    score_a = gain * n_nodes + (n_nodes - 1 - b)  # score of edge e seen from a
    score_b = gain * n_nodes + (n_nodes - 1 - a)
    top = np.full(n_nodes, -1, dtype=np.int64)
    np.maximum.at(top, a, score_a)
    np.maximum.at(top, b, score_b)
    best = np.full(n_nodes, -1, dtype=np.int64)
    e = np.arange(len(a), dtype=np.int64)
    hit_a = score_a == top[a]
    best[a[hit_a]] = e[hit_a]
    hit_b = score_b == top[b]
    best[b[hit_b]] = e[hit_b]
    return best


def _add_adoptions(a, b, gain, best, core_w, n_nodes, ma, mb, mg, keep_a, keep_b):
    """Add the merges that are mutual up to ties: a node adopting every partner whose best edge it is.

    A node ``X`` can never gain more than its own core with anyone, so an
    edge that shares ``X``'s whole core is one of ``X``'s best edges, tied
    with every other such edge.  If it is also the partner ``Y``'s best
    edge, the pair is mutually best (up to that tie) and ``X`` adopts ``Y``
    without changing its core, so all such adoptions of one round are
    independent and happen at once.  Without this a popular core absorbs
    its members one per round (thousands of rounds on 100k contexts).
    Left out: adopters that another merge of this round moves, and chains
    (an adopter that is itself being adopted).
    """
    e = np.arange(len(a))
    side_b = (best[b] == e) & (best[a] != e) & (gain == core_w[a])  # a adopts b
    side_a = (best[a] == e) & (best[b] != e) & (gain == core_w[b])  # b adopts a
    if not (side_a.any() or side_b.any()):
        return ma, mb, mg, keep_a, keep_b
    xs = np.concatenate([a[side_b], b[side_a]])
    ys = np.concatenate([b[side_b], a[side_a]])
    gs = np.concatenate([gain[side_b], gain[side_a]])
    moved = np.zeros(n_nodes, dtype=bool)  # nodes this round's mutual merges re-parent
    moved[mb[keep_a]] = True
    moved[ma[keep_b]] = True
    fresh = ~keep_a & ~keep_b
    moved[ma[fresh]] = True
    moved[mb[fresh]] = True
    adopted = np.zeros(n_nodes, dtype=bool)
    adopted[ys] = True
    ok = ~moved[xs] & ~adopted[xs]
    if not ok.any():
        return ma, mb, mg, keep_a, keep_b
    k = int(ok.sum())
    return (
        np.concatenate([ma, xs[ok]]),
        np.concatenate([mb, ys[ok]]),
        np.concatenate([mg, gs[ok]]),
        np.concatenate([keep_a, np.ones(k, dtype=bool)]),
        np.concatenate([keep_b, np.zeros(k, dtype=bool)]),
    )


def merge_tree(
    lengths: np.ndarray,
    starts: np.ndarray,
    items: np.ndarray,
    weights: np.ndarray,
    left: np.ndarray,
    right: np.ndarray,
    backend: OverlapBackend | None = None,
) -> np.ndarray:
    """Flat item sequence (CSR layout like ``items``) from candidate pairs ``(left, right)``."""
    n = len(lengths)
    if n == 0:
        return items.copy()
    rows = pack_rows(lengths, items, weights, pow2=backend is not None and backend.name == "triton")
    width = rows.width
    # node table: leaves 0..n-1, then merged nodes; at most n-1 merges
    ids = np.full((2 * n, width), -1, dtype=np.int32)
    wts = np.zeros((2 * n, width), dtype=np.int32)
    ids[:n], wts[:n] = rows.ids, rows.weights
    core_w = np.zeros(2 * n, dtype=np.int64)
    core_w[:n] = wts[:n].sum(axis=1)
    parent = np.full(2 * n, -1, dtype=np.int64)
    n_nodes = n

    a, b = np.asarray(left, dtype=np.int64), np.asarray(right, dtype=np.int64)
    gain = np.full(len(a), -1, dtype=np.int64)  # -1: not scored against the current cores
    rounds = 0
    while len(a):
        rounds += 1
        stale = gain < 0
        if stale.any():
            table = PackedRows(ids[:n_nodes], wts[:n_nodes], rows.item_weights)
            gain[stale] = pair_overlap(table, a[stale], b[stale], backend)
        live = gain > 0
        a, b, gain = a[live], b[live], gain[live]
        if not len(a):
            break
        best = _best_partner(a, b, gain, n_nodes)
        e = np.arange(len(a))
        mutual = (best[a] == e) & (best[b] == e)
        ma, mb, mg = a[mutual], b[mutual], gain[mutual]
        # a side whose whole core is shared keeps its node and adopts the other side
        keep_a = mg == core_w[ma]
        keep_b = ~keep_a & (mg == core_w[mb])
        ma, mb, mg, keep_a, keep_b = _add_adoptions(a, b, gain, best, core_w, n_nodes, ma, mb, mg, keep_a, keep_b)
        fresh = ~keep_a & ~keep_b
        target = np.where(keep_a, ma, np.where(keep_b, mb, -1))
        k = int(fresh.sum())
        new_ids = np.arange(n_nodes, n_nodes + k, dtype=np.int64)
        target[fresh] = new_ids
        parent[mb[keep_a]] = ma[keep_a]
        parent[ma[keep_b]] = mb[keep_b]
        parent[ma[fresh]] = new_ids
        parent[mb[fresh]] = new_ids
        if k:
            fa, fb = ma[fresh], mb[fresh]
            row_a = ids[fa]
            inside = _held_by(row_a, ids[fb])
            ids[new_ids] = np.where(inside, row_a, -1)
            wts[new_ids] = np.where(inside, wts[fa], 0)
            core_w[new_ids] = mg[fresh]
        n_nodes += k
        # re-point every edge at the merged clusters, drop self-loops and duplicates
        rep = np.arange(n_nodes, dtype=np.int64)
        rep[ma] = target
        rep[mb] = target
        moved = (rep[a] != a) | (rep[b] != b)
        a, b = rep[a], rep[b]
        lo, hi = np.minimum(a, b), np.maximum(a, b)
        keep = lo != hi
        gain = np.where(moved, -1, gain)[keep]
        code, first = np.unique(lo[keep] * n_nodes + hi[keep], return_index=True)
        a, b, gain = code // n_nodes, code % n_nodes, gain[first]
    return _emit(n, n_nodes, starts, items, ids[:n_nodes], parent[:n_nodes])


#: rows up to this wide compare every cell pair; wider ones use a sorted lookup
_BROADCAST_WIDTH = 64


def _held_by(row_a: np.ndarray, row_b: np.ndarray) -> np.ndarray:
    """``inside[p, j]``: item ``row_a[p, j]`` is also in ``row_b[p]`` (``-1`` cells hold nothing).

    Per-pair codes and one sorted lookup, so the work grows with the cells,
    not with the square of the row width (one long context sets the width
    of every row).
    """
    k, width = row_a.shape
    if not k:
        return np.zeros((0, width), dtype=bool)
    if width <= _BROADCAST_WIDTH:  # narrow rows: comparing all cells is cheaper than sorting
        return (row_a[:, :, None] == np.where(row_b < 0, -2, row_b)[:, None, :]).any(axis=2)
    span = int(max(row_a.max(), row_b.max())) + 2  # values -1 .. max, shifted to 0 .. span-1
    pair = np.arange(k, dtype=np.int64)[:, None] * span
    held = np.unique((pair + row_b + 1)[row_b >= 0])
    codes = pair + row_a + 1
    pos = np.minimum(np.searchsorted(held, codes), max(0, len(held) - 1))
    return (row_a >= 0) & (held[pos] == codes) if len(held) else np.zeros_like(row_a, dtype=bool)


def _emit(n: int, n_nodes: int, starts: np.ndarray, items: np.ndarray, ids: np.ndarray, parent: np.ndarray):
    """Order each context's items by the depth of the topmost ancestor core holding them."""
    # depth of every node (roots 0): iterate parent pointers; paths are short (cores grow strictly)
    depth = np.zeros(n_nodes, dtype=np.int64)
    up = parent.copy()
    while True:
        has = up >= 0
        if not has.any():
            break
        depth[has] += 1
        up[has] = parent[up[has]]
    # membership test "node holds item" by sorted codes
    n_items = int(items.max()) + 1 if len(items) else 1
    node_idx, col = np.nonzero(ids >= 0)
    codes = np.sort(node_idx.astype(np.int64) * n_items + ids[node_idx, col])

    def holds(node: np.ndarray, item: np.ndarray) -> np.ndarray:
        q = node * n_items + item
        pos = np.searchsorted(codes, q)
        pos = np.minimum(pos, len(codes) - 1)
        return codes[pos] == q

    ctx = np.repeat(np.arange(n, dtype=np.int64), np.diff(starts))
    entry = ctx.copy()  # topmost ancestor found so far that holds the item
    active = np.arange(len(items), dtype=np.int64)
    while len(active):
        par = parent[entry[active]]
        ok = par >= 0
        ok[ok] = holds(par[ok], items[active[ok]])
        entry[active[ok]] = par[ok]
        active = active[ok]
    n_depth = int(depth.max()) + 1
    if n * n_depth * n_items < (1 << 62):
        order = np.argsort((ctx * n_depth + depth[entry]) * n_items + items)  # unique keys
    else:
        order = np.lexsort((items, depth[entry], ctx))
    return items[order]
