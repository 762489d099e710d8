"""Bounds and exact optima on tiny cases with known answers, and against brute force."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from contextpilot_engine import ContextPilot
from contextpilot_engine.bench.bounds import (
    dedup_bound,
    exact_optimum,
    intern,
    mst_bound,
    nested_group_bound,
    overlap_matrix,
    trie_reuse,
)


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
