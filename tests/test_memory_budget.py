"""The process memory budget: it holds, it is fair across tenants, and it never evicts the engine's mirror.

Every test uses a budget of its own (``ContextIndex(budget=...)``), so the
process budget that the rest of the suite shares is left alone, except where
a test checks the configuration path and restores it.
"""

import gc
from collections import Counter

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from contextpilot_engine import ContextPilot
from contextpilot_engine.config import PilotConfig
from contextpilot_engine.dedup import CONVERSATION_BYTES
from contextpilot_engine.dedup import ENTRY_BYTES as CONVERSATION_ENTRY_BYTES
from contextpilot_engine.index import TENANT_BYTES, ContextIndex, IndexLimits
from contextpilot_engine.integration.mirror import PageMirror
from contextpilot_engine.lifetimes import ODDS_BYTES, RUN_BYTES
from contextpilot_engine.memory_budget import (
    MIB,
    REASON_BUDGET,
    REASON_FAIR_SHARE,
    EvictionRequest,
    MemoryBudget,
    process_budget,
)
from contextpilot_engine.pages import chain_page_keys
from contextpilot_engine.co_occurrence import ENTRY_BYTES as RECENT_ENTRY_BYTES
from contextpilot_engine.popularity import ENTRY_BYTES as POPULARITY_ENTRY_BYTES
from contextpilot_engine.trie import NODE_BYTES

PRE = 1
PAGE = 2


def pilot_with(budget: MemoryBudget, **options) -> ContextPilot:
    config = PilotConfig(**options)
    return ContextPilot(config=config, index=ContextIndex(config.index_limits, budget=budget))


def recount(pilot: ContextPilot) -> dict:
    """What the budget should hold, recomputed from the structures themselves."""
    out = {}
    idx = pilot.index
    for name, state in idx._tenants.items():
        trie = state.trie
        mirrored = sum(1 for n in trie.nodes.values() if n.pages and n.lead_cached > 0)
        assert trie.mirrored == mirrored
        charged = trie.node_count() - mirrored
        out[("trie", name)] = (charged, charged * NODE_BYTES + TENANT_BYTES)
        n = len(state.popularity)
        out[("popularity", name)] = (n, n * POPULARITY_ENTRY_BYTES)
        n = state.recent.entries()
        out[("recent_requests", name)] = (n, n * RECENT_ENTRY_BYTES)
    store = pilot.conversations
    for tenant in store._accounts:
        convs = [c for (t, _), c in store._convs.items() if t == tenant]
        entries = sum(1 + len(c.blocks) + len(c.chunks) for c in convs)
        out[("conversations", tenant)] = (entries, len(convs) * CONVERSATION_BYTES
                                          + (entries - len(convs)) * CONVERSATION_ENTRY_BYTES)
        runs = sum(len(c.runs) for c in convs)
        out[("lifetimes", tenant)] = (runs, runs * RUN_BYTES + (ODDS_BYTES if tenant in store._odds else 0))
    return out


def check_accounting(pilot: ContextPilot, budget: MemoryBudget) -> None:
    expected = recount(pilot)
    held = {}
    for use in budget._tenants.values():
        for account in use.accounts:
            key = (account.structure, account.tenant)
            e, b = held.get(key, (0, 0))
            held[key] = (e + account.entries, b + account.bytes)
    assert {k: v for k, v in held.items() if v != (0, 0)} == {k: v for k, v in expected.items() if v != (0, 0)}
    assert budget.used_entries == sum(e for e, _ in expected.values())
    assert budget.used_bytes == sum(b for _, b in expected.values())


def doc(i: int) -> str:
    return f"document number {i} " + "word " * (i % 7)


# ----------------------------------------------------------------------------- the budget holds
events = st.lists(
    st.one_of(
        st.tuples(
            st.just("optimize"), st.sampled_from(["a", "b", "c"]), st.sampled_from([None, "c1", "c2", "c3"]),
            st.lists(st.integers(0, 40), min_size=1, max_size=5),
        ),
        st.tuples(st.just("batch"), st.sampled_from(["a", "b"]), st.none(),
                  st.lists(st.integers(0, 40), min_size=2, max_size=6)),
        st.tuples(st.just("dedup"), st.sampled_from(["a", "c"]), st.sampled_from(["c1", "c4"]),
                  st.lists(st.integers(0, 40), min_size=1, max_size=4)),
        st.tuples(st.just("end"), st.sampled_from(["a", "b", "c"]), st.sampled_from(["c1", "c2"]), st.just([])),
        st.tuples(st.just("reset"), st.sampled_from(["a", "b"]), st.none(), st.just([])),
    ),
    max_size=30,
)


#: the smallest byte budget the property test draws: the fixed cost of its three tenants, which only
#: dropping a tenant frees (a budget below what the tenants in use cost by themselves cannot hold)
MIN_KIB = -(-3 * TENANT_BYTES // 1024)


@settings(max_examples=120, deadline=None)
@given(events, st.integers(12, 80), st.integers(MIN_KIB, MIN_KIB + 72))
# a third tenant shrinks the shares: the two others are above theirs without having grown, and what
# they hold above them is mostly the tree's fixed per-tenant cost, which no eviction frees
@example([("optimize", "a", None, [0])] * 6 + [("optimize", "c", None, [0]), ("optimize", "a", None, [0]),
          ("optimize", "b", None, [0])], 12, MIN_KIB)
def test_budget_holds_after_any_event_sequence(operations, max_entries, kib):
    budget = MemoryBudget(max_bytes=kib * 1024, max_entries=max_entries)
    pilot = pilot_with(budget)
    for op, tenant, cid, docs in operations:
        texts = [doc(i) for i in docs]
        if op == "optimize":
            pilot.optimize(texts, "q", tenant=tenant, conversation_id=cid)
        elif op == "batch":
            pilot.optimize_batch([texts[: len(texts) // 2], texts[len(texts) // 2 :]], ["q1", "q2"], tenant=tenant)
        elif op == "dedup":
            pilot.deduplicate([texts], conversation_id=cid, tenant=tenant)
        elif op == "end":
            try:
                pilot.end_conversation(cid, tenant=tenant)
            except ValueError:
                pass  # never started, or evicted by the budget
        else:
            pilot.reset(tenant=tenant)
        assert budget.used_entries <= max_entries
        assert budget.used_bytes <= kib * 1024
        check_accounting(pilot, budget)


@settings(max_examples=120, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("bind"), st.sampled_from(["a", "b"]), st.lists(st.integers(1, 30), min_size=1,
                                                                             max_size=4)),
            st.tuples(st.just("store"), st.integers(0, 60), st.integers(1, 4)),
            st.tuples(st.just("remove"), st.integers(0, 60), st.integers(1, 4)),
            st.tuples(st.just("clear"), st.just(0), st.just(0)),
        ),
        max_size=40,
    ),
    st.integers(8, 40),
)
def test_engine_mode_budget_holds_and_never_evicts_mirrored_nodes(operations, max_entries):
    budget = MemoryBudget(max_bytes=None, max_entries=max_entries)
    idx = ContextIndex(IndexLimits(max_nodes=10_000), budget=budget)
    idx.attach_engine(PAGE)
    known: list[int] = []
    pilot = ContextPilot(index=idx)
    for op, a, b in operations:
        mirrored_before = {
            n.id for s in idx._tenants.values() for n in s.trie.nodes.values() if n.pages and n.lead_cached
        }
        if op == "bind":
            tokens = [7, 7, 7]
            ends = [3]
            for k in b:
                tokens += [k * 10 + i for i in range(1 + k % 3)]
                ends.append(len(tokens))
            keys = chain_page_keys(tokens, PAGE)
            idx.bind(a, 99, 3, [(k, 1 + k % 3) for k in b], ends, keys)
            known.extend(k for k in keys if k not in known)
            # the budget's eviction (triggered by bind) kept every mirrored node
            alive = {n.id for s in idx._tenants.values() for n in s.trie.nodes.values()}
            assert mirrored_before <= alive
        elif op in ("store", "remove") and known:
            keys = [known[(a + i) % len(known)] for i in range(b)]
            (idx.pages_stored if op == "store" else idx.pages_removed)(keys)
        elif op == "clear":
            idx.pages_cleared()
        if op == "bind":  # page events only change what is charged; the next settle evicts
            assert budget.used_entries <= max_entries
        check_accounting(pilot, budget)


# ----------------------------------------------------------------------------- fairness
def test_a_noisy_tenant_cannot_evict_another_tenants_floor():
    budget = MemoryBudget(max_bytes=None, max_entries=400)
    pilot = pilot_with(budget)
    for i in range(6):
        pilot.optimize([doc(j) for j in range(i, i + 4)], "q", tenant="quiet", conversation_id="chat")
    quiet = budget.usage_of("quiet")
    assert 0 < quiet.entries < 400 // 2  # below its share once a second tenant holds memory
    quiet_state = pilot.index.snapshot()["tenants"]["quiet"]
    quiet_turns = pilot.conversation_turns("chat", tenant="quiet")
    for i in range(600):  # every request brings new blocks
        pilot.optimize([doc(1000 + 5 * i + j) for j in range(5)], "q", tenant="noisy", conversation_id=f"n{i % 50}")
        assert budget.used_entries <= 400
    assert budget.usage_of("quiet") == quiet
    assert pilot.index.snapshot()["tenants"]["quiet"] == quiet_state
    assert pilot.conversation_turns("chat", tenant="quiet") == quiet_turns
    evictions = budget.stats()["evictions"]
    assert evictions["trie"][REASON_BUDGET]["entries"] > 0  # the noisy tenant evicted its own entries
    assert all(REASON_FAIR_SHARE not in reasons for reasons in evictions.values())


def test_a_tenant_below_its_share_takes_room_from_one_above_it_but_not_below_its_share():
    budget = MemoryBudget(max_bytes=None, max_entries=300)
    pilot = pilot_with(budget)
    for i in range(200):  # alone, the first tenant may use the whole budget
        pilot.optimize([doc(5 * i + j) for j in range(5)], "q", tenant="early")
    assert budget.usage_of("early").entries > 250
    for i in range(200):
        pilot.optimize([doc(5000 + 5 * i + j) for j in range(5)], "q", tenant="late")
        assert budget.used_entries <= 300
        assert budget.usage_of("early").entries >= 300 // 2  # never pushed below its share
    assert budget.usage_of("late").entries >= 300 // 2 - 12  # grew to about its share
    assert budget.stats()["evictions"]["trie"][REASON_FAIR_SHARE]["entries"] > 0


def test_memory_above_the_floors_goes_to_the_tenant_in_use_first():
    budget = MemoryBudget(max_bytes=None, max_entries=300)
    pilot = pilot_with(budget)
    for i in range(150):  # grows far past its share, then stops sending requests
        pilot.optimize([doc(5 * i + j) for j in range(5)], "q", tenant="idle")
    for i in range(1):  # stays well below its share
        pilot.optimize([doc(9000 + 5 * i + j) for j in range(5)], "q", tenant="small")
    small = budget.usage_of("small")
    assert small.entries < 300 // 3 // 2
    for i in range(200):  # only "busy" sends requests from now on
        pilot.optimize([doc(5000 + 5 * i + j) for j in range(5)], "q", tenant="busy")
        assert budget.used_entries <= 300
        assert budget.usage_of("idle").entries >= 300 // 3 - 2  # never below its floor (whole entries)
    assert budget.usage_of("small") == small
    # the idle tenant gave back what it held above its floor, and the busy one uses the room the small
    # one leaves, rather than evicting its own entries as soon as it is above an equal split
    assert budget.usage_of("idle").entries <= 300 // 3 + 8
    assert budget.usage_of("busy").entries >= 300 - 300 // 3 - small.entries - 24
    evictions = budget.stats()["evictions"]["trie"]
    assert evictions[REASON_FAIR_SHARE]["entries"] > 0 and evictions[REASON_BUDGET]["entries"] > 0


def test_the_tenant_that_goes_over_evicts_its_least_recently_used_entries():
    budget = MemoryBudget(max_bytes=None, max_entries=120)
    pilot = pilot_with(budget)
    hot = [doc(j) for j in range(4)]
    for i in range(300):
        pilot.optimize(hot, "q", tenant="t")  # a prefix used all along
        pilot.optimize([doc(100 + 3 * i + j) for j in range(3)], "q", tenant="t")  # one-off prompts
    match = pilot.index.match("t", pilot._preamble(None).key, Counter(b.key for b in pilot.parse_docs(hot)))
    assert len(match.keys) == 4  # the hot prefix is still there


# ----------------------------------------------------------------------------- the engine's mirror
def bind_prompt(idx: ContextIndex, tenant: str, block_ids: list[int]) -> list[int]:
    tokens = list(range(1000, 1004))
    ends = [4]
    for k in block_ids:
        tokens += [k * 100 + i for i in range(4)]
        ends.append(len(tokens))
    keys = chain_page_keys(tokens, PAGE)
    idx.bind(tenant, PRE, 4, [(k, 4) for k in block_ids], ends, keys)
    return keys


def test_pages_mirrored_through_the_page_mirror_are_never_evicted_by_the_budget():
    budget = MemoryBudget(max_bytes=None, max_entries=60)
    idx = ContextIndex(budget=budget)
    idx.attach_engine(PAGE)
    mirror = PageMirror(idx, PAGE)
    blocks = list(range(101, 111))
    cached = [bind_prompt(idx, "t", blocks)]
    cached.append(bind_prompt(idx, "u", [111, 112, 113]))
    for keys in cached:
        for i, key in enumerate(keys):
            mirror.stored(("engine-hash", key), key)
    mirrored = {n.id for s in idx._tenants.values() for n in s.trie.nodes.values() if n.lead_cached}
    assert len(mirrored) == 11 + 4
    for i in range(300):  # prompts the engine never caches, in both tenants
        bind_prompt(idx, "tu"[i % 2], [10_000 + 3 * i + j for j in range(3)])
        assert budget.used_entries <= 60
        alive = {n.id for s in idx._tenants.values() for n in s.trie.nodes.values()}
        assert mirrored <= alive
    assert idx.match("t", PRE, {k: 1 for k in blocks}).hit_tokens == 44
    stats = budget.stats()
    assert stats["structures"]["mirror"]["budgeted"] is False
    assert stats["structures"]["mirror"]["entries"] >= len(mirrored)
    # once the engine drops the pages, those nodes are ordinary, charged and evictable
    mirror.removed([("engine-hash", k) for k in cached[0]])
    for i in range(300):
        bind_prompt(idx, "t", [20_000 + 3 * i + j for j in range(3)])
    assert budget.used_entries <= 60
    # the preamble's pages are still cached (tenant u's prompt holds the same ones); the blocks went
    assert idx.match("t", PRE, {k: 1 for k in blocks}).hit_tokens == 4
    assert not {n.key for n in idx._tenants["t"].trie.nodes.values()} & set(blocks)


def test_per_tenant_bounds_stay_upper_limits_inside_a_large_budget():
    budget = MemoryBudget(max_bytes=None, max_entries=1_000_000)
    pilot = pilot_with(budget, max_nodes=30, max_tracked_blocks=20, max_conversations=3,
                       max_conversation_entries=10)
    for i in range(50):
        pilot.optimize([doc(4 * i + j) for j in range(4)], "q", conversation_id=f"c{i}")
    state = pilot.index.tenant("default")
    assert state.trie.node_count() <= 30 and len(state.popularity) <= 20
    assert len(pilot.conversations) <= 3
    assert all(len(c.blocks) + len(c.chunks) <= 10 for c in pilot.conversations._convs.values())
    evictions = budget.stats()["evictions"]
    assert {"max_nodes"} <= set(evictions["trie"])
    assert set(evictions["popularity"]) == {"max_tracked_blocks"}
    assert "max_conversations" in evictions["conversations"]
    check_accounting(pilot, budget)


# ----------------------------------------------------------------------------- cost and lifecycle
def test_a_large_backlog_drains_in_bounded_steps():
    budget = MemoryBudget(max_bytes=None, max_entries=None)
    pilot = pilot_with(budget)
    for i in range(400):
        pilot.optimize([doc(5 * i + j) for j in range(5)], "q", tenant=f"t{i % 4}")
    before = budget.used_entries
    assert before > 3000
    budget.configure(max_entries=100)
    budget.settle()
    first = budget.used_entries
    assert before - first <= 600  # one settle frees a bounded step, not the whole backlog
    for _ in range(20):
        budget.settle()
    assert budget.used_entries <= 100
    check_accounting(pilot, budget)


def test_the_conversation_being_served_is_not_evicted_between_its_check_and_its_commit():
    budget = MemoryBudget(max_bytes=None, max_entries=None)
    pilot = pilot_with(budget)
    store = pilot.conversations
    pilot.optimize([doc(1), doc(2), doc(3)], "q", conversation_id="old")
    for i in range(5):
        pilot.optimize([doc(100 + i)], "q", conversation_id=f"other{i}")
    blocks = pilot.parse_docs([doc(1)])
    plan = store.check("default", "old", blocks, pilot.count_tokens)  # the oldest conversation comes back
    store._evict_conversations("default", EvictionRequest(10_000, 0, REASON_BUDGET))  # asks for everything
    assert [cid for _, cid in store._convs] == ["old"]
    assert store.commit("default", "old", [(blocks[0], 1)]) == plan.turn == 2
    # once committed it is an ordinary conversation again
    store._evict_conversations("default", EvictionRequest(10_000, 0, REASON_BUDGET))
    assert len(store) == 0


def test_dropped_structures_give_their_memory_back():
    budget = MemoryBudget(max_bytes=None, max_entries=None)
    pilot = pilot_with(budget)
    pilot.optimize(["a", "b"], "q", conversation_id="c")
    assert budget.used_entries > 0
    del pilot
    gc.collect()
    budget.settle()
    assert budget.used_entries == 0 and budget.used_bytes == 0
    assert budget.tenant_names() == []


def test_reset_gives_memory_back_at_once():
    budget = process_budget()  # a pilot that made its own index gives it back on reset
    pilot = ContextPilot()
    pilot.optimize(["a", "b"], "q", conversation_id="c", tenant="reset-x")
    pilot.optimize(["a", "c"], "q", conversation_id="c", tenant="reset-y")
    pilot.reset(tenant="reset-x")
    assert budget.usage_of("reset-x").entries == 0 and budget.usage_of("reset-y").entries > 0
    pilot.reset()
    assert budget.usage_of("reset-y").entries == 0
    assert "reset-x" not in budget.tenant_names() and "reset-y" not in budget.tenant_names()


# ----------------------------------------------------------------------------- reporting and options
def test_stats_report_the_budget_use_per_structure_and_evictions_by_reason():
    budget = MemoryBudget(max_bytes=64 * 1024, max_entries=None)
    pilot = pilot_with(budget)
    for i in range(200):
        pilot.optimize([doc(3 * i + j) for j in range(3)], "q", conversation_id=f"c{i % 7}")
    memory = pilot.stats()["memory"]
    assert memory["limit_bytes"] == 64 * 1024 and memory["limit_entries"] is None
    assert memory["used_bytes"] <= 64 * 1024
    assert {"trie", "popularity", "recent_requests", "conversations", "lifetimes"} <= set(memory["structures"])
    assert sum(s["bytes"] for s in memory["structures"].values() if s["budgeted"]) == memory["used_bytes"]
    assert memory["evictions"]["trie"][REASON_BUDGET]["entries"] > 0


def test_metrics_expose_the_budget():
    prometheus_client = pytest.importorskip("prometheus_client")
    from contextpilot_engine.integration.metrics import BudgetCollector

    budget = MemoryBudget(max_bytes=32 * 1024, max_entries=500)
    pilot = pilot_with(budget)
    for i in range(100):
        pilot.optimize([doc(3 * i + j) for j in range(3)], "q")
    registry = prometheus_client.CollectorRegistry()
    registry.register(BudgetCollector(budget))
    text = prometheus_client.generate_latest(registry).decode()
    assert "contextpilot:memory_budget_bytes 32768.0" in text
    assert "contextpilot:memory_budget_entries 500.0" in text
    assert 'contextpilot:memory_used_bytes{structure="trie"}' in text
    assert 'contextpilot:memory_evictions_total{reason="memory_budget",structure="trie"}' in text


def test_the_engines_metrics_registry_reports_the_process_budget():
    """What ``/metrics`` serves: the integration layer registers the collector in the default registry."""
    prometheus_client = pytest.importorskip("prometheus_client")
    from prometheus_client.parser import text_string_to_metric_families

    from contextpilot_engine.integration import metrics

    assert metrics.available()
    pilot = ContextPilot()
    for i in range(20):
        pilot.optimize([doc(3 * i + j) for j in range(3)], "q", tenant="metrics-x", conversation_id="c")
    try:
        families = {f.name: f for f in text_string_to_metric_families(
            prometheus_client.generate_latest(prometheus_client.REGISTRY).decode())}
        budget = process_budget()
        (limit,) = families["contextpilot:memory_budget_bytes"].samples
        assert limit.value == budget.max_bytes
        used = {s.labels["structure"]: s.value for s in families["contextpilot:memory_used_bytes"].samples}
        assert {"trie", "popularity", "recent_requests", "conversations", "lifetimes", "mirror"} <= set(used)
        assert used["trie"] > 0 and used["recent_requests"] > 0
        assert "contextpilot:memory_evictions" in families  # by structure and reason, once anything was evicted
    finally:
        pilot.reset()


def test_options_set_the_process_budget_and_bad_values_are_named():
    budget = process_budget()
    saved = (budget.max_bytes, budget.max_entries)
    try:
        ContextPilot(memory_budget_mb=512, memory_budget_entries=2_000_000)
        assert budget.max_bytes == 512 * MIB and budget.max_entries == 2_000_000
        ContextPilot()  # a configuration that does not set the budget leaves it as it is
        assert budget.max_bytes == 512 * MIB
    finally:
        budget.configure(max_bytes=saved[0], max_entries=saved[1])
    for bad in (0, -1, 1.5, True, "64"):
        with pytest.raises(ValueError, match="memory_budget_mb"):
            PilotConfig(memory_budget_mb=bad)
        with pytest.raises(ValueError, match="memory_budget_entries"):
            PilotConfig(memory_budget_entries=bad)
    with pytest.raises(ValueError, match="max_bytes"):
        MemoryBudget(max_bytes=0)


def test_plugin_flags_take_the_budget_options():
    import argparse

    from contextpilot_engine.integration.options import PluginOptions, add_flags, options_from_namespace

    parser = argparse.ArgumentParser()
    add_flags(parser, "vllm")
    args = parser.parse_args(["--enable-contextpilot", "--contextpilot-memory-budget-mb", "2048",
                              "--contextpilot-memory-budget-entries", "none"])
    _, given = options_from_namespace(args)
    options = PluginOptions.from_dict(given)
    assert options.pilot.memory_budget_mb == 2048 and options.pilot.memory_budget_entries is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--enable-contextpilot", "--contextpilot-memory-budget-mb", "0"])


def test_a_new_structure_plugs_in_through_an_account():
    """The interface documented in memory_budget.py, used by a structure the budget knows nothing about."""

    class History:
        def __init__(self, budget):
            self.rows: dict[str, list[int]] = {}
            self.budget = budget
            self.accounts = {}

        def add(self, tenant, row):
            account = self.accounts.get(tenant)
            if account is None:
                account = self.accounts[tenant] = self.budget.open("history", tenant, self._evict)
            self.rows.setdefault(tenant, []).append(row)
            account.charge(1, 100)
            self.budget.settle(tenant)

        def _evict(self, tenant, request):
            rows = self.rows[tenant]
            n = min(len(rows), max(request.entries, -(-request.bytes // 100)))
            del rows[:n]
            self.accounts[tenant].evicted(request.reason, n, n * 100)

    budget = MemoryBudget(max_bytes=10_000, max_entries=None)
    history = History(budget)
    for i in range(500):
        history.add("a", i)
    assert budget.used_bytes <= 10_000
    assert history.rows["a"][-1] == 499 and len(history.rows["a"]) <= 100  # the oldest rows went
    assert budget.stats()["evictions"]["history"][REASON_BUDGET]["entries"] >= 400
