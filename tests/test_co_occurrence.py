"""The recent-request window orders a request's tail by what recent requests held together.

Checked against a plain model (a set of request numbers per block, rebuilt
from the window) after random sequences of requests and evictions, so the
compact holder encoding (a bare number for a block one request held) can
never change an order or forget a holder.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from contextpilot_engine.blocks import make_block
from contextpilot_engine.co_occurrence import RecentRequests, rank_discount


def model_extend(window: list[tuple[int, tuple[int, ...]]], blocks, placed, candidates):
    """The greedy order of :meth:`RecentRequests.extend`, recomputed from the window itself."""
    holders: dict[int, set[int]] = {}
    for n, keys in window:
        for k in keys:
            holders.setdefault(k, set()).add(n)
    support = None
    for k in placed:
        h = holders.get(k, set())
        support = set(h) if support is None else support & h
        if not support:
            return [], list(candidates)
    remaining = [i for i in candidates if blocks[i].key in holders]
    ordered = []
    while remaining:
        scored = []
        for pos, i in enumerate(remaining):
            h = holders[blocks[i].key]
            n = len(h) if support is None else len(h & support)
            if n:
                b = blocks[i]
                scored.append(((n * b.tokens * rank_discount(i), b.tokens, -b.key, -pos), pos))
        if not scored:
            break
        pos = max(scored)[1]
        i = remaining.pop(pos)
        ordered.append(i)
        h = holders[blocks[i].key]
        support = set(h) if support is None else support & h
        if not support:
            break
    chosen = set(ordered)
    return ordered, [i for i in candidates if i not in chosen]


BLOCKS = [make_block("block %d " % i + "x " * (i % 5), lambda t: len(t.split()), f"b{i}") for i in range(12)]

operations = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.lists(st.integers(0, 11), min_size=1, max_size=6)),
        st.tuples(st.just("evict"), st.integers(1, 7)),
        st.tuples(st.just("order"), st.lists(st.integers(0, 11), max_size=3)),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(operations, st.integers(1, 6))
def test_the_window_orders_exactly_as_a_plain_model_of_it(ops, size):
    recent = RecentRequests(size)
    window: list[tuple[int, tuple[int, ...]]] = []
    number = 0
    for op, arg in ops:
        if op == "add":
            keys = tuple(dict.fromkeys(BLOCKS[i].key for i in arg))
            recent.add(BLOCKS[i].key for i in arg)
            window.append((number, keys))
            number += 1
            del window[: max(0, len(window) - size)]
        elif op == "evict":
            freed = 0
            while window and freed < arg:
                n, keys = window[0]
                take = min(arg - freed, len(keys))
                window[0] = (n, keys[take:])
                freed += take
                if not window[0][1]:
                    window.pop(0)
            assert recent.evict(arg, "test") == freed
        else:
            placed = [BLOCKS[i].key for i in arg]
            candidates = [i for i in range(len(BLOCKS)) if i not in arg]
            assert recent.extend(BLOCKS, placed, candidates) == model_extend(window, BLOCKS, placed, candidates)
        assert recent.entries() == sum(len(keys) for _, keys in window)
        assert len(recent) == len(window)
