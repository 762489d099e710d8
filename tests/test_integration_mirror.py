"""The page mirror of the integration layer: engine hashes re-keyed to canonical pages, one door into the index.

Engine-neutral, no engine needed: the events are shaped as the engines
report them (vLLM's block pool: hash plus a canonical key the adapter
computed from the request's tokens; SGLang's radix cache and both engines'
KV events: hashes, the parent page's hash and the pages' token ids).
"""

from contextpilot_engine.index import ContextIndex
from contextpilot_engine.integration.mirror import PageMirror
from contextpilot_engine.pages import chain_page_keys

PRE = 1
PAGE = 4


def bind_prompt(idx, tenant, blocks, preamble_tokens=8):
    """Bind a prompt: an 8-token preamble (ids 1000..1007), then blocks of given token ids."""
    tokens = list(range(1000, 1000 + preamble_tokens))
    ends = [preamble_tokens]
    for _, ids in blocks:
        tokens += ids
        ends.append(len(tokens))
    idx.bind(tenant, PRE, preamble_tokens, [(k, len(ids)) for k, ids in blocks], ends, chain_page_keys(tokens, PAGE))
    return tokens


def test_chained_events_are_rekeyed_and_counted():
    """Stored events carry engine hashes, the parent hash and token ids (KV-event style)."""
    idx = ContextIndex()
    idx.attach_engine(PAGE)
    mirror = PageMirror(idx, PAGE)
    tokens = list(range(1000, 1008)) + list(range(1, 9))
    bind_prompt(idx, "t", [(10, list(range(1, 9)))])
    # the engine uses its own opaque hashes
    mirror.stored_chain([b"h0", b"h1"], None, tokens[:8])
    mirror.stored_chain([b"h2", b"h3"], b"h1", tokens[8:16])
    assert idx.match("t", PRE, {10: 1}).hit_tokens == 16
    mirror.removed([b"h3"])
    assert idx.match("t", PRE, {10: 1}).hit_tokens == 12
    mirror.stored_chain([b"zz"], b"never-seen", [1, 2, 3, 4])
    assert mirror.unattributed == 1
    mirror.cleared()
    assert idx.match("t", PRE, {10: 1}).hit_tokens == 0


def test_sglang_style_events_node_removal_with_many_pages():
    """SGLang emits one stored event per page and one removed event per evicted node (all its pages)."""
    idx = ContextIndex()
    idx.attach_engine(1)
    mirror = PageMirror(idx, 1)
    tokens = [7, 8, 9, 1, 2, 3, 4]
    idx.bind("t", PRE, 3, [(10, 4)], [3, 7], chain_page_keys(tokens, 1))
    parent = None
    hashes = []
    for i, tok in enumerate(tokens):
        h = f"sha-{i}"
        mirror.stored_chain([h], parent, [tok])
        parent = h
        hashes.append(h)
    assert idx.match("t", PRE, {10: 1}).hit_tokens == 7
    mirror.removed(hashes[5:])  # the leaf node holding the last two tokens
    assert idx.match("t", PRE, {10: 1}).hit_tokens == 5


def test_duplicate_hashes_are_counted_per_copy_and_keep_their_key_within_a_scope():
    idx = ContextIndex()
    idx.attach_engine(PAGE)
    mirror = PageMirror(idx, PAGE)
    key = chain_page_keys(list(range(4)), PAGE)[0]
    mirror.stored("h", key)
    mirror.stored("h", key)  # a second physical copy
    mirror.removed(["h"])
    assert idx.cached_pages() == {key: 1} and mirror.canonical_counts() == {key: 1}
    mirror.begin()
    mirror.removed(["h"])  # moved: removed, then stored again in the same engine call
    assert mirror.known("h") == key
    mirror.stored("h", mirror.known("h"))
    mirror.end()
    assert idx.cached_pages() == {key: 1} and mirror.known("h") == key
    mirror.removed(["h", "never-stored"])
    assert idx.cached_pages() == {} and mirror.known("h") is None
