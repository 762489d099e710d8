"""Property tests: the index stays consistent under random event sequences, in both modes."""

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from contextpilot_engine.index import ContextIndex, IndexLimits
from contextpilot_engine.pages import chain_page_keys

PAGE = 2
BLOCK_TOKENS = {k: [k * 10 + i for i in range(1 + k % 3)] for k in range(1, 7)}  # 1 to 3 tokens each


def check_engine_invariants(idx: ContextIndex, refcount: Counter) -> None:
    cached = idx.cached_pages()
    assert cached == {k: c for k, c in refcount.items() if c > 0}
    owners = idx._owners
    for state in idx._tenants.values():
        trie = state.trie
        for node in trie.nodes.values():
            if node is trie.root:
                continue
            assert node.parent is not None and node.parent.children[node.key] is node
            if node.pages is None:
                continue
            lead = 0
            for key in node.pages:
                if key not in cached:
                    break
                lead += 1
            assert node.lead_cached == lead
            for i, key in enumerate(node.pages):
                assert any(n is node and j == i for n, j in owners[key])
    for key, entries in owners.items():
        for node, i in entries:
            assert node.pages[i] == key
            assert any(node is n for s in idx._tenants.values() for n in s.trie.nodes.values())


ops = st.lists(
    st.one_of(
        st.tuples(st.just("bind"), st.sampled_from(["a", "b"]), st.lists(st.integers(1, 6), min_size=1, max_size=4)),
        st.tuples(st.just("store"), st.integers(0, 40), st.integers(1, 3)),
        st.tuples(st.just("remove"), st.integers(0, 40), st.integers(1, 3)),
        st.tuples(st.just("clear"), st.just(0), st.just(0)),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_engine_mode_is_consistent_after_any_event_sequence(operations):
    idx = ContextIndex(IndexLimits(max_nodes=12))
    idx.attach_engine(PAGE)
    known: list[int] = []
    refcount: Counter = Counter()
    for op, a, b in operations:
        if op == "bind":
            tokens = [7, 7, 7]
            ends = [3]
            for k in b:
                tokens += BLOCK_TOKENS[k]
                ends.append(len(tokens))
            keys = chain_page_keys(tokens, PAGE)
            idx.bind(a, 99, 3, [(k, len(BLOCK_TOKENS[k])) for k in b], ends, keys)
            known.extend(k for k in keys if k not in known)
        elif op in ("store", "remove") and known:
            keys = [known[(a + i) % len(known)] for i in range(b)]
            if op == "store":
                idx.pages_stored(keys)
                refcount.update(keys)
            else:
                idx.pages_removed(keys)
                for k in keys:
                    if refcount[k] > 0:
                        refcount[k] -= 1
        elif op == "clear":
            idx.pages_cleared()
            refcount.clear()
        check_engine_invariants(idx, refcount)
    # what match reports is spelled by cached pages only
    for name in ("a", "b"):
        m = idx.match(name, 99, Counter(range(1, 7)) + Counter(range(1, 7)))
        assert m.hit_tokens % PAGE == 0


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(st.integers(1, 8), min_size=1, max_size=5), max_size=40), st.integers(5, 60))
def test_model_mode_respects_capacity_and_structure(sequences, capacity):
    idx = ContextIndex(IndexLimits(capacity_tokens=capacity))
    for seq in sequences:
        path = idx.record("t", 1, 2, [(k, k) for k in seq])
        trie = idx.tenant("t").trie
        assert trie.cached_tokens == sum(n.tokens for n in trie.nodes.values())
        path_tokens = sum(n.tokens for n in path)
        assert trie.cached_tokens <= max(capacity, path_tokens)
        assert all(trie.nodes.get(n.id) is n for n in path)  # the path just served is never evicted
        for node in trie.nodes.values():
            for key, child in node.children.items():
                assert child.parent is node and child.key == key
        wanted = Counter(seq)
        m = idx.match("t", 1, wanted)
        assert not (Counter(m.keys) - wanted)
        assert m.hit_tokens == 2 + sum(m.keys)  # the whole path just recorded is cached
        assert m.hit_tokens >= 2 + sum(seq)
