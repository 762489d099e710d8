"""Concurrent arrivals: planned jointly (ContextPilot.serve_group) and admitted in the planned order (arrivals.py).

The window is driven on a real asyncio loop with the integration layer's real
request path (EngineState, rewriting, the pilot); only the engine is absent:
what the adapter would render is the prepared conversation itself.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from contextpilot_engine import ContextPilot
from contextpilot_engine.integration import arrivals
from contextpilot_engine.integration.options import OptionError, PluginOptions
from contextpilot_engine.integration.requests import ContextPilotRequestError
from contextpilot_engine.integration.state import EngineState
from contextpilot_engine.request_pipeline import PendingRequest

DOCS = [f"Document number {i}. " + ("lorem ipsum dolor sit amet " * (12 + i)) for i in range(40)]


def words(text: str) -> int:
    return len(text.split())


def conversation(ids, query, contextpilot=None):
    system = {"role": "system", "content": "You answer.\n" + "".join(f"<document>{DOCS[i]}</document>" for i in ids)}
    if contextpilot is not None:
        system["contextpilot"] = contextpilot
    return [system, {"role": "user", "content": query}]


def lcp(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# ------------------------------------------------------------------ core: serve_group
def test_serve_group_plans_jointly_keeps_cached_prefix_and_admits_every_request_once():
    pilot = ContextPilot(tokenizer=words)
    warm = pilot.parse_docs([DOCS[0], DOCS[1]])
    cached = [[0, 1][j] for j in pilot.serve(warm, "warm-up").report["order"]]  # the tenant's cached prefix
    rng = random.Random(3)
    sets = [rng.sample(range(2, 12), 4) + ([0, 1] if n % 3 == 0 else []) for n in range(24)]
    pending = [PendingRequest(pilot.parse_docs([DOCS[i] for i in s]), f"q{n}") for n, s in enumerate(sets)]
    served, admission = pilot.serve_group(pending)

    assert sorted(admission) == list(range(len(sets)))
    for n, s in enumerate(sets):
        order = served[n].report["order"]
        assert sorted(order) == list(range(len(s)))  # a permutation: nothing dropped, nothing added
        spelled = [s[j] for j in order]
        if n % 3 == 0:
            assert spelled[:2] == cached  # the cached prefix stays first
            assert served[n].report["expected_cached_tokens"] > 0
    # joint planning: consecutive admissions share prefixes far more than arrival order
    seqs = [[sets[n][j] for j in served[n].report["order"]] for n in range(len(sets))]
    admitted = sum(lcp(seqs[a], seqs[b]) for a, b in zip(admission, admission[1:]))
    assert admitted >= len(sets) // 2


def test_serve_group_serves_conversations_alone_and_first():
    pilot = ContextPilot(tokenizer=words)
    pending = [
        PendingRequest(pilot.parse_docs([DOCS[1], DOCS[2]]), "a"),
        PendingRequest(pilot.parse_docs([DOCS[2], DOCS[3]]), "b", conversation_id="c1"),
        PendingRequest(pilot.parse_docs([DOCS[1], DOCS[3]]), "c"),
    ]
    served, admission = pilot.serve_group(pending)
    assert admission[0] == 1 and sorted(admission) == [0, 1, 2]
    assert served[1].turn == 1 and pilot.conversation_turns("c1") == 1
    assert served[0].turn is None and served[2].turn is None


def test_serve_group_rejects_a_bad_request_before_serving_any():
    pilot = ContextPilot(tokenizer=words)
    good = PendingRequest(pilot.parse_docs([DOCS[1]]), "a")
    before = pilot.stats()
    with pytest.raises(ValueError, match=r"requests\[1\]\.conversation_id"):
        pilot.serve_group([good, PendingRequest(pilot.parse_docs([DOCS[2]]), "b", conversation_id="")])
    with pytest.raises(TypeError, match=r"requests\[0\]: expected a PendingRequest"):
        pilot.serve_group([{"blocks": []}])
    assert pilot.stats() == before


# ------------------------------------------------------------- integration: the window
def make_state(name: str, **options) -> EngineState:
    return EngineState(f"test-arrivals-{name}", PluginOptions(channel="off", **options), None)


async def burst(state, convs, *, delay=None, cancel=()):
    """Send ``convs`` at once; returns (tickets or errors, order in which requests passed finish())."""
    window = arrivals.window_for(state)
    rng = random.Random(0)
    passed: list[int] = []

    async def one(n):
        ticket = await window.arrive(state, [convs[n]], None, None, [])
        try:
            if n in cancel:
                raise asyncio.CancelledError
            await asyncio.sleep(rng.random() * 0.004 if delay is None else delay)  # renders take varying time
        finally:
            await ticket.finish()
        passed.append(n)
        return ticket

    results = await asyncio.gather(*(one(n) for n in range(len(convs))), return_exceptions=True)
    return results, passed


def chain(tickets) -> list[int]:
    """The admission order the tickets encode (each waits on its predecessor's event)."""
    by_after = {id(t._after): n for n, t in enumerate(tickets) if t._after is not None}
    firsts = [n for n, t in enumerate(tickets) if t._after is None and t.group_size > 1]
    order = firsts[:1]
    while order and id(tickets[order[-1]]._done) in by_after:
        order.append(by_after[id(tickets[order[-1]]._done)])
    return order


def test_a_lone_request_is_never_held():
    state = make_state("lone")

    async def main():
        window = arrivals.window_for(state)
        t = await window.arrive(state, [conversation([1, 2, 3], "q")], None, None, [])
        await t.finish()
        return t, window

    ticket, window = asyncio.run(main())
    assert ticket.group_size == 1 and ticket._after is None and window.groups == 0
    assert ticket.prepared.plans[0].report["applied"] and ticket.prepared.plans[0].report["planned_with"] == 0


def test_a_burst_is_planned_as_one_group_and_passes_in_admission_order():
    state = make_state("burst")
    rng = random.Random(1)
    sets = [rng.sample(range(16), 6) for _ in range(30)]
    results, passed = asyncio.run(burst(state, [conversation(s, f"q{n}") for n, s in enumerate(sets)]))
    grouped = [n for n, t in enumerate(results) if t.group_size > 1]
    assert len(grouped) >= len(sets) - 2  # only the first arrival(s) went alone
    for n in grouped:
        report = results[n].prepared.plans[0].report
        assert report["applied"] and report["planned_with"] == len(grouped) - 1
    order = chain(results)
    assert sorted(order) == sorted(grouped)
    assert [n for n in passed if n in set(grouped)] == order  # reached "the engine" in the planned order
    seqs = {n: [sets[n][j] for j in results[n].prepared.plans[0].report["order"]] for n in grouped}
    shared = sum(lcp(seqs[a], seqs[b]) for a, b in zip(order, order[1:]))
    assert shared >= len(grouped) // 2


def test_a_bad_request_in_a_burst_gets_its_own_error_and_the_others_go_on():
    state = make_state("bad")
    convs = [conversation([n % 5, 7, 9], f"q{n}") for n in range(10)]
    convs[5] = conversation([1, 2], "bad", contextpilot={"tenant": 42})
    results, _ = asyncio.run(burst(state, convs))
    assert isinstance(results[5], ContextPilotRequestError) and "tenant" in str(results[5])
    assert all(not isinstance(r, BaseException) for n, r in enumerate(results) if n != 5)


def test_a_cancelled_request_does_not_hold_up_the_next():
    state = make_state("cancel")
    convs = [conversation([n % 4, 8, 9], f"q{n}") for n in range(12)]
    results, passed = asyncio.run(burst(state, convs, cancel={3, 4, 5}))
    assert sum(isinstance(r, asyncio.CancelledError) for r in results) == 3
    assert len(passed) == 9


def test_window_zero_plans_every_request_alone():
    state = make_state("off", arrival_window_ms=0)
    results, _ = asyncio.run(burst(state, [conversation([n % 3, 5], f"q{n}") for n in range(8)]))
    assert all(t.group_size == 1 for t in results)
    assert all(t.prepared.plans[0].report["planned_with"] == 0 for t in results)


def test_max_group_closes_a_group_at_that_size():
    state = make_state("max", arrival_max_group=4)
    results, _ = asyncio.run(burst(state, [conversation([n % 3, 5, 6], f"q{n}") for n in range(13)]))
    assert max(t.group_size for t in results) == 4


@pytest.mark.parametrize(
    "options, message",
    [
        ({"arrival_window_ms": -1}, "arrival_window_ms"),
        ({"arrival_max_wait_ms": "5"}, "arrival_max_wait_ms"),
        ({"arrival_max_group": 0}, "arrival_max_group"),
    ],
)
def test_bad_arrival_options_are_rejected_by_name(options, message):
    with pytest.raises(OptionError, match=message):
        PluginOptions.from_dict(options)
