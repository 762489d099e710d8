"""The Context Index: model mode (capacity, LRU), engine mode (page events, binding), tenants."""

import pytest

from contextpilot_engine.index import ContextIndex, IndexLimits
from contextpilot_engine.pages import chain_page_keys
from contextpilot_engine.validation import UnknownIdError

PRE = 1  # preamble key used throughout


def test_model_mode_match_prefers_longest_cached_prefix():
    idx = ContextIndex()
    a, b, c, d = [(k, 10 * (k + 1)) for k in (11, 12, 13, 14)]
    idx.record("t", PRE, 5, [a, b, c])
    idx.record("t", PRE, 5, [d, a])
    m = idx.match("t", PRE, {a[0]: 1, b[0]: 1, d[0]: 1})
    assert m.keys == [d[0], a[0]]  # d,a (150+120 tokens) beats a,b (120+130)
    assert m.hit_tokens == 5 + d[1] + a[1]
    assert idx.match("t", PRE, {a[0]: 1, b[0]: 1, c[0]: 1}).keys == [a[0], b[0], c[0]]
    assert idx.match("t", PRE, {b[0]: 1}).keys == []  # b is only cached after a
    assert idx.match("t", 999, {a[0]: 1}).hit_tokens == 0  # another preamble: another root


def test_match_picks_the_heaviest_branch():
    idx = ContextIndex()
    idx.record("t", PRE, 5, [(1, 10), (2, 10)])
    idx.record("t", PRE, 5, [(3, 500)])
    m = idx.match("t", PRE, {1: 1, 2: 1, 3: 1})
    assert m.keys == [3] and m.hit_tokens == 505


def test_node_ids_are_stable_and_never_reused():
    idx = ContextIndex(IndexLimits(capacity_tokens=100))
    p1 = idx.record("t", PRE, 0, [(1, 40), (2, 40)])
    ids1 = [n.id for n in p1]
    idx.record("t", PRE, 0, [(3, 90)])  # evicts the (1, 2) branch
    p3 = idx.record("t", PRE, 0, [(1, 40), (2, 40)])
    ids3 = [n.id for n in p3]
    assert not set(ids1[1:]) & set(ids3[1:])
    # a sibling removal does not change surviving ids
    trie = idx.tenant("t").trie
    assert all(trie.nodes[n.id] is n for n in p3)


def test_capacity_is_enforced_with_lru_leaves():
    idx = ContextIndex(IndexLimits(capacity_tokens=300))
    idx.record("t", PRE, 0, [(1, 100)])
    idx.record("t", PRE, 0, [(2, 100)])
    idx.record("t", PRE, 0, [(1, 100)])  # touch 1: 2 is now least recently used
    idx.record("t", PRE, 0, [(3, 150)])
    trie = idx.tenant("t").trie
    assert trie.cached_tokens <= 300
    assert idx.match("t", PRE, {2: 1}).keys == []
    assert idx.match("t", PRE, {1: 1}).keys == [1]
    assert idx.match("t", PRE, {3: 1}).keys == [3]


def test_tenants_are_isolated_and_bounded():
    idx = ContextIndex(IndexLimits(max_tenants=2))
    idx.record("alice", PRE, 0, [(1, 10)])
    assert idx.match("bob", PRE, {1: 1}).keys == []
    idx.record("bob", PRE, 0, [(2, 10)])
    idx.record("carol", PRE, 0, [(3, 10)])  # alice is the least recently used tenant
    assert set(idx.tenant_names()) == {"bob", "carol"}
    with pytest.raises(UnknownIdError, match="alice"):
        idx.drop_tenant("alice")


# ------------------------------------------------------------------ engine mode
PAGE = 4


def bind_prompt(idx, tenant, pieces, preamble=(PRE, 8)):
    """Bind a prompt made of a preamble and blocks, each block given as its token ids."""
    tokens = list(range(1000, 1000 + preamble[1]))
    ends = [len(tokens)]
    blks = []
    for key, ids in pieces:
        tokens += ids
        ends.append(len(tokens))
        blks.append((key, len(ids)))
    keys = chain_page_keys(tokens, PAGE)
    idx.bind(tenant, preamble[0], preamble[1], blks, ends, keys)
    return keys


def test_engine_mode_follows_page_events_exactly():
    idx = ContextIndex()
    idx.attach_engine(PAGE)
    a = (10, list(range(1, 9)))  # 8 tokens = 2 pages after the 8-token preamble
    b = (20, list(range(21, 29)))
    keys = bind_prompt(idx, "t", [a, b])
    assert len(keys) == 6
    # nothing stored yet: nothing cached
    assert idx.match("t", PRE, {10: 1, 20: 1}).hit_tokens == 0
    idx.pages_stored(keys)
    m = idx.match("t", PRE, {10: 1, 20: 1})
    assert m.keys == [10, 20] and m.hit_tokens == 24
    # evicting b's last page: b only partly cached, the index says so at once
    idx.pages_removed([keys[5]])
    m = idx.match("t", PRE, {10: 1, 20: 1})
    assert m.hit_tokens == 20 and m.keys == [10, 20]
    # evicting a page of a cuts everything after it
    idx.pages_removed([keys[2]])
    m = idx.match("t", PRE, {10: 1, 20: 1})
    assert m.hit_tokens == 8 and m.keys == []
    idx.pages_stored([keys[2], keys[5]])
    assert idx.match("t", PRE, {10: 1, 20: 1}).hit_tokens == 24
    idx.pages_cleared()
    assert idx.match("t", PRE, {10: 1, 20: 1}).hit_tokens == 0
    assert idx.cached_pages() == {}


def test_duplicate_pages_are_reference_counted():
    idx = ContextIndex()
    idx.attach_engine(PAGE)
    keys = bind_prompt(idx, "t", [(10, list(range(8)))])
    idx.pages_stored(keys)
    idx.pages_stored(keys[:2])  # a second physical copy of the first two pages
    idx.pages_removed(keys[:2])
    assert idx.match("t", PRE, {10: 1}).hit_tokens == 16
    idx.pages_removed(keys[:2])
    assert idx.match("t", PRE, {10: 1}).hit_tokens == 0


def test_binding_pages_that_are_already_cached_counts_them_at_once():
    idx = ContextIndex()
    idx.attach_engine(PAGE)
    tokens = list(range(1000, 1008)) + list(range(1, 9))
    idx.pages_stored(chain_page_keys(tokens, PAGE))
    bind_prompt(idx, "t", [(10, list(range(1, 9)))])
    assert idx.match("t", PRE, {10: 1}).hit_tokens == 16


def test_bind_validates_its_offsets():
    idx = ContextIndex()
    with pytest.raises(RuntimeError, match="attach_engine"):
        idx.bind("t", PRE, 1, [(1, 1)], [1, 2], [])
    idx.attach_engine(PAGE)
    with pytest.raises(ValueError, match="token_ends"):
        idx.bind("t", PRE, 1, [(1, 1)], [1], [])
    with pytest.raises(ValueError, match="non-decreasing"):
        idx.bind("t", PRE, 1, [(1, 1)], [5, 2], [])


def test_engine_mode_node_count_is_bounded():
    idx = ContextIndex(IndexLimits(max_nodes=50))
    idx.attach_engine(PAGE)
    for k in range(200):
        bind_prompt(idx, "t", [(100 + k, [k] * 8)])
    assert idx.tenant("t").trie.node_count() <= 50
    # pages of dropped nodes are no longer bound
    assert idx.stats()["bound_pages"] <= 50 * 4


def test_popularity_table_is_bounded_and_keeps_what_recurs():
    from contextpilot_engine.popularity import BlockPopularity

    pop = BlockPopularity(100, decay=0.97)
    for r in range(5000):
        pop.add([7, 10_000 + r, 20_000 + r])  # block 7 recurs, the others are seen once
        assert len(pop) <= 100
    assert pop.count(7) > 10 and pop.count(10_000) == 0


def test_eviction_heap_never_outgrows_the_trie():
    """Re-touching the same leaves must not pile up heap entries (no O(nodes) rebuild on a request)."""
    idx = ContextIndex(IndexLimits(capacity_tokens=10**9, max_nodes=64))
    for r in range(3000):
        idx.record("t", PRE, 5, [(r % 40, 10), (1000 + r % 7, 10)])
        trie = idx.tenant("t").trie
        assert len(trie._lru) <= trie.node_count() + 1
    assert trie.node_count() <= 64
