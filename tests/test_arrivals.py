"""Concurrent arrivals: planned jointly (ContextPilot.serve_group) and admitted in the planned order (arrivals.py).

The window is driven on a real asyncio loop with the integration layer's real
request path (EngineState, rewriting, the pilot); only the engine is absent:
what the adapter would render is the prepared conversation itself.
"""

from __future__ import annotations

import asyncio
import gc
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from contextpilot_engine import ContextPilot
from contextpilot_engine.integration import arrivals
from contextpilot_engine.integration.options import OptionError, PluginOptions
from contextpilot_engine.integration.conversation import RequestContext, find_context, may_carry_blocks
from contextpilot_engine.integration.requests import ContextPilotRequestError, RequestSpec
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


def test_a_request_without_blocks_is_never_held_and_opens_no_group():
    state = make_state("plain")
    plain = [{"role": "system", "content": "You answer."}, {"role": "user", "content": "hello"}]
    no_system = [{"role": "user", "content": "hi there"}]
    convs = [conversation([n % 4, 6, 7], f"q{n}") for n in range(12)]
    mixed = convs[:6] + [plain, no_system] + convs[6:]

    async def main():
        window = arrivals.window_for(state)
        # plain chats alone, back to back: none waits, none starts a group for the next
        for conv in (plain, no_system, plain):
            t = await asyncio.wait_for(window.arrive(state, [conv], None, None, []), 0.5)
            await t.finish()
            assert t.group_size == 1 and t.prepared is None
        assert window.groups == 0 and window._open is None
        return await burst(state, mixed)

    results, _ = asyncio.run(main())
    assert [results[n].group_size for n in (6, 7)] == [1, 1] and results[6].prepared is None
    grouped = [n for n, t in enumerate(results) if t.group_size > 1]
    assert len(grouped) >= len(convs) - 2 and not {6, 7} & set(grouped)
    assert all(results[n].group_size == len(grouped) for n in grouped)  # the plain chats did not split it


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


def test_a_request_cancelled_just_after_its_plan_passes_its_turn_on():
    """A client that leaves in the loop turn its plan arrives in: the requests after it are not held up."""
    state = make_state("cancel-race", arrival_window_ms=20, arrival_max_wait_ms=5000)
    convs = [conversation([n, n + 1, 9], f"q{n}") for n in range(4)]

    async def main():
        window = arrivals.window_for(state)
        loop = asyncio.get_running_loop()
        class LeavesAtOnce(asyncio.Future):
            cancelled_one = None

            def set_result(self, result):  # the plan is in, and the request's task is cancelled before it resumes
                super().set_result(result)
                if isinstance(result, arrivals.Ticket) and LeavesAtOnce.cancelled_one is None:
                    LeavesAtOnce.cancelled_one = self
                    self.task.cancel()

        def create_future():
            f = LeavesAtOnce(loop=loop)
            f.task = asyncio.current_task()  # the task that will await it
            return f

        loop.create_future = create_future  # this loop only, for this burst
        started = time.monotonic()

        async def one(n):
            ticket = await window.arrive(state, [convs[n]], None, None, [])
            try:
                await asyncio.sleep(0.001)
            finally:
                await ticket.finish()
                ticket.completed()
            return time.monotonic() - started

        running = [asyncio.ensure_future(one(n)) for n in range(len(convs))]
        results = await asyncio.gather(*running, return_exceptions=True)
        return results, LeavesAtOnce.cancelled_one, window

    results, cancelled, window = asyncio.run(main())
    assert sum(isinstance(r, asyncio.CancelledError) for r in results) == 1
    ticket = cancelled.result()
    assert ticket._done is None or ticket._done.is_set()  # its successor was let go
    assert window.serving == 0  # and it no longer counts as being served
    assert max(r for r in results if not isinstance(r, BaseException)) < 2.0  # nobody waited out the 5 s bound


def test_a_bug_in_the_window_serves_the_request_as_sent(monkeypatch):
    state = make_state("window-bug", arrival_window_ms=1000)  # the second request joins a group, however slow
    conv = conversation([1, 2], "q")

    async def main():
        window = arrivals.window_for(state)
        first = await window.arrive(state, [conv], None, None, [])  # alone: nothing before it
        first.completed()

        def broken(*args, **kwargs):
            raise RuntimeError("injected bug outside prepare_group's own guard")

        monkeypatch.setattr(arrivals, "prepare", broken)
        sink: list = []
        ticket = await asyncio.wait_for(window.arrive(state, [conv], None, None, sink), 5)
        return ticket, sink

    ticket, sink = asyncio.run(main())
    assert ticket.prepared.plans == [None] and sink[0]["reason"] == "arrival_error"
    assert all(DOCS[i] in ticket.prepared.conversations[0][0]["content"] for i in (1, 2))  # nothing hidden


def test_window_zero_plans_every_request_alone():
    state = make_state("off", arrival_window_ms=0)
    results, _ = asyncio.run(burst(state, [conversation([n % 3, 5], f"q{n}") for n in range(8)]))
    assert all(t.group_size == 1 for t in results)
    assert all(t.prepared.plans[0].report["planned_with"] == 0 for t in results)


def test_max_group_closes_a_group_at_that_size():
    state = make_state("max", arrival_max_group=4)
    results, _ = asyncio.run(burst(state, [conversation([n % 3, 5, 6], f"q{n}") for n in range(13)]))
    assert max(t.group_size for t in results) == 4


async def served_after(window, state, conv, delay):
    """One request arriving ``delay`` s from now, rendered and completed at once; its ticket."""
    await asyncio.sleep(delay)
    ticket = await window.arrive(state, [conv], None, None, [])
    await ticket.finish()
    ticket.completed()
    return ticket


async def paused_burst(state, convs, pause_s, busy: bool):
    """``convs`` in two halves ``pause_s`` apart, with one earlier request still being served or not."""
    window = arrivals.window_for(state)
    first = await window.arrive(state, [conversation([30, 31], "earlier")], None, None, [])
    await first.finish()  # admitted: the engine works on it until completed()
    if not busy:
        first.completed()
    half = len(convs) // 2
    tickets = await asyncio.gather(
        *(served_after(window, state, convs[n], 0 if n < half else pause_s) for n in range(len(convs)))
    )
    serving_before = window.serving
    first.completed()
    return tickets, serving_before, window.serving


@pytest.mark.parametrize("busy, groups", [(True, 1), (False, 2)])
def test_a_pause_in_a_burst_splits_it_only_while_the_engine_is_idle(busy, groups):
    # the pause (10 ms) is longer than the quiet window (2 ms) and shorter than the busy one (25 ms)
    state = make_state(f"pause-{busy}", arrival_window_ms=2, arrival_busy_window_ms=25)
    convs = [conversation([n % 6, 6 + n % 4, 12], f"q{n}") for n in range(16)]
    tickets, serving, after = asyncio.run(paused_burst(state, convs, 0.010, busy))
    sizes = [t.group_size for t in tickets]
    if groups == 1:
        assert sizes == [len(convs)] * len(convs)  # one group: the pause did not close it
    else:
        half = len(convs) // 2
        assert max(sizes[:half]) <= half and max(sizes[half:]) <= half  # cut at the pause
    assert serving == (1 if busy else 0) and after == 0  # completed requests no longer count as served


def test_steady_traffic_on_a_busy_engine_is_not_held_as_a_burst():
    # two requests together open a group; the rest come one every 8 ms (longer than the quiet
    # window, shorter than the busy one) while an earlier request is still being served: that is
    # steady traffic, and the group closes once most of its gaps were long, not after max_wait
    state = make_state("steady", arrival_window_ms=2, arrival_busy_window_ms=25, arrival_max_wait_ms=250)
    convs = [conversation([n % 5, 7, 8], f"q{n}") for n in range(12)]

    async def main():
        window = arrivals.window_for(state)
        first = await window.arrive(state, [conversation([30, 31], "earlier")], None, None, [])
        await first.finish()  # still served: the engine is busy throughout
        start = time.monotonic()
        delays = [0.0, 0.0] + [0.008 * k for k in range(1, len(convs) - 1)]
        tickets = await asyncio.gather(*(served_after(window, state, c, d) for c, d in zip(convs, delays)))
        first.completed()
        return tickets, time.monotonic() - start

    tickets, took = asyncio.run(main())
    sizes = [t.group_size for t in tickets]
    assert max(sizes) <= 4, sizes  # not one group held open across the whole stream
    assert took < 0.2  # the last request went within a short gap of arriving, not at max_wait


def test_a_loop_held_up_past_the_quiet_gap_does_not_split_a_burst():
    # idle engine, 2 ms gaps; the loop is blocked for 20 ms while the group is open, and the rest of
    # the burst becomes ready during the block, after the group's timer was due: not a quiet gap
    state = make_state("stall", arrival_window_ms=2, arrival_busy_window_ms=2)
    convs = [conversation([n % 5, 7, 8], f"q{n}") for n in range(12)]

    async def main():
        window = arrivals.window_for(state)
        first = await window.arrive(state, [conversation([30, 31], "earlier")], None, None, [])
        await first.finish()
        first.completed()

        async def stall():
            await asyncio.sleep(0)  # the first half arrives in the next turn of the loop,
            await asyncio.sleep(0)  # so the block starts right after it (a timer could fire late on a loaded machine)
            time.sleep(0.020)  # the server busy elsewhere, holding the loop

        tasks = [served_after(window, state, convs[n], 0 if n < 6 else 0.005) for n in range(len(convs))]
        *tickets, _ = await asyncio.gather(*tasks, stall())
        return tickets, window.rearmed

    tickets, rearmed = asyncio.run(main())
    assert rearmed >= 1
    assert [t.group_size for t in tickets] == [len(convs)] * len(convs)


def test_a_ticket_counts_as_served_from_its_plan_until_completed_or_dropped():
    state = make_state("serving")

    async def main():
        window = arrivals.window_for(state)
        t = await window.arrive(state, [conversation([1, 2], "q")], None, None, [])
        planned = window.serving
        await t.finish()
        admitted = window.serving
        t.completed()
        t.completed()  # idempotent
        done = window.serving
        u = await window.arrive(state, [conversation([2, 3], "r")], None, None, [])
        await u.finish()
        held = window.serving
        del u  # an adapter that never says completed(): the dropped ticket no longer counts
        await asyncio.sleep(0)  # the loop lets go of the future that delivered it
        gc.collect()
        return planned, admitted, done, held, window.serving

    assert asyncio.run(main()) == (1, 1, 0, 1, 0)


def test_completed_with_calls_back_when_the_stream_ends_or_is_closed():
    async def stream(n):
        for i in range(n):
            yield i

    async def main():
        calls = []
        got = [c async for c in arrivals.completed_with(stream(3), lambda: calls.append("end"))]
        closed = arrivals.completed_with(stream(5), lambda: calls.append("closed"))
        await closed.__anext__()
        await closed.aclose()  # the client went away after the first chunk
        return got, calls

    assert asyncio.run(main()) == ([0, 1, 2], ["end", "closed"])


@pytest.mark.parametrize(
    "options, message",
    [
        ({"arrival_window_ms": -1}, "arrival_window_ms"),
        ({"arrival_max_wait_ms": "5"}, "arrival_max_wait_ms"),
        ({"arrival_busy_window_ms": 10_001}, "arrival_busy_window_ms"),
        ({"arrival_max_group": 0}, "arrival_max_group"),
    ],
)
def test_bad_arrival_options_are_rejected_by_name(options, message):
    with pytest.raises(OptionError, match=message):
        PluginOptions.from_dict(options)


@pytest.mark.parametrize(
    "messages, spec, implicit, carries",
    [
        ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q"}], None, True, False),
        ([{"role": "user", "content": "q <document>x</document>"}], None, True, False),  # only the system message holds documents
        ([{"role": "system", "content": "<document>x</document>"}, {"role": "user", "content": "q"}], None, True, True),
        ([{"role": "system", "content": [{"type": "text", "text": "<document>x</document>"}]}], None, True, True),
        ([{"role": "system", "content": "<document>x</document>"}], None, False, False),
        ([{"role": "user", "content": "q", "contextpilot": {"contexts": ["a"]}}], None, True, True),
        ([{"role": "user", "content": "q"}], RequestSpec(contexts=["a"]), False, True),
        ([{"role": "system", "content": "<document>x</document>"}], RequestSpec(enabled=False), True, False),
        ([], None, True, False),
    ],
)
def test_may_carry_blocks_is_false_only_where_find_context_finds_no_blocks(messages, spec, implicit, carries):
    assert may_carry_blocks(messages, spec, implicit) is carries
    if not carries:  # never a false "no": the full parse agrees
        found = find_context(PluginOptions().pilot, messages, spec, implicit)
        assert not isinstance(found, RequestContext)


def test_bench_arrivals_script_reports_each_rate():
    # scripts/bench_arrivals.py, at a tiny size: one line per rate, and at a rate that keeps the
    # engine busy most requests still go through without waiting for a group
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_arrivals.py"
    out = subprocess.run(
        [sys.executable, str(script), "--rates", "40,80", "--requests", "40", "--service-ms", "100"],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout.splitlines()
    assert out[0].split()[:2] == ["req/s", "mean"] and [line.split()[0] for line in out[1:]] == ["40", "80"]
    for line in out[1:]:
        rate, mean, median, p99, grouped, groups = line.split()
        assert float(median) < 10 and int(grouped) <= 40
