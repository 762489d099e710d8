"""Online reorder through ContextPilot.optimize / reorder: behaviour and properties."""

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from contextpilot_engine import ContextPilot
from contextpilot_engine.blocks import estimate_tokens, make_block
from contextpilot_engine.index import ContextIndex
from contextpilot_engine.online_reorder import order_online


def docs_in(messages) -> list[str]:
    """The block texts of a rendered system message, in prompt order."""
    system = messages[0]["content"]
    body = system.split("<documents>\n", 1)[1].split("</documents>", 1)[0]
    return [line.split("] ", 1)[1] for line in body.splitlines()]


def test_cached_prefix_comes_first_and_ranking_keeps_relevance():
    pilot = ContextPilot()
    pilot.optimize(["doc A", "doc B", "doc C"], "first")
    messages = pilot.optimize(["doc X", "doc C", "doc A", "doc B"], "second")
    served = docs_in(messages)
    assert served[:3] == docs_in(pilot.optimize(["doc A", "doc B", "doc C"], "again"))
    assert sorted(served) == sorted(["doc X", "doc C", "doc A", "doc B"])
    # the ranking lists prompt positions in retrieval order: X first
    note = messages[0]["content"].rsplit("</documents>", 1)[1]
    ranking = note.split("first: ", 1)[1].split(".", 1)[0].split(" > ")
    assert [served[int(r.strip("[]")) - 1] for r in ranking] == ["doc X", "doc C", "doc A", "doc B"]
    assert messages[1] == {"role": "user", "content": "second"}


def test_ranking_note_comes_after_the_blocks():
    messages = ContextPilot().optimize(["one", "two"], "q")
    system = messages[0]["content"]
    assert system.index("</documents>") < system.index("Importance ranking")


def test_popular_blocks_lead_uncached_requests():
    pilot = ContextPilot()
    for i in range(5):
        pilot.optimize(["popular", f"private {i}"], f"q{i}")
    order = docs_in(pilot.optimize(["fresh", "popular"], "q"))
    assert order[0] == "popular"


def test_a_retrievers_first_matches_lead_when_nothing_else_tells():
    # equal tokens, never seen: the caller's (retrieval) order decides, not the content hash
    for docs in (["doc c", "doc a", "doc b", "doc d"], ["doc d", "doc b", "doc a", "doc c"]):
        assert docs_in(ContextPilot(tokenizer=lambda t: 50).optimize(docs, "q")) == docs


def test_blocks_recent_requests_held_together_keep_their_retrieval_order():
    for later in (["topic 3", "other", "topic 2"], ["topic 2", "other", "topic 3"]):
        pilot = ContextPilot(tokenizer=lambda t: 50)
        pilot.optimize(["topic 1", "topic 2", "topic 3"], "earlier")
        # nothing is cached as a prefix ("topic 1" is not in the request); the window holds them together
        assert docs_in(pilot.optimize(later, "later")) == [later[0], later[2], "other"]


block_text = st.sampled_from([f"block {i}" for i in range(12)])
context = st.lists(block_text, min_size=1, max_size=8)


@settings(max_examples=60, deadline=None)
@given(st.lists(context, min_size=1, max_size=12))
def test_every_online_order_is_a_permutation_and_deterministic(requests):
    a, b = ContextPilot(capacity_tokens=60), ContextPilot(capacity_tokens=60)
    for i, docs in enumerate(requests):
        ma, mb = a.optimize(docs, f"q{i}"), b.optimize(docs, f"q{i}")
        assert ma == mb
        assert Counter(docs_in(ma)) == Counter(docs)


@settings(max_examples=40, deadline=None)
@given(st.lists(context, min_size=1, max_size=10), st.lists(context, min_size=1, max_size=10))
def test_one_tenant_never_changes_another_tenants_orders(mine, theirs):
    alone = ContextPilot()
    shared = ContextPilot()
    for i, docs in enumerate(mine):
        solo = alone.optimize(docs, f"q{i}", tenant="me")
        if i < len(theirs):
            shared.optimize(theirs[i], f"x{i}", tenant="other", conversation_id="c")
        assert shared.optimize(docs, f"q{i}", tenant="me") == solo


def test_order_online_matches_index_state():
    idx = ContextIndex()
    blocks = [make_block(t, estimate_tokens, "b") for t in ["aa", "bb", "cc"]]
    order, hit = order_online(idx, "t", 7, blocks)
    assert hit == 0 and sorted(order) == [0, 1, 2]
    idx.record("t", 7, 3, [(blocks[j].key, blocks[j].tokens) for j in order])
    order2, hit2 = order_online(idx, "t", 7, list(reversed(blocks)))
    assert [2 - j for j in order2] == order and hit2 == 3 + sum(b.tokens for b in blocks)




def test_recently_requested_blocks_lead_over_stale_popular_ones():
    from contextpilot_engine.online_reorder import canonical_order
    from contextpilot_engine.popularity import BlockPopularity

    old, recent = (make_block(t, lambda _: 10, "b") for t in ("old favourite", "recent topic"))
    for decay, leader in ((0.5, recent), (1.0, old)):
        pop = BlockPopularity(100, decay)
        for _ in range(4):
            pop.add([old.key])
        for _ in range(2):
            pop.add([recent.key])
        blocks = [old, recent]
        assert blocks[canonical_order(blocks, [0, 1], pop)[0]] is leader
