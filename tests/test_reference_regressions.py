"""One regression test per known weakness of the reference ContextPilot (see DEVELOPERS.md).

1. repeated blocks silently dropped (output not a permutation of the input);
2. an index that goes stale after evictions;
3. a crash once a tree level passes 1,000 children;
4. an unbounded index in long-running processes;
5. an O(n^2) all-pairs index build;
6. a global index with no tenant isolation (see also the property test in test_online.py).
The engine hooks tested only against mocks are covered by the vLLM plugin tests, which drive the
real engine.
"""

from collections import Counter

import numpy as np

from contextpilot_engine import ContextPilot
from contextpilot_engine.bench.workloads import rag_batch
from contextpilot_engine.blocks import make_block
from contextpilot_engine.candidates import CandidateConfig, candidate_pairs
from contextpilot_engine.index import ContextIndex, IndexLimits
from contextpilot_engine.interning import intern_batch
from contextpilot_engine.online_reorder import order_online
from contextpilot_engine.pages import chain_page_keys
from contextpilot_engine.validation import parse_contexts


def docs_in(messages) -> list[str]:
    body = messages[0]["content"].split("<documents>\n", 1)[1].split("</documents>", 1)[0]
    return [line.split("] ", 1)[1] for line in body.splitlines()]


# 1 -------------------------------------------------------------------------------------------
def test_repeated_blocks_are_kept():
    pilot = ContextPilot()
    docs = ["a", "b", "a", "a", "c"]
    for _ in range(3):
        assert Counter(docs_in(pilot.optimize(docs, "q"))) == Counter(docs)
    reordered, _ = pilot.reorder([docs, ["a", "a"]])
    assert sorted(map(Counter, map(tuple, reordered)), key=len) == sorted(
        [Counter(docs), Counter(["a", "a"])], key=len
    )




def test_repeated_blocks_survive_batch_reorder():
    contexts = [["a", "b", "a", "c", "a"], ["a", "a", "b"], ["c", "a"]]
    pilot = ContextPilot()
    reordered, order = pilot.reorder(contexts)
    assert sorted(map(lambda c: sorted(c), reordered)) == sorted(map(sorted, contexts))
    for new, i in zip(reordered, order):
        assert Counter(new) == Counter(contexts[i])




# 2 -------------------------------------------------------------------------------------------
def test_nothing_is_stale_after_evictions():
    """Every eviction the engine reports changes what the next request is told, immediately."""
    idx = ContextIndex()
    idx.attach_engine(4)
    pilot = ContextPilot(index=idx)
    blocks = [make_block(f"block {i} " * 6, pilot.count_tokens, "b") for i in range(3)]
    tokens = list(range(100, 108))
    ends = [8]
    for i in range(len(blocks)):
        tokens += [i] * 8
        ends.append(len(tokens))
    pages = chain_page_keys(tokens, 4)
    idx.bind("t", 5, 8, [(b.key, 8) for b in blocks], ends, pages)
    idx.pages_stored(pages)
    order, hit = order_online(idx, "t", 5, blocks[::-1])
    assert order == [2, 1, 0] and hit == 32
    idx.pages_removed([pages[4]])  # a page of the middle block goes
    order, hit = order_online(idx, "t", 5, blocks[::-1])
    assert hit == 16 and order[0] == 2  # only the first block is still a usable prefix
    idx.pages_cleared()
    assert order_online(idx, "t", 5, blocks)[1] == 0
    # model mode: evicted nodes disappear and surviving node ids stay valid
    model = ContextIndex(IndexLimits(capacity_tokens=100))
    kept = model.record("t", 1, 0, [(1, 30)])
    model.record("t", 1, 0, [(2, 30), (3, 30)])
    model.record("t", 1, 0, [(1, 30)])
    model.record("t", 1, 0, [(4, 35)])
    trie = model.tenant("t").trie
    assert model.match("t", 1, {2: 1, 3: 1}).keys == [2]  # the least recently used leaf (3) went first
    assert all(trie.nodes[n.id] is n for n in kept)


# 3 -------------------------------------------------------------------------------------------
PRE = 1


def test_a_level_with_far_more_than_1000_children_works():
    idx = ContextIndex()
    for k in range(5000):
        idx.record("t", PRE, 3, [(1000 + k, 7), (99, 5)])
    top = idx.tenant("t").trie.root.children[PRE]
    assert len(top.children) == 5000
    m = idx.match("t", PRE, {4321: 1, 99: 1})
    assert m.keys == [4321, 99] and m.hit_tokens == 15




# 4 -------------------------------------------------------------------------------------------
def test_100k_online_requests_stay_within_the_capacity():
    """Regression for the reference's unbounded index: memory is bounded by the token capacity."""
    idx = ContextIndex(IndexLimits(capacity_tokens=20_000, max_tracked_blocks=5_000))
    made = {}

    def blk(i):
        b = made.get(i)
        if b is None:
            b = made[i] = make_block(f"memory {i}", lambda t: 50, "b")
        return b

    trie = idx.tenant("t").trie
    peak_nodes = peak_heap = 0
    for r in range(100_000):
        blocks = [blk((r * 7 + j * 13) % 50_000) for j in range(5)]
        order, _ = order_online(idx, "t", 1, blocks)
        idx.record("t", 1, 10, [(blocks[j].key, blocks[j].tokens) for j in order])
        if r % 1000 == 0:
            made.clear()
            peak_nodes = max(peak_nodes, trie.node_count())
            peak_heap = max(peak_heap, len(trie._lru))
    # every structure that grows with traffic is bounded by the capacity or a configured limit
    assert trie.cached_tokens <= 20_000 + 5 * 50 + 10
    assert peak_nodes <= (20_000 + 5 * 50 + 10) // 50 + 1
    assert peak_heap <= 4 * peak_nodes + 1024 + 1
    assert len(idx.tenant("t").popularity) <= 5_000 * 5 // 4


# 5 -------------------------------------------------------------------------------------------
def parse(contexts, counter):
    return parse_contexts(contexts, "contexts", counter, 4096, allow_single=False)[0]


def test_candidate_generation_is_linear_not_all_pairs():
    """Regression for the reference's O(n^2) build: candidates grow with n, not n^2."""
    wl = rag_batch(n_queries=3000, top_k=20, seed=5)
    ib = intern_batch(parse(wl.contexts, wl.token_counter()))
    cfg = CandidateConfig()
    lo, hi, shared = candidate_pairs(ib.lengths, ib.items, ib.weights, np.zeros(3000, dtype=np.int64), cfg)
    assert len(lo) <= 3000 * cfg.per_context
    assert (lo < hi).all() and (shared > 0).all()
    # the small-batch tiers (a wider window for top-k sized contexts) stay linear too
    for blocks in (len(ib.items), 2 * len(ib.items)):
        tier = CandidateConfig.for_batch(3000, blocks)
        lo, hi, shared = candidate_pairs(ib.lengths, ib.items, ib.weights, np.zeros(3000, dtype=np.int64), tier)
        assert len(lo) <= 3000 * tier.per_context
    assert CandidateConfig.for_batch(3000, 3000 * 20).window > CandidateConfig.for_batch(3000, 3000 * 21).window


