"""Batch reorder strategy 1: grow the prefix tree top down, one level at a time.

Every context belongs to a *group*, the contexts whose placed blocks so far
are identical (one node of the tree being built).  Items that every member
of a group holds are placed first, all at once (that never splits the
group).  Otherwise, at each level every context picks, among its unplaced items, the one with the highest
``(copies in its group - 1) * tokens``: the tokens that putting it next would
share with the rest of its group; ties go to the more popular item.  Contexts
that picked the same item form a child group.  A context whose best item is
shared with nobody, or that is alone in its group, stops, and its remaining
items follow in popularity order.

Each level is one sort and a few segmented reductions over the (context,
item) pairs still in play; pairs leave as soon as their context stops, so the
cost is near ``total_items * log``.  The greedy is myopic: it lets globally
popular blocks split topic clusters, which is why :mod:`.merge_tree` usually
wins on clustered batches; :mod:`.batch_reorder` runs both and keeps the
better tree.

Given the other strategy's reuse (``beat``), the greedy gives up as soon as
it provably cannot reach it: the reuse placed so far plus, for every group,
``sum((copies - 1) * tokens)`` over its unplaced items (no later split can
share more) is an upper bound on its final reuse.  On long contexts (memory
chat, 65 blocks each) that saves most of its levels.
"""

from __future__ import annotations

import numpy as np

__all__ = ["level_greedy"]


def level_greedy(
    lengths: np.ndarray,
    starts: np.ndarray,
    items: np.ndarray,
    weights: np.ndarray,
    group0: np.ndarray,
    beat: int | None = None,
) -> np.ndarray | None:
    """Flat sequence (CSR layout like ``items``) of every context's new item order.

    ``None`` when ``beat`` is given and the tree provably shares fewer tokens
    than that (reuse counted within the starting groups ``group0``).
    """
    n = len(lengths)
    n_items = max(1, len(weights))
    ctx = np.repeat(np.arange(n, dtype=np.int64), lengths)
    flat = np.arange(len(items), dtype=np.int64)
    group = group0.astype(np.int64, copy=True)
    step = np.full(len(items), -1, dtype=np.int64)  # level at which each position was placed

    sizes = np.bincount(group, minlength=int(group.max()) + 1 if n else 1)
    keep = (sizes[group] > 1)[ctx]
    live_ctx, live_item, live_flat = ctx[keep], items[keep], flat[keep]

    level = 0
    placed_reuse = 0  # tokens shared by the levels placed so far
    while len(live_ctx):
        g = group[live_ctx]
        keys, inverse, cnt = np.unique(g * n_items + live_item, return_inverse=True, return_counts=True)
        key_gain = (cnt - 1) * weights[keys % n_items]  # tokens each (group, item) could still share
        if beat is not None and placed_reuse + int(key_gain.sum()) < beat:
            return None
        # items every live member of a group holds go first, all at once: placing such an item
        # next never splits the group, so it costs no sharing and saves one level per item
        members = np.bincount(g[np.r_[True, live_ctx[1:] != live_ctx[:-1]]], minlength=int(group.max()) + 1)
        common = (cnt[inverse] == members[g]) & (members[g] > 1)
        if common.any():
            placed_reuse += int(key_gain[cnt == members[keys // n_items]].sum())
            step[live_flat[common]] = level
            level += 1
            live_ctx, live_item, live_flat = live_ctx[~common], live_item[~common], live_flat[~common]
            continue
        score = (cnt[inverse] - 1) * weights[live_item]
        comp = score * n_items + (n_items - 1 - live_item)
        seg = np.flatnonzero(np.r_[True, live_ctx[1:] != live_ctx[:-1]])
        best = np.maximum.reduceat(comp, seg)
        sharing = best // n_items > 0
        go_ctx = live_ctx[seg][sharing]
        if len(go_ctx) == 0:
            break
        go_item = (n_items - 1 - best % n_items)[sharing]
        pick_of = np.full(n, -1, dtype=np.int64)
        pick_of[go_ctx] = go_item
        picked = pick_of[live_ctx] == live_item
        step[live_flat[picked]] = level
        level += 1
        child_keys, child = np.unique(group[go_ctx] * n_items + go_item, return_inverse=True)
        child_sizes = np.bincount(child)
        placed_reuse += int(((child_sizes - 1) * weights[child_keys % n_items]).sum())
        group[go_ctx] = child + int(group.max()) + 1
        still = np.zeros(n, dtype=bool)
        still[go_ctx] = child_sizes[child] > 1
        keep = still[live_ctx] & ~picked
        live_ctx, live_item, live_flat = live_ctx[keep], live_item[keep], live_flat[keep]
        # a group of two can only go on sharing their common items: place them all now
        pair = np.zeros(n, dtype=bool)
        pair[go_ctx] = child_sizes[child] == 2
        in_pair = pair[live_ctx]
        if in_pair.any():
            pg, pi = group[live_ctx[in_pair]], live_item[in_pair]
            pair_keys, inv, cnt = np.unique(pg * n_items + pi, return_inverse=True, return_counts=True)
            placed_reuse += int(weights[pair_keys % n_items][cnt == 2].sum())
            common = cnt[inv] == 2
            step[live_flat[in_pair][common]] = level
            level += 1
            live_ctx, live_item, live_flat = live_ctx[~in_pair], live_item[~in_pair], live_flat[~in_pair]

    # placed items by level (ties by popularity), then the rest by popularity, inside each context
    placed = step >= 0
    key2 = np.where(placed, step, level) * n_items + items
    order = np.lexsort((key2, ctx))
    return items[order]
