"""Offline reorder and scheduling: permutations, determinism, quality against the baseline."""


import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from contextpilot_engine import ContextPilot
from contextpilot_engine.batch_reorder import STRATEGIES, plan_batch
from contextpilot_engine.bench.baselines import frequency_sort
from contextpilot_engine.bench.workloads import rag_batch
from contextpilot_engine.blocks import estimate_tokens
from contextpilot_engine.interning import intern_batch
from contextpilot_engine.schedule import apply_aging_bound, arrival_dfs_order, prefix_reuse, schedule
from contextpilot_engine.validation import parse_contexts

texts = st.sampled_from([f"chunk {i}" for i in range(15)])
batches = st.lists(st.lists(texts, min_size=1, max_size=7), min_size=1, max_size=25)


def parse(contexts, counter=estimate_tokens):
    return parse_contexts(contexts, "contexts", counter, 4096, allow_single=False)[0]


@settings(max_examples=80, deadline=None)
@given(batches, st.sampled_from([(s,) for s in STRATEGIES] + [STRATEGIES]))
def test_plans_are_permutations_of_every_context(contexts, strategies):
    plan = plan_batch(parse(contexts), strategies=strategies)
    for ctx, order in zip(contexts, plan.orders):
        assert sorted(order) == list(range(len(ctx)))
    assert sorted(plan.dfs_order) == list(range(len(contexts)))


@settings(max_examples=40, deadline=None)
@given(batches)
def test_plans_are_deterministic_and_ignore_input_order(contexts):
    a = plan_batch(parse(contexts))
    b = plan_batch(parse(contexts))
    assert a.orders == b.orders and a.dfs_order == b.dfs_order
    perm = list(range(len(contexts)))[::-1]
    c = plan_batch(parse([contexts[i] for i in perm]))
    # arrival order does not change how much the batch shares
    assert a.reuse_tokens == c.reuse_tokens


@settings(max_examples=40, deadline=None)
@given(batches, st.data())
def test_fixed_prefixes_come_first(contexts, data):
    prefixes = []
    for ctx in contexts:
        k = data.draw(st.integers(0, len(ctx)))
        prefixes.append(data.draw(st.permutations(range(len(ctx))))[:k])
    plan = plan_batch(parse(contexts), prefixes)
    for pre, order in zip(prefixes, plan.orders):
        assert order[: len(pre)] == list(pre)
        assert sorted(order) == list(range(len(order)))


def test_shared_core_forms_a_common_prefix():
    contexts = [["x1", "core A", "core B", "y1"], ["core B", "x2", "core A"], ["core A", "z", "core B"]]
    reordered, order = ContextPilot().reorder(contexts)
    firsts = {tuple(sorted(c[:2])) for c in reordered}
    assert firsts == {("core A", "core B")}


def reuse_of(wl, perms):
    counter = wl.token_counter()
    batch = parse(wl.contexts, counter)
    ib = intern_batch(batch)
    seq = np.concatenate([ib.row(c)[perms[c]] for c in range(len(perms))])
    return prefix_reuse(ib.lengths, ib.starts, seq, ib.weights)[0]


def test_ours_shares_clearly_more_than_frequency_sort():
    wl = rag_batch(n_queries=400, top_k=20, seed=3)
    ours = plan_batch(parse(wl.contexts, wl.token_counter()))
    freq_perms, _ = frequency_sort(wl.contexts)
    assert ours.reuse_tokens == reuse_of(wl, ours.orders)
    assert ours.reuse_tokens > 1.3 * reuse_of(wl, freq_perms)


def test_optimize_batch_messages_follow_the_schedule():
    contexts = [["a", "b"], ["b", "c"], ["a", "b", "d"]]
    queries = ["q0", "q1", "q2"]
    messages, order = ContextPilot().optimize_batch(contexts, queries)
    assert sorted(order) == [0, 1, 2]
    assert [m[1]["content"] for m in messages] == [queries[i] for i in order]


@settings(max_examples=100, deadline=None)
@given(st.permutations(range(40)), st.integers(0, 45))
def test_aging_bound_holds_and_is_a_permutation(preferred, bound):
    out = apply_aging_bound(preferred, bound)
    assert sorted(out) == list(range(40))
    position = {r: p for p, r in enumerate(out)}
    assert all(position[r] <= r + bound for r in range(40))


def test_schedule_groups_shared_prefixes():
    seqs = [[1, 2], [3], [1, 2, 4], [3, 5], [1]]
    assert schedule(seqs) == [4, 0, 2, 1, 3]
    assert schedule(seqs, max_delay=0) == [0, 1, 2, 3, 4]


@settings(max_examples=80, deadline=None)
@given(st.lists(st.lists(st.integers(0, 4), min_size=1, max_size=4), min_size=1, max_size=30))
def test_arrival_dfs_order_is_depth_first_and_prefers_early_arrivals(seqs):
    lengths = np.array([len(s) for s in seqs])
    starts = np.r_[0, np.cumsum(lengths)]
    order = arrival_dfs_order(lengths, starts, np.concatenate([np.array(s) for s in seqs])).tolist()
    assert sorted(order) == list(range(len(seqs)))
    rows = [tuple(seqs[c]) for c in order]
    # depth first: the contexts sharing any prefix form one contiguous run
    for c in range(len(seqs)):
        for d in range(1, len(seqs[c]) + 1):
            hits = [i for i, r in enumerate(rows) if r[:d] == tuple(seqs[c][:d])]
            assert hits == list(range(hits[0], hits[-1] + 1))
    # the first context served belongs to the top-level subtree of the earliest arrival
    assert rows[0][0] == seqs[0][0]


@settings(max_examples=80, deadline=None)
@given(st.lists(st.lists(st.integers(0, 4), min_size=1, max_size=5), min_size=2, max_size=30))
def test_arrival_dfs_order_is_the_same_without_the_padded_matrix(seqs):
    from contextpilot_engine.schedule import _arrival_dfs_by_tree

    lengths = np.array([len(s) for s in seqs])
    starts = np.r_[0, np.cumsum(lengths)]
    flat = np.concatenate([np.array(s) for s in seqs])
    assert _arrival_dfs_by_tree(lengths, starts, flat).tolist() == arrival_dfs_order(lengths, starts, flat).tolist()


@settings(max_examples=60, deadline=None)
@given(batches, st.data())
def test_polish_never_loses_reuse_and_keeps_fixed_prefixes(contexts, data):
    from contextpilot_engine.local_search import polish

    ib = intern_batch(parse(contexts))
    seq = ib.items.copy()  # retrieval order as the starting plan
    fixed = np.array([data.draw(st.integers(0, int(n))) for n in ib.lengths])
    before = prefix_reuse(ib.lengths, ib.starts, seq, ib.weights)[0]
    after_seq = polish(ib.lengths, ib.starts, seq, ib.weights, fixed)
    assert prefix_reuse(ib.lengths, ib.starts, after_seq, ib.weights)[0] >= before
    for c in range(ib.n_contexts):
        a, b = ib.row(c), after_seq[ib.starts[c] : ib.starts[c + 1]]
        assert sorted(a.tolist()) == sorted(b.tolist())
        assert (a[: fixed[c]] == b[: fixed[c]]).all()


@settings(max_examples=80, deadline=None)
@given(batches)
def test_level_greedy_gives_up_only_when_it_cannot_beat_the_other_tree(contexts):
    """Its early exit rests on an upper bound: it must never drop a tree at least as good as ``beat``."""
    from contextpilot_engine.level_greedy import level_greedy

    ib = intern_batch(parse(contexts))
    group = np.zeros(ib.n_contexts, dtype=np.int64)
    full = level_greedy(ib.lengths, ib.starts, ib.items, ib.weights, group)
    reuse = prefix_reuse(ib.lengths, ib.starts, full, ib.weights)[0]
    kept = level_greedy(ib.lengths, ib.starts, ib.items, ib.weights, group, beat=reuse)
    assert kept is not None and (kept == full).all()
    assert level_greedy(ib.lengths, ib.starts, ib.items, ib.weights, group, beat=reuse + 10**9) is None or reuse == 0


def test_one_long_context_does_not_set_the_width_of_the_whole_batch():
    """A batch of short contexts with one very long one: planned in memory that fits the short ones."""
    import tracemalloc

    shared = [f"shared chunk {i}" for i in range(40)]
    short = [[shared[(c * 7 + j) % 40] for j in range(3)] for c in range(500)]
    long_one = [f"long context chunk {j}" for j in range(1024)] + shared[:3]
    contexts = parse(short + [long_one])
    tracemalloc.start()
    try:
        plan = plan_batch(contexts)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    for ctx, order in zip(contexts, plan.orders):
        assert sorted(order) == list(range(len(ctx)))
    # comparing every cell of every merged pair at the long context's width took hundreds of MB here
    assert peak < 32 << 20, f"planning peaked at {peak >> 20} MB"
    long_order = [contexts[-1][j].key for j in plan.orders[-1]]
    assert set(long_order[:3]) == {b.key for b in contexts[-1][-3:]}  # its shared blocks still lead
    alone = plan_batch(parse(short))
    assert plan.reuse_tokens >= alone.reuse_tokens  # the short ones share as much as without it


def test_interning_and_probes_match_the_plain_definitions_on_ragged_batches():
    from contextpilot_engine.candidates import _rarest

    rng = np.random.default_rng(5)
    for _ in range(20):
        lengths = rng.integers(1, 30, size=rng.integers(2, 40))
        lengths[0] = 200  # one long row: the case the flat forms exist for
        items = np.concatenate([rng.choice(300, size=k, replace=False) for k in lengths])
        holders = np.bincount(items, minlength=300)
        got_items, got_ctx = _rarest(lengths, items, holders, 5)
        want_items, want_ctx = [], []
        start = 0
        for c, k in enumerate(lengths.tolist()):
            mine = [i for i in items[start:start + k].tolist() if holders[i] > 1]
            for i in sorted(mine, key=lambda i: (holders[i], i))[:5]:
                want_items.append(i)
                want_ctx.append(c)
            start += k
        assert got_items.tolist() == want_items and got_ctx.tolist() == want_ctx
    batch = intern_batch(parse([["a", "b", "a", "a"], ["b", "c"], ["c", "c"]]))
    assert batch.n_items == 6 and batch.lengths.tolist() == [4, 2, 2]  # a, a#2, a#3, b, c, c#2


def test_bench_skewed_batch_script_reports_both_batches():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_skewed_batch.py"
    out = subprocess.run([sys.executable, str(script), "--contexts", "200", "--long", "300"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "200 contexts of 3 blocks" in out.stdout and "one of 300 blocks" in out.stdout
    assert "skewed over flat: time" in out.stdout
