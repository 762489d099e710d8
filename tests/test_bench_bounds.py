"""Bounds and exact optima on tiny cases with known answers, and against brute force.

The online bound is checked three ways on small random traces: its
inverted-index maxima against the definition (every earlier request, by
multiset intersection), its page-floored sum against the best that any
choice of block orders achieves in the segment simulator when requests are
served in arrival order, and against the MST bound it can never exceed.
"""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from contextpilot_engine import ContextPilot
from collections import Counter

from contextpilot_engine.bench.bounds import (
    dedup_bound,
    exact_optimum,
    intern,
    mst_bound,
    nested_group_bound,
    online_bound,
    online_lru_overlaps,
    online_overlaps,
    overlap_matrix,
    trie_reuse,
)
from contextpilot_engine.bench.simulator import PrefixCacheSimulator


def _all(ctxs, w):
    b = intern(ctxs, lambda x: w[x])
    W = overlap_matrix(b)
    return b, W, exact_optimum(b), mst_bound(W), nested_group_bound(b, W)[0], dedup_bound(b)


def _brute(ctxs, w):
    best = 0
    for perms in itertools.product(*[set(itertools.permutations(c)) for c in ctxs]):
        best = max(best, trie_reuse(perms, lambda x: w[x]))
    return best


def test_triangle_needs_five_computations():
    ctxs = [["A", "B"], ["B", "C"], ["A", "C"]]
    w = dict.fromkeys("ABC", 1)
    b, W, opt, mst, nested, dedup = _all(ctxs, w)
    assert (opt, mst, dedup) == (1, 2, 3)  # 6 blocks, trie of 5
    assert opt <= nested < mst


def test_identical_contexts_are_tight():
    ctxs = [["A", "B", "C"]] * 5
    w = {"A": 3, "B": 5, "C": 7}
    _, _, opt, mst, nested, dedup = _all(ctxs, w)
    assert opt == mst == dedup == 4 * 15
    assert nested == pytest.approx(60)


def test_star_shows_the_nesting_the_mst_ignores():
    m = 6
    hub = [f"s{j}" for j in range(m)]
    ctxs = [hub] + [[f"s{j}", f"own{j}"] for j in range(m)]
    w = {x: 10 for c in ctxs for x in c}
    _, _, opt, mst, nested, _ = _all(ctxs, w)
    assert opt == 10  # the hub can start with one spoke only
    assert mst == 10 * m
    assert opt <= nested < mst


def test_repeated_blocks_are_copies():
    ctxs = [["A", "A", "B"], ["A", "A"], ["A"]]
    w = {"A": 4, "B": 1}
    b, W, opt, mst, nested, dedup = _all(ctxs, w)
    assert int(W[0, 1]) == 8 and int(W[0, 2]) == 4
    assert opt == _brute(ctxs, w) == 12
    assert dedup == b.total() - 9


def test_random_small_batches_against_brute_force():
    rng = random.Random(7)
    for _ in range(120):
        n = rng.randint(2, 4)
        universe = rng.randint(2, 5)
        w = {x: rng.randint(1, 6) for x in range(universe)}
        ctxs = [[rng.randrange(universe) for _ in range(rng.randint(1, 4))] for _ in range(n)]
        b, W, opt, mst, nested, dedup = _all(ctxs, w)
        assert opt == _brute(ctxs, w)
        assert opt <= mst and opt <= dedup and opt <= nested + 1e-9
        assert nested_group_bound(b, W, closure_cap=1)[0] >= opt - 1e-9  # the pairwise fallback is a bound too


def test_ours_never_beats_the_optimum_and_bounds_hold_on_a_real_sub_batch():
    from contextpilot_engine.bench.workloads import rag_batch

    wl = rag_batch(n_queries=60, top_k=6, n_chunks=40, seed=2)
    count = wl.token_counter()
    ctxs = wl.contexts[:7]
    b = intern(ctxs, count)
    W = overlap_matrix(b)
    opt = exact_optimum(b)
    ours = trie_reuse(ContextPilot(tokenizer=count).reorder(ctxs)[0], count)
    assert ours <= opt <= nested_group_bound(b, W)[0] + 1e-6 <= mst_bound(W) + 1e-6


def test_guards():
    b = intern([[i] for i in range(13)], lambda x: 1)
    with pytest.raises(ValueError):
        exact_optimum(b)
    with pytest.raises(ValueError):
        overlap_matrix(b, max_n=5)
    assert mst_bound(np.zeros((1, 1), dtype=np.int64)) == 0


# ---------------------------------------------------------------------------
# The online bound


def _earlier_by_definition(ctxs, w):
    """max_{j<i} of the multiset intersection's weight, straight from the definition."""
    best = []
    for i, c in enumerate(ctxs):
        mine = Counter(c)
        best.append(max([sum(w[x] * n for x, n in (mine & Counter(d)).items()) for d in ctxs[:i]], default=0))
    return best


def _best_arrival_order_hits(ctxs, w, page, preamble, capacity=None):
    """The most hits any choice of per-request block orders gets, requests served in arrival order."""
    best = 0
    for perms in itertools.product(*[sorted(set(itertools.permutations(c))) for c in ctxs]):
        sim = PrefixCacheSimulator(page, capacity)
        for i, p in enumerate(perms):
            sim.serve([("preamble", preamble), *((x, w[x]) for x in p), (("tail", i), 5)])
        best = max(best, sum(sim.hits))
    return best


def _random_traces(seed, count, requests, universe, weight, blocks):
    """``count`` random (contexts, weights) pairs; each argument after ``count`` is an inclusive (min, max)."""
    rng = random.Random(seed)
    for _ in range(count):
        items = rng.randint(*universe)
        w = {x: rng.randint(*weight) for x in range(items)}
        yield [[rng.randrange(items) for _ in range(rng.randint(*blocks))] for _ in range(rng.randint(*requests))], w


def test_online_overlaps_match_the_definition_on_random_traces():
    for ctxs, w in _random_traces(11, 300, (1, 7), (1, 8), (1, 9), (1, 5)):
        b = intern(ctxs, lambda x: w[x])
        best, partner = online_overlaps(b)
        assert best.tolist() == _earlier_by_definition(ctxs, w)
        for i, j in enumerate(partner.tolist()):
            if best[i]:
                assert 0 <= j < i and sum(w[x] * k for x, k in (Counter(ctxs[i]) & Counter(ctxs[j])).items()) == best[i]
            else:
                assert j == -1
        assert online_bound(best) == sum(best.tolist())
        assert online_bound(best) <= mst_bound(overlap_matrix(b))


def test_online_bound_holds_and_is_reached_where_nothing_conflicts():
    for ctxs, w in _random_traces(5, 60, (2, 4), (2, 5), (1, 12), (1, 3)):
        n = len(ctxs)
        best, _ = online_overlaps(intern(ctxs, lambda x: w[x]))
        for page, preamble in ((1, 0), (1, 7), (4, 6), (16, 20)):
            bound = online_bound(best, page, preamble)
            reached = _best_arrival_order_hits(ctxs, w, page, preamble)
            assert reached <= bound, (ctxs, w, page, preamble)
            if n == 2:  # the second request can always follow the first one's order
                assert reached == bound, (ctxs, w, page, preamble)


def test_lru_online_bound_holds_for_every_order_and_knows_a_flushed_cache():
    for ctxs, w in _random_traces(23, 80, (2, 4), (2, 6), (1, 24), (1, 3)):
        batch = intern(ctxs, lambda x: w[x])
        unlimited = online_overlaps(batch)[0]
        for page, preamble, capacity in ((1, 0, 9), (4, 6, 12), (4, 3, 40), (8, 2, 16)):
            best = online_lru_overlaps(batch, capacity, page)
            assert (best <= unlimited).all()
            bound = online_bound(best, page, preamble)
            assert _best_arrival_order_hits(ctxs, w, page, preamble, capacity) <= bound, (ctxs, w, page, capacity)
    # a big cache changes nothing; one large block in between puts the first request out of reach
    w = {"a": 40, "b": 40, "big": 400}
    batch = intern([["a", "b"], ["big"], ["a", "b"]], lambda x: w[x])
    assert online_lru_overlaps(batch, 10_000, 16).tolist() == online_overlaps(batch)[0].tolist() == [0, 0, 80]
    assert online_lru_overlaps(batch, 320, 16).tolist() == [0, 0, 0]
    assert _best_arrival_order_hits([["a", "b"], ["big"], ["a", "b"]], w, 16, 0, 320) == 0
    with pytest.raises(ValueError, match="capacity_tokens"):
        online_lru_overlaps(batch, 0, 16)


def test_online_bound_charges_one_earlier_partner():
    w = {"x": 5, "y": 3}
    late = intern([["x"], ["y"], ["x", "y"]], lambda t: w[t])  # the pair arrives after both halves
    early = intern([["x", "y"], ["x"], ["y"]], lambda t: w[t])  # the same sets, the pair first
    best, partner = online_overlaps(late)
    assert best.tolist() == [0, 0, 5] and partner.tolist() == [-1, -1, 0]
    assert online_bound(best) == 5 < mst_bound(overlap_matrix(late)) == 8
    assert online_bound(online_overlaps(early)[0]) == 8 == mst_bound(overlap_matrix(early))
    assert online_bound(best, page=4, offset=2) == 0 + 0 + 4  # request 1: (2+0)//4; request 2: (2+5)//4
    with pytest.raises(ValueError):
        online_bound(best, page=0)


def test_online_overlaps_scale_with_candidates_and_agree_with_the_dense_matrix():
    rng = np.random.default_rng(3)
    n, corpus, k = 3000, 4000, 12
    p = 1.0 / np.arange(1, corpus + 1) ** 1.1
    p /= p.sum()
    ctxs = [rng.choice(corpus, size=k, replace=False, p=p).tolist() for _ in range(n)]
    w = rng.integers(50, 1300, size=corpus)
    b = intern(ctxs, lambda x: int(w[x]))
    best, _ = online_overlaps(b)
    W = overlap_matrix(b)
    assert best.tolist() == [int(W[i, :i].max()) if i else 0 for i in range(n)]
