"""Offline reorder of a whole batch: per-context block orders plus an execution order.

Finding the orders that minimise the batch's prefix tree is NP-hard (Comer
and Sethi's minimum-trie results), so two fast greedy strategies run side by
side and the one whose tree saves more tokens wins:

* :func:`.merge_tree.merge_tree`: clusters contexts bottom-up by shared
  cores (strong on topical batches);
* :func:`.level_greedy.level_greedy`: grows the tree top-down by group
  popularity (strong when a few blocks are in almost every context); when
  several strategies are configured it is skipped above
  ``LEVEL_GREEDY_MAX_CONTEXTS`` contexts, where it never won.

Both are near-linear; neither looks at all pairs.  The winner is then
polished by :mod:`.local_search` (contexts re-inserted along their best
existing path) when the batch is small enough for that Python pass.  Contexts may come with a
fixed *prefix* (input positions that must come first, e.g. the blocks the
engine still holds from an earlier request): those contexts start in a group
of their own, keyed by the prefix, and only share further inside that group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .blocks import Block
from .candidates import CandidateConfig, candidate_pairs
from .interning import InternedBatch, intern_batch
from .kernels import OverlapBackend
from .level_greedy import level_greedy
from .local_search import POLISH_MAX_ITEMS, polish
from .merge_tree import merge_tree
from .schedule import arrival_dfs_order, prefix_reuse

__all__ = ["BatchPlan", "plan_batch", "STRATEGIES"]

STRATEGIES = ("merge_tree", "level_greedy")
#: the level greedy is skipped above this many contexts: at that size it never won a benchmark
#: workload (the merge tree shared about twice as much) and it costs a fifth of the planning time
LEVEL_GREEDY_MAX_CONTEXTS = 50_000
#: the strategies plan a context's blocks up to this many times the batch's mean context length
WIDTH_OVER_MEAN = 4
#: ... and never fewer than this many
MIN_PLAN_WIDTH = 64


@dataclass
class BatchPlan:
    """Result of :func:`plan_batch`."""

    batch: InternedBatch
    orders: list[list[int]]  # orders[c][j]: input position of the block placed j-th in context c
    sequence: np.ndarray  # flat CSR item sequence of the chosen orders
    dfs_order: list[int]  # contexts in depth-first order, earlier arrivals first (schedule.arrival_dfs_order)
    strategy: str
    reuse_tokens: int  # tokens the batch's prefix tree shares (infinite cache, block granularity)
    reuse_by_strategy: dict


def _split_prefixes(batch: InternedBatch, prefixes: Sequence[Sequence[int]] | None):
    """Fixed-prefix mask over flat positions and the starting group of every context."""
    n = batch.n_contexts
    fixed = np.zeros(len(batch.items), dtype=bool)
    group = np.zeros(n, dtype=np.int64)
    rank = np.zeros(len(batch.items), dtype=np.int64)  # order of fixed positions inside their prefix
    if prefixes is None:
        return fixed, group, rank
    seen: dict[tuple, int] = {(): 0}
    for c, pre in enumerate(prefixes):
        if not pre:
            continue
        idx = batch.starts[c] + np.asarray(pre, dtype=np.int64)
        fixed[idx] = True
        rank[idx] = np.arange(len(pre))
        group[c] = seen.setdefault(tuple(batch.items[idx].tolist()), len(seen))
    return fixed, group, rank


def plan_width(lengths: np.ndarray) -> int:
    """The most blocks of one context the strategies plan with.

    Their arrays are as wide as the longest context, for every context, so
    one very long context in a batch of short ones would cost time and
    memory in proportion to the batch size times its length.  The width is
    a few times the mean context (never under ``MIN_PLAN_WIDTH``): a batch of
    contexts of similar sizes is planned whole.
    """
    n = len(lengths)
    if not n:
        return MIN_PLAN_WIDTH
    return max(MIN_PLAN_WIDTH, -(-WIDTH_OVER_MEAN * int(lengths.sum()) // n))


def _within_width(lengths: np.ndarray, starts: np.ndarray, items: np.ndarray):
    """Contexts cut to :func:`plan_width` blocks (their most popular: smallest item ids), and the cut tails.

    Returns ``(lengths, starts, items, tails)``; ``tails`` is None when no
    context is cut, else ``(context, item)`` arrays of the blocks left out,
    by context and then popularity.
    """
    width = plan_width(lengths)
    if not len(lengths) or int(lengths.max()) <= width:
        return lengths, starts, items, None
    n = len(lengths)
    ctx = np.repeat(np.arange(n, dtype=np.int64), lengths)
    order = np.lexsort((items, ctx))  # by context, then item id (popularity)
    rank = np.arange(len(order), dtype=np.int64) - starts[ctx[order]]
    kept = np.sort(order[rank < width])  # in input order within each context
    cut = order[rank >= width]
    new_lengths = np.minimum(lengths, width)
    new_starts = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(new_lengths, out=new_starts[1:])
    return new_lengths, new_starts, items[kept], (ctx[cut], items[cut])


def _with_tails(lengths: np.ndarray, seq: np.ndarray, tails: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """A strategy's sequence of cut contexts with each context's cut tail after its planned blocks."""
    tail_ctx, tail_items = tails
    owner = np.concatenate([np.repeat(np.arange(len(lengths), dtype=np.int64), lengths), tail_ctx])
    part = np.concatenate([np.zeros(len(seq), np.int64), np.ones(len(tail_items), np.int64)])
    within = np.concatenate([np.arange(len(seq), dtype=np.int64), np.arange(len(tail_items), dtype=np.int64)])
    return np.concatenate([seq, tail_items])[np.lexsort((within, part, owner))]


def plan_batch(
    contexts: Sequence[Sequence[Block]],
    prefixes: Sequence[Sequence[int]] | None = None,
    backend: OverlapBackend | None = None,
    strategies: Sequence[str] = STRATEGIES,
    candidates: CandidateConfig | None = None,
) -> BatchPlan:
    """Plan orders for ``contexts``; ``prefixes[c]`` optionally fixes input positions to go first.

    The contexts are first put in a canonical order (by their block sets), so
    the plan does not depend on the order the batch arrived in.
    """
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown or not strategies:
        raise ValueError(f"strategies: unknown {unknown or 'empty list'}; choose from {STRATEGIES}")
    original = intern_batch(contexts)
    canon = original.canonical_order()
    batch = original.permuted(canon)
    if prefixes is not None:
        prefixes = [prefixes[c] for c in canon.tolist()]
    plan = _plan_interned(batch, prefixes, backend, strategies, candidates or CandidateConfig())
    # back to the caller's context numbering
    back = canon.tolist()
    orders: list[list[int]] = [[] for _ in back]
    for new, old in enumerate(back):
        orders[old] = plan.orders[new]
    plan.orders = orders
    plan.sequence = plan.sequence[batch.gather(np.argsort(canon))]
    plan.dfs_order = arrival_dfs_order(original.lengths, original.starts, plan.sequence).tolist()
    plan.batch = original
    return plan


def _plan_interned(batch, prefixes, backend, strategies, candidates) -> BatchPlan:
    n = batch.n_contexts
    ctx = batch.context_of()
    fixed, group, fixed_rank = _split_prefixes(batch, prefixes)
    free = ~fixed
    r_lengths = np.bincount(ctx[free], minlength=n).astype(np.int64)
    r_starts = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(r_lengths, out=r_starts[1:])
    r_items = batch.items[free]
    # the strategies see each context's most popular blocks only, up to a width the batch can
    # afford; a longer context's other blocks follow its planned ones, and the polish sees them all
    r_lengths, r_starts, r_items, tails = _within_width(r_lengths, r_starts, r_items)

    if n > LEVEL_GREEDY_MAX_CONTEXTS and len(strategies) > 1:
        strategies = [s for s in strategies if s != "level_greedy"]
    results: dict[str, np.ndarray] = {}
    scored: dict[str, tuple] = {}
    pairs = None  # the merge tree's scored candidate pairs, reused to bound the polish
    for name in strategies:
        if name == "merge_tree":
            left, right, shared = pairs = candidate_pairs(
                r_lengths, r_items, batch.weights, group, candidates, backend
            )
            r_seq = merge_tree(r_lengths, r_starts, r_items, batch.weights, left, right, backend)
        else:
            # without fixed prefixes its own accounting is the whole tree's reuse, so it can stop
            # as soon as it provably cannot beat the best tree so far
            beat = max(v[0] for v in scored.values()) if scored and not fixed.any() else None
            r_seq = level_greedy(r_lengths, r_starts, r_items, batch.weights, group, beat)
            if r_seq is None:
                continue
        if tails is not None:
            r_seq = _with_tails(r_lengths, r_seq, tails)
        # full sequence: fixed prefix (in its given order), then the strategy's order
        part = np.concatenate([np.zeros(int(fixed.sum()), np.int64), np.ones(len(r_seq), np.int64)])
        owner = np.concatenate([ctx[fixed], ctx[free]])
        within = np.concatenate([fixed_rank[fixed], np.arange(len(r_seq), dtype=np.int64)])
        values = np.concatenate([batch.items[fixed], r_seq])
        results[name] = values[np.lexsort((within, part, owner))]
        scored[name] = prefix_reuse(batch.lengths, batch.starts, results[name], batch.weights)

    best = max(scored, key=lambda s: (scored[s][0], -strategies.index(s)))
    seq = results[best]
    reuse, order = scored[best]
    if len(batch.items) <= POLISH_MAX_ITEMS:
        fixed_len = np.bincount(ctx[fixed], minlength=n)
        limit = None  # each context's best candidate overlap bounds what the polish can find for it
        if pairs is not None:
            limit = np.zeros(n, dtype=np.int64)
            np.maximum.at(limit, pairs[0], pairs[2])
            np.maximum.at(limit, pairs[1], pairs[2])
        polished = polish(batch.lengths, batch.starts, seq, batch.weights, fixed_len, limit=limit)
        p_reuse, p_order = prefix_reuse(batch.lengths, batch.starts, polished, batch.weights)
        scored[best + "+polish"] = (p_reuse, p_order)
        if p_reuse > reuse:
            best, seq, reuse, order = best + "+polish", polished, p_reuse, p_order

    # positions: item -> input position inside each context (items are distinct within a context)
    n_items = max(1, batch.n_items)
    original = ctx * n_items + batch.items
    sort_idx = np.argsort(original)  # codes are unique
    found = sort_idx[np.searchsorted(original[sort_idx], ctx * n_items + seq)]
    positions = (found - batch.starts[ctx]).tolist()
    bounds = batch.starts.tolist()
    orders = [positions[bounds[c] : bounds[c + 1]] for c in range(n)]
    return BatchPlan(
        batch=batch,
        orders=orders,
        sequence=seq,
        dfs_order=order.tolist(),
        strategy=best,
        reuse_tokens=reuse,
        reuse_by_strategy={k: v[0] for k, v in scored.items()},
    )
