"""The routing rule on its own (no Ray, no engine): cost, bounded imbalance, stickiness, options, probes."""

from __future__ import annotations

import random

import pytest

from contextpilot_engine.integration.requests import RequestSpec
from contextpilot_engine.routing.policy import (
    BalanceWindow,
    ReplicaLoad,
    RoutingPolicy,
    StickyTable,
    decide,
    eligible_replicas,
    sticky_key,
)

POLICY = RoutingPolicy()


def loads(*rows):
    return [ReplicaLoad(f"r{i}", hit, queue, recent) for i, (hit, queue, recent) in enumerate(rows)]


def test_the_replica_caching_more_of_the_request_wins():
    d = decide(loads((64, 0, 3), (512, 0, 3)), 1000, POLICY)
    assert (d.replica, d.reason) == ("r1", "cache")


def test_a_longer_queue_costs_queue_weight_of_the_prefill_per_request():
    policy = RoutingPolicy(queue_weight=0.5)
    # r1 saves 400 tokens more but has one more request queued: 0.5 * 1000 > 400
    assert decide(loads((100, 0, 0), (500, 1, 0)), 1000, policy).replica == "r0"
    # saving 600 is worth one queued request
    assert decide(loads((100, 0, 0), (700, 1, 0)), 1000, policy).replica == "r1"
    # by default one queued request costs a tenth of the prefill: 50 tokens saved do not pay for it,
    # 150 do
    assert decide(loads((100, 0, 0), (150, 1, 0)), 1000, POLICY).replica == "r0"
    assert decide(loads((100, 0, 0), (250, 1, 0)), 1000, POLICY).replica == "r1"


def test_nothing_cached_goes_to_the_least_loaded():
    d = decide(loads((0, 2, 1), (0, 1, 1), (0, 1, 0)), 800, POLICY)
    assert (d.replica, d.reason) == ("r2", "least_loaded")


def test_queue_gap_bound():
    policy = RoutingPolicy(max_queue_gap=2)
    assert [c.replica for c in eligible_replicas(loads((900, 3, 0), (0, 0, 0)), policy)] == ["r1"]
    assert decide(loads((900, 3, 0), (0, 0, 0)), 1000, policy).replica == "r1"


def test_balance_bound_holds_over_any_run():
    """Whatever the hits say, no replica gets more than ratio x fewest + slack over the window."""
    policy = RoutingPolicy(balance_ratio=1.2, balance_slack=2, balance_window=10_000)
    rng = random.Random(0)
    window = BalanceWindow(policy.balance_window)
    names = ["a", "b", "c"]
    for _ in range(3000):
        # a heavily favoured replica: it always caches the most
        cands = [ReplicaLoad(n, (900 if n == "a" else rng.randrange(200)), 0, window.count(n)) for n in names]
        d = decide(cands, 1000, policy)
        window.add(d.replica)
        counts = [window.count(n) for n in names]
        assert max(counts) <= policy.balance_ratio * min(counts) + policy.balance_slack
    counts = [window.count(n) for n in names]
    assert max(counts) / min(counts) <= 1.21


def test_sticky_replica_wins_while_eligible_and_spills_over_when_not():
    cands = loads((0, 0, 10), (900, 0, 10))
    assert decide(cands, 1000, POLICY, sticky="r0").reason == "sticky"
    # r0 is over the balance bound: the request spills over to the best other replica
    over = loads((0, 0, 40), (900, 0, 10))
    d = decide(over, 1000, POLICY, sticky="r0")
    assert (d.replica, d.reason) == ("r1", "cache")
    assert decide(cands, 1000, RoutingPolicy(sticky=False), sticky="r0").replica == "r1"


def test_sticky_table_keeps_a_live_mapping_and_replaces_a_dead_one():
    table = StickyTable(2)
    key = sticky_key("chat-1", None, "default")
    table.settle(key, "r0", ["r0", "r1"])
    table.settle(key, "r1", ["r0", "r1"])  # spilled over once: the conversation still lives on r0
    assert table.get(key) == "r0"
    table.settle(key, "r1", ["r1"])  # r0 is gone
    assert table.get(key) == "r1"
    table.settle(("tenant", "x"), "r0", ["r0"])
    table.settle(("tenant", "y"), "r0", ["r0"])
    assert len(table) == 2 and table.get(key) is None  # bounded, least recently used dropped
    table.forget("r0")
    assert len(table) == 0


def test_sticky_keys():
    assert sticky_key("c", "t", "default") == ("conversation", "t", "c")
    assert sticky_key(None, "t", "default") == ("tenant", "t")
    assert sticky_key(None, "default", "default") is None
    assert sticky_key(None, None, "default") is None


def test_balance_window_undo_and_forget():
    w = BalanceWindow(3)
    cell = w.add("a")
    w.add("b")
    w.undo(cell)
    w.undo(cell)
    assert (w.count("a"), w.count("b")) == (0, 1)
    for _ in range(3):
        w.add("c")
    assert (w.count("b"), w.count("c")) == (0, 3)
    w.forget("c")
    assert w.count("c") == 0


def test_one_candidate_and_none():
    assert decide(loads((0, 50, 50)), 10, POLICY).reason == "only"
    with pytest.raises(ValueError, match="no candidate"):
        decide([], 10, POLICY)


@pytest.mark.parametrize("values, message", [
    ({"balance_ratio": 0.5}, "balance_ratio: expected a number in"),
    ({"max_queue_gap": -1}, "max_queue_gap: expected an int"),
    ({"sticky": "yes"}, "sticky: expected true or false"),
    ({"balance_window": 1.5}, "balance_window: expected an int"),
    ({"bogus": 1}, r"unknown option\(s\) \['bogus'\]"),
])
def test_bad_options_name_the_option(values, message):
    with pytest.raises(ValueError, match=message):
        RoutingPolicy.from_dict(values, "request_router_kwargs")


def test_probe_reads_the_blocks_once_whatever_their_order():
    """The probe of a request matches the same cached prefix for any order of its blocks."""
    from contextpilot_engine.index import ContextIndex
    from contextpilot_engine.pilot import ContextPilot
    from contextpilot_engine.routing.probe import probe_request
    from contextpilot_engine.routing.query import RouteQuery

    docs = [f"Document {i}: " + " ".join(f"w{i}x{j}" for j in range(40)) for i in range(4)]
    pilot = ContextPilot(index=ContextIndex())  # a modelled index: whatever was served is "cached"
    pilot.optimize(docs[:3], "first")  # serves (and so models as cached) three of the blocks
    system = "Answer.\n" + "".join(f"<document>{d}</document>\n" for d in reversed(docs))
    query = RouteQuery([{"role": "system", "content": system}, {"role": "user", "content": "q"}])
    probe = probe_request(query, pilot, implicit_documents=True)
    assert probe is not None and probe.sticky is None
    explicit = RouteQuery([{"role": "user", "content": "q"}], spec=RequestSpec(contexts=[docs[2], docs[0], docs[1]]))
    other = probe_request(explicit, pilot, implicit_documents=True)
    assert other is not None
    # the explicit request has no caller system text: another preamble, so another tree root
    assert other.hit_tokens(pilot.index) > 0
    assert set(other.wanted) <= set(probe.wanted)
    assert probe_request(RouteQuery([{"role": "user", "content": "plain"}]), pilot, True) is None
    chat = RouteQuery([{"role": "user", "content": "q"}], spec=RequestSpec(contexts=docs, conversation_id="c1"))
    assert probe_request(chat, pilot, True).sticky == ("conversation", "default", "c1")
