"""Upper bounds on exact-prefix reuse, and exact optima of small batches.

Setting: request ``i`` holds a
multiset ``S_i`` of blocks with token weights ``w``; a method picks an order
of every request's blocks.  With an unlimited cache, the tokens reused are
``sum_i |s_i| - |trie|``, the tokens the prefix tree of all orders shares,
whatever the execution order.  Weights here are the tokens a block occupies
in the prompt (its text plus its ``[k] `` line label), so these bounds are in
the same unit as the simulator's page-1 hits minus the preamble.  A block
repeated inside one request counts as distinct copies (``(text, 1)``,
``(text, 2)``, ...), i.e. multiset semantics.

Bounds (each is a valid upper bound for every method; the tighter, the more
honest the "share of bound" in the report):

* :func:`dedup_bound`: total minus union.  Reachable only by
  position-independent reuse.
* :func:`mst_bound`: the maximum spanning tree of the overlap graph
  ``w_ij = w(S_i & S_j)`` over **all** pairs (exact, dense; refused above
  ``max_n``).  Sorting the final orders lexicographically, the trie's reuse
  is the sum of the common prefixes of neighbours, each at most their
  overlap, and the neighbour links form a spanning path.
* :func:`nested_group_bound`: respects *nesting*, which the MST ignores.  A
  trie is a laminar family of request groups: group ``G`` shares the path
  to its branching node, at most ``I(G) = w(intersection of G's sets)``
  tokens, and its segment below its parent group saves
  ``(|G| - 1) * (its tokens)``.  Split that credit equally among the members:
  request ``i`` then earns ``(1 - 1/|G|)`` per token of each group on its
  chain, and at prefix depth ``x`` its group ``G`` needs ``w(I(G)) >= x``, so
  ``|G| <= 1 + F_i(x)``, where ``F_i(x)`` is the largest number of other
  requests that all contain one common subset of ``S_i`` weighing at least
  ``x``.  Hence reuse ``<= sum_i integral_0^inf (1 - 1/(1 + F_i(x))) dx``.
  ``F_i`` is computed exactly from the closure under intersection of the
  sets ``S_i & S_j``; where that closure exceeds ``closure_cap`` sets, a
  looser (still valid) ``F_i`` from pairwise intersections is used for that
  request (:func:`_pairwise_credit`).  The blocks one request shares with different neighbours cannot
  all come first in its single order; this is the bound that knows it.
* :func:`online_overlaps` / :func:`online_bound`: the bound of a method
  that serves requests in arrival order.  An exact-prefix cache names a page
  by everything before it, so the cached prefix of request ``i`` is a prefix
  of one earlier prompt: at most its largest overlap ``max_{j<i} w(S_i & S_j)``
  with a *single* earlier request, floored to whole pages.  Summed over
  requests, that is a spanning tree of the overlap graph (each request hangs
  off one earlier one), so it never exceeds the MST bound; unlike the MST it
  charges a request only for partners that came before it.  The maxima come
  from an inverted index over items: request ``i`` meets only earlier
  requests that share an item with it, and with prefix filtering (rare items
  first) only those that can still beat the best overlap found, never all
  pairs.  At page 1 the trie's reuse does not depend on the order
  the requests are inserted in, so the page-1 sum bounds every method's
  block reuse; the page-floored sums bound hits in arrival order only.
* :func:`online_lru_overlaps`: the same under a least-recently-used cache
  of ``C`` tokens.  The deepest page request ``i`` hits was last touched by
  some earlier request ``r``, whose prompt holds that whole prefix, so ``i``
  hits at most ``w(S_i & S_r)``; and the page is still there only if the
  pages touched after it weigh less than ``C``.  Every block that a request
  between ``r`` and ``i`` holds and ``r`` does not fills at least
  ``floor(w / page) - 1`` whole pages that no prompt of ``r``'s prefix can
  name, so where those weigh ``C`` or more, ``r`` is out of reach, whatever
  the orders.  This is the bound that says how much a small cache leaves
  to any arrival-order method, against a batch plan that may also reorder
  execution.
* :func:`exact_optimum`: the true optimum of a small batch (up to
  ``EXACT_MAX`` requests) by dynamic programming over the laminar families
  above (``4^n``): for a group ``H``, ``B(H) = max`` over partitions of ``H``
  into at least two parts of ``sum_C [(|C| - 1)(w(I(C)) - w(I(H))) + B(C)]``,
  and the optimum is ``(n - 1) w(I(all)) + B(all)``.  That taking a group's
  whole intersection as its shared segment is optimal follows from an
  exchange argument: moving a block every member holds up into the group's
  segment gains ``(|G| - 1) w`` and loses at most ``sum (|C| - 1) w`` over
  disjoint subgroups ``C``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable, Hashable, Sequence

import numpy as np

__all__ = [
    "Interned",
    "intern",
    "overlap_matrix",
    "dedup_bound",
    "mst_bound",
    "nested_group_bound",
    "exact_optimum",
    "online_overlaps",
    "online_bound",
    "online_lru_overlaps",
    "trie_reuse",
    "EXACT_MAX",
]

#: exact_optimum refuses larger batches (4^n work)
EXACT_MAX = 12


@dataclass
class Interned:
    """Requests as sets of integer items (copies of a repeated block are distinct items)."""

    rows: list[np.ndarray]  # item ids of each request (sorted)
    weights: np.ndarray  # int64 weight of every item

    @property
    def n(self) -> int:
        return len(self.rows)

    def total(self) -> int:
        return int(sum(int(self.weights[r].sum()) for r in self.rows))


def intern(contexts: Sequence[Sequence[Hashable]], weight: Callable[[Hashable], int]) -> Interned:
    """Item ids for ``(block, copy number)`` with ``weight(block)`` tokens each."""
    ids: dict = {}
    weights: list[int] = []
    rows = []
    for ctx in contexts:
        copies: Counter = Counter()
        row = []
        for b in ctx:
            key = (b, copies[b])
            copies[b] += 1
            i = ids.get(key)
            if i is None:
                i = ids[key] = len(weights)
                weights.append(int(weight(b)))
            row.append(i)
        rows.append(np.sort(np.asarray(row, dtype=np.int64)))
    return Interned(rows, np.asarray(weights, dtype=np.int64))


def dedup_bound(batch: Interned) -> int:
    """Total tokens minus the tokens of distinct items."""
    used = np.unique(np.concatenate(batch.rows)) if batch.rows else np.zeros(0, np.int64)
    return batch.total() - int(batch.weights[used].sum())


def overlap_matrix(batch: Interned, max_n: int = 8000) -> np.ndarray:
    """Dense ``w_ij`` over all pairs (zero diagonal), from the items' posting lists."""
    n = batch.n
    if n > max_n:
        raise ValueError(f"{n} requests: the all-pairs overlap matrix is refused above max_n={max_n}")
    W = np.zeros((n, n), dtype=np.int64)
    for item, posting in enumerate(_postings(batch)):
        if len(posting) > 1:
            W[np.ix_(posting, posting)] += batch.weights[item]
    np.fill_diagonal(W, 0)
    return W


def mst_bound(W: np.ndarray) -> int:
    """Weight of a maximum spanning forest of the overlap graph (Prim, O(n^2))."""
    n = len(W)
    if n < 2:
        return 0
    in_tree = np.zeros(n, dtype=bool)
    best = np.full(n, -1, dtype=np.int64)
    total = 0
    for _ in range(n):
        cand = np.where(in_tree, -2, best)
        v = int(cand.argmax())
        if cand[v] == -2:
            break
        total += max(0, int(cand[v]))  # -1: a new component starts (no edge)
        in_tree[v] = True
        np.maximum(best, W[v], out=best)
    return total


def _postings(batch: Interned) -> list[np.ndarray]:
    """For every item, the requests holding it (ascending)."""
    lengths = np.fromiter((len(r) for r in batch.rows), dtype=np.int64, count=batch.n)
    items = np.concatenate(batch.rows) if batch.n else np.zeros(0, np.int64)
    owner = np.repeat(np.arange(batch.n, dtype=np.int64), lengths)
    order = np.argsort(items, kind="stable")
    counts = np.bincount(items, minlength=len(batch.weights))
    return np.split(owner[order], np.cumsum(counts)[:-1])


def _rows_unique(a: np.ndarray) -> np.ndarray:
    """Distinct rows of a 2-D uint64 array, sorted (fast for one or more words)."""
    if a.shape[1] == 1:
        return np.unique(a[:, 0])[:, None]
    view = np.ascontiguousarray(a).view(np.dtype((np.void, 8 * a.shape[1])))[:, 0]
    return np.unique(view).view(np.uint64).reshape(-1, a.shape[1])


def _rows_isin(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Which rows of ``a`` occur in ``b`` (both 2-D uint64)."""
    if a.shape[1] == 1:
        return np.isin(a[:, 0], b[:, 0])
    dt = np.dtype((np.void, 8 * a.shape[1]))
    return np.isin(np.ascontiguousarray(a).view(dt)[:, 0], np.ascontiguousarray(b).view(dt)[:, 0])


def _mask_weights(masks: np.ndarray, w: np.ndarray) -> np.ndarray:
    n_bits = len(w)
    total = np.zeros(len(masks), dtype=np.int64)
    shifts = np.arange(64, dtype=np.uint64)
    for word in range(masks.shape[1]):
        lo, hi = word * 64, min(n_bits, word * 64 + 64)
        bits = ((masks[:, word][:, None] >> shifts[None, : hi - lo]) & np.uint64(1)).astype(np.int64)
        total += bits @ w[lo:hi]
    return total


def _group_credit(
    batch: Interned, i: int, W: np.ndarray, postings: list[np.ndarray], closure_cap: int
) -> tuple[float, bool]:
    """Request ``i``'s term of the nested-group bound; the flag says the exact closure was used."""
    row = batch.rows[i]
    if not (W[i] > 0).any():
        return 0.0, True
    words = (len(row) + 63) // 64
    masks = np.zeros((batch.n, words), dtype=np.uint64)
    for p, item in enumerate(row.tolist()):
        masks[postings[item], p >> 6] |= np.uint64(1) << np.uint64(p & 63)
    masks[i] = 0
    masks = masks[masks.any(axis=1)]
    X = _rows_unique(masks)
    # multiplicity of every distinct subset
    if words == 1:
        mult = np.bincount(np.searchsorted(X[:, 0], masks[:, 0]), minlength=len(X))
    else:
        dt = np.dtype((np.void, 8 * words))
        xv = X.view(dt)[:, 0]
        mult = np.bincount(np.searchsorted(xv, np.ascontiguousarray(masks).view(dt)[:, 0]), minlength=len(X))
    closed, frontier = X, X
    while len(frontier):
        meets = (frontier[:, None, :] & X[None, :, :]).reshape(-1, words)
        meets = _rows_unique(meets[meets.any(axis=1)])
        frontier = meets[~_rows_isin(meets, closed)]
        if len(frontier):
            closed = _rows_unique(np.concatenate([closed, frontier]))
        if len(closed) > closure_cap:
            return _pairwise_credit(X, mult, batch.weights[row]), False
    weight = _mask_weights(closed, batch.weights[row])
    count = np.zeros(len(closed), dtype=np.int64)
    for lo in range(0, len(closed), 512):  # bounded memory: 512 x |X| x words at a time
        part = closed[lo : lo + 512]
        inside = ((part[:, None, :] & X[None, :, :]) == part[:, None, :]).all(axis=2)
        count[lo : lo + 512] = inside.astype(np.int64) @ mult
    order = np.argsort(-weight, kind="stable")
    weight = weight[order]
    count = np.maximum.accumulate(count[order])  # F(x) for x in (weight[t+1], weight[t]]
    step = weight - np.r_[weight[1:], 0]
    return float((step * (1.0 - 1.0 / (1.0 + count))).sum()), True


def _pairwise_credit(X: np.ndarray, mult: np.ndarray, w: np.ndarray) -> float:
    """The same integral with ``F`` bounded through pairwise intersections (no closure needed).

    ``h(c)``, the heaviest set ``c`` other requests can all share with
    request ``i``, is at most ``max_a`` of the ``(c-1)``-th heaviest
    ``w(X_a & X_b)`` over the other members ``b`` (every member contains the
    shared set), and at most the ``c``-th heaviest ``w(X_b)``.  With ``h`` in
    hand, ``integral (1 - 1/(1 + F)) dx = sum_c h(c) / (c (c + 1))``.
    """
    wX = _mask_weights(X, w)
    total = int(mult.sum())
    single = np.sort(np.repeat(wX, mult))[::-1]
    h = single.astype(np.float64)
    if total >= 2:
        best = np.zeros(total - 1, dtype=np.float64)
        for a in range(len(X)):
            pair = _mask_weights(X[a] & X, w)
            reps = mult.copy()
            reps[a] -= 1  # the other requests with exactly this subset
            vals = np.sort(np.repeat(pair, reps))[::-1].astype(np.float64)
            np.maximum(best[: len(vals)], vals, out=best[: len(vals)])
        h[1:] = np.minimum(h[1:], best)
    h = np.minimum.accumulate(h)
    c = np.arange(1, len(h) + 1, dtype=np.float64)
    return float((h / (c * (c + 1))).sum())


def nested_group_bound(batch: Interned, W: np.ndarray, closure_cap: int = 4000) -> tuple[float, int]:
    """The nesting-aware bound (module docstring) and how many requests used the looser fallback."""
    postings = _postings(batch)
    total = 0.0
    fallbacks = 0
    for i in range(batch.n):
        credit, exact = _group_credit(batch, i, W, postings, closure_cap)
        total += credit
        fallbacks += not exact
    return total, fallbacks


def online_overlaps(batch: Interned) -> tuple[np.ndarray, np.ndarray]:
    """Per request, in arrival order, its largest overlap with one earlier request and that request.

    ``best[i] = max_{j<i} w(S_i & S_j)`` (0 when no earlier request shares
    an item, as for the first one) and ``partner[i]`` the earliest ``j``
    reaching it (-1 if none).  Copies of a repeated block are distinct items,
    so overlaps are multiset intersections.

    Candidates come from the inverted index, rarest items first (prefix
    filtering): once the candidates met so far reach ``t`` and the items not
    yet looked up weigh less than ``t`` together, no other earlier request
    can reach ``t``, so a popular block's long posting list is read only
    when the rarer ones leave the maximum open.  Each candidate is scored
    exactly from its own row.
    """
    postings = _postings(batch)
    lengths = np.fromiter((len(r) for r in batch.rows), dtype=np.int64, count=batch.n)
    offsets = np.concatenate([np.zeros(1, np.int64), np.cumsum(lengths)])
    flat = np.concatenate(batch.rows) if batch.n else np.zeros(0, np.int64)
    best = np.zeros(batch.n, dtype=np.int64)
    partner = np.full(batch.n, -1, dtype=np.int64)
    for i, row in enumerate(batch.rows):
        if not len(row):
            continue
        held = np.fromiter((np.searchsorted(postings[x], i) for x in row.tolist()), dtype=np.int64, count=len(row))
        live = held > 0  # items some earlier request holds
        if not live.any():
            continue
        items, held = row[live], held[live]
        gains = batch.weights[items]
        order = np.lexsort((-gains, held))  # rarest first, the heavier first among equally rare
        items, held, gains = items[order], held[order], gains[order]
        after = int(gains.sum()) - np.cumsum(gains)  # after[m]: weight of the items past the first m + 1
        scored = np.zeros(0, dtype=np.int64)
        scores = np.zeros(0, dtype=np.int64)
        used, need, top = 0, 1, 0
        while need > used:
            fresh = np.unique(np.concatenate([postings[x][:h] for x, h in zip(items[used:need].tolist(),
                                                                            held[used:need].tolist())]))
            fresh = fresh[~np.isin(fresh, scored)]
            if len(fresh):
                got = _overlaps_with(row, fresh, flat, offsets, lengths, batch.weights)
                scored, scores = np.concatenate([scored, fresh]), np.concatenate([scores, got])
                top = int(scores.max())
            used = need
            # the fewest rarest items whose remainder weighs less than the best overlap found so far
            below = np.flatnonzero(after < top)
            need = int(below[0]) + 1 if len(below) else len(items)
        if top:
            best[i] = top
            partner[i] = int(scored[scores == top].min())
    return best, partner


def _overlaps_with(row: np.ndarray, others: np.ndarray, flat: np.ndarray, offsets: np.ndarray,
                   lengths: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``w(row & rows[j])`` for each ``j`` in ``others``, from the rows laid end to end in ``flat``."""
    lens = lengths[others]
    total = int(lens.sum())
    starts = np.repeat(offsets[others] - (np.cumsum(lens) - lens), lens)
    values = flat[starts + np.arange(total)]
    at = np.minimum(np.searchsorted(row, values), len(row) - 1)
    shared = row[at] == values  # rows are sorted item ids
    owner = np.repeat(np.arange(len(others)), lens)
    out = np.zeros(len(others), dtype=np.int64)
    np.add.at(out, owner[shared], weights[values[shared]])
    return out


def online_bound(best: np.ndarray, page: int = 1, offset: int = 0) -> int:
    """Hit tokens an arrival-order method can reach at most: ``sum_{i>=1} floor((offset + best_i) / page) * page``.

    ``best`` is :func:`online_overlaps`' first array; ``offset`` the tokens
    every prompt shares before its first block (the preamble), since pages
    count from the start of the prompt.  The first request hits nothing.
    With ``page=1`` and ``offset=0`` it is the bound on block reuse, in the
    unit of the other bounds.  The last-token rule needs no extra cap: a
    request-specific tail follows the blocks.
    """
    if page < 1:
        raise ValueError(f"page must be >= 1, got {page}")
    if len(best) < 2:
        return 0
    reach = offset + np.asarray(best[1:], dtype=np.int64)
    return int((reach // page * page).sum())


def online_lru_overlaps(batch: Interned, capacity_tokens: int, page: int = 16) -> np.ndarray:
    """Per request, its largest overlap with one earlier request whose pages an LRU cache can still hold.

    ``capacity_tokens`` is the cache (whole pages of ``page`` tokens count,
    as in the simulator).  Request ``r`` is in reach of ``i`` while the
    blocks of the requests between them that ``r`` does not hold fill fewer
    whole pages than the cache (see the module docstring); the result is the
    largest ``w(S_i & S_r)`` over those ``r``, for :func:`online_bound`.
    Going back from ``i``, the pages of the requests passed only grow, so the
    walk stops once they exceed the cache by more than any one request's
    pages could take back.
    """
    if page < 1:
        raise ValueError(f"page must be >= 1, got {page}")
    if capacity_tokens < 1:
        raise ValueError(f"capacity_tokens must be >= 1, got {capacity_tokens}")
    cap_pages = max(1, capacity_tokens // page)
    full_pages = np.maximum(batch.weights // page - 1, 0).tolist()
    weights = batch.weights.tolist()
    rows = [set(r.tolist()) for r in batch.rows]
    own = [sum(full_pages[x] for x in r) for r in rows]
    most_own = max(own, default=0)
    best = np.zeros(batch.n, dtype=np.int64)
    for i in range(1, batch.n):
        mine = rows[i]
        between: set[int] = set()  # items of the requests strictly between r and i
        between_pages = 0
        top = 0
        for r in range(i - 1, -1, -1):
            theirs = rows[r]
            if between_pages - sum(full_pages[x] for x in theirs & between) < cap_pages:
                shared = sum(weights[x] for x in mine & theirs)
                if shared > top:
                    top = shared
            fresh = theirs - between
            between |= fresh
            between_pages += sum(full_pages[x] for x in fresh)
            if between_pages - most_own >= cap_pages:
                break
        best[i] = top
    return best


def exact_optimum(batch: Interned) -> int:
    """Maximum trie reuse over all block orders of a small batch (module docstring)."""
    n = batch.n
    if n > EXACT_MAX:
        raise ValueError(f"exact_optimum handles at most {EXACT_MAX} requests (4^n work), got {n}")
    if n < 2:
        return 0
    sets = [frozenset(r.tolist()) for r in batch.rows]
    w = batch.weights
    size = 1 << n
    inter: list = [None] * size
    wI = [0] * size
    pop = [0] * size
    for m in range(1, size):
        low = m & -m
        i = low.bit_length() - 1
        rest = m ^ low
        inter[m] = sets[i] if rest == 0 else inter[rest] & sets[i]
        wI[m] = int(sum(int(w[x]) for x in inter[m]))
        pop[m] = pop[rest] + 1
    D = [0] * size  # value of a group hanging below a parent with an empty intersection
    for m in range(1, size):
        if pop[m] < 2:
            continue
        wh = wI[m]
        best_part: dict[int, int] = {0: 0}
        sub = (m - 1) & m
        subs = []
        while sub:
            subs.append(sub)
            sub = (sub - 1) & m
        subs.append(m)
        for x in sorted(subs):
            low = x & -x
            rest = x ^ low
            best = None
            c = rest
            while True:
                part = c | low
                if part != m:
                    val = D[part] - (pop[part] - 1) * wh + best_part[x ^ part]
                    if best is None or val > best:
                        best = val
                if c == 0:
                    break
                c = (c - 1) & rest
            best_part[x] = best if best is not None else -(1 << 60)
        D[m] = (pop[m] - 1) * wI[m] + best_part[m]
    return D[size - 1]


def trie_reuse(sequences: Sequence[Sequence[Hashable]], weight: Callable[[Hashable], int]) -> int:
    """Tokens the prefix tree of these block sequences shares (unlimited cache, page 1)."""
    root: dict = {}
    reuse = 0
    for seq in sequences:
        node = root
        for b in seq:
            child = node.get(b)
            if child is None:
                child = node[b] = {}
            else:
                reuse += weight(b)
            node = child
    return reuse
