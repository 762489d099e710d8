#!/usr/bin/env python
"""How much prefix reuse a much longer search finds on top of ``optimize_batch``'s plan.

The polish in :mod:`contextpilot_engine.local_search` moves one context at a
time; a plan it cannot improve may still improve by moving several contexts
together (one gives up its path so that two others can share a longer one).
This diagnostic asks how much such moves are worth on a workload: it plans
the batch as ``optimize_batch`` does, then runs a ruin-and-recreate search
for ``--seconds``: take out a random context and the ``--neighbourhood - 1``
contexts sharing most tokens with it, put them back one by one along the
heaviest path each can spell (the rest of its blocks after it, the blocks the
group still to be placed holds most often first), and keep the result unless
the batch shares fewer tokens than before.  The figure is the reuse of the
block-granularity prefix tree (unlimited cache), before and after, so it is an
upper estimate of what a better search could add to the hit ratio.

It is a diagnostic, not a method: it spends hundreds of times the planning
budget.  Run (the pinned environment; the real traces build on first use)::

    PY=$(bash scripts/setup_env.sh | tail -n1)
    $PY scripts/bench_plan_headroom.py --workload real-open-bm25-k10 --seed 1 --seconds 120 --neighbourhood 12
"""

from __future__ import annotations

import argparse
import random
import time
from collections import Counter

from contextpilot_engine import batch_policy
from contextpilot_engine.bench.presets import build
from contextpilot_engine.local_search import TreeNode, add_path, best_path, detach_path
from contextpilot_engine.pilot import ContextPilot


def capture_plan(workload: str, seed: int, smoke: bool = False):
    """The workload and the :class:`BatchPlan` that ``optimize_batch`` builds for it, with its planning time."""
    wl = build(workload, smoke=smoke, seed=seed)
    captured = []
    original = batch_policy.plan_batch

    def spy(*args, **kwargs):
        plan = original(*args, **kwargs)
        captured.append(plan)
        return plan

    batch_policy.plan_batch = spy
    try:
        pilot = ContextPilot(tokenizer=wl.token_counter())
        start = time.perf_counter()
        pilot.optimize_batch(wl.contexts, wl.queries)
        seconds = time.perf_counter() - start
    finally:
        batch_policy.plan_batch = original
    (plan,) = captured
    return wl, plan, seconds


def tree_reuse(seqs: list[list[int]], w: list[int]) -> int:
    """Tokens shared in the prefix tree of ``seqs``: sum over nodes of (sequences through it - 1) * tokens."""
    root = TreeNode()
    for s in seqs:
        add_path(root, s)
    total, stack = 0, [root]
    while stack:
        node = stack.pop()
        for item, child in node.children.items():
            total += (child.count - 1) * w[item]
            stack.append(child)
    return total


class Search:
    """Ruin and recreate over the plan's prefix tree."""

    def __init__(self, seqs: list[list[int]], w: list[int], rng: random.Random) -> None:
        self.seqs, self.w, self.rng = seqs, w, rng
        self.root = TreeNode()
        for s in seqs:
            add_path(self.root, s)
        self.holders: dict[int, list[int]] = {}
        for c, s in enumerate(seqs):
            for item in s:
                self.holders.setdefault(item, []).append(c)

    def neighbourhood(self, seed: int, size: int) -> list[int]:
        shared: Counter = Counter()
        for item in self.seqs[seed]:
            for c in self.holders[item]:
                if c != seed:
                    shared[c] += self.w[item]
        return [seed] + [c for c, _ in shared.most_common(size - 1)]

    def _insert(self, group: list[int], new: dict[int, list[int]]) -> int:
        """Put ``group`` back in the given order; return the tokens they share with the tree."""
        pending: Counter = Counter(item for c in group for item in self.seqs[c])
        gained = 0
        for c in group:
            items = set(self.seqs[c])
            pending.subtract(items)
            ceiling = sum(self.w[i] for i in items)
            gain, path, _ = best_path(self.root, items, self.w, 5000, ceiling)
            items.difference_update(path)
            new[c] = path + sorted(items, key=lambda i: (-pending[i], i))
            add_path(self.root, new[c])
            gained += gain
        return gained

    def step(self, size: int) -> int:
        """One ruin-and-recreate move; returns the change in shared tokens (0 when rejected)."""
        group = self.neighbourhood(self.rng.randrange(len(self.seqs)), size)
        lost = sum(detach_path(self.root, self.seqs[c], self.w)[0] for c in group)
        self.rng.shuffle(group)
        new: dict[int, list[int]] = {}
        gained = self._insert(group, new)
        if gained >= lost:
            for c in group:
                self.seqs[c] = new[c]
            return gained - lost
        for c in group:  # undo: the old orders go back and the tree is as before
            detach_path(self.root, new[c], self.w)
        for c in group:
            add_path(self.root, self.seqs[c])
        return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", default="real-open-bm25-k10")
    ap.add_argument("--seed", type=int, default=1, help="trace set seed (the suite's default is 1)")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--neighbourhood", type=int, default=12, help="contexts taken out together")
    ap.add_argument("--rng", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="the workload's small size")
    args = ap.parse_args()

    wl, plan, plan_seconds = capture_plan(args.workload, args.seed, args.smoke)
    batch = plan.batch
    w = batch.weights.tolist()
    flat, bounds = plan.sequence.tolist(), batch.starts.tolist()
    seqs = [flat[bounds[c] : bounds[c + 1]] for c in range(batch.n_contexts)]
    tokens = int(sum(batch.weights[batch.items]))
    before = tree_reuse(seqs, w)
    print(f"{args.workload} seed {args.seed}: {batch.n_contexts} contexts, {tokens:,} block tokens; "
          f"plan ({plan.strategy}) in {plan_seconds:.2f} s shares {before:,} tokens ({before / tokens:.1%})")

    search = Search(seqs, w, random.Random(args.rng))
    start = time.perf_counter()
    steps = accepted = gained = 0
    marks = [m for m in (1, 3, 10, 30) if m < args.seconds]
    while (elapsed := time.perf_counter() - start) < args.seconds:
        if marks and elapsed >= marks[0]:
            print(f"  after {marks.pop(0)} s: {gained / before:+.2%}")
        gain = search.step(args.neighbourhood)
        accepted += gain > 0
        gained += gain
        steps += 1
    after = tree_reuse(search.seqs, w)
    assert after == before + gained, "the search's running total disagrees with the tree it built"
    print(f"search: {steps:,} moves of {args.neighbourhood} contexts in {args.seconds:.0f} s, {accepted:,} improving; "
          f"shares {after:,} tokens ({after / tokens:.1%}): {after / before - 1:+.2%} over the plan")


if __name__ == "__main__":
    main()
