"""A whole batch: block orders, execution order, and what the index keeps afterwards.

:meth:`ContextPilot.optimize_batch` and :meth:`ContextPilot.reorder` share
this policy:

* the orders come from :func:`.batch_reorder.plan_batch` (the best of the
  configured strategies), started from what the tenant's index already has
  cached, so a batch extends the cached prefixes rather than competing with
  them;
* the execution order is depth first under the aging bound
  (:func:`.schedule.apply_aging_bound`);
* the index learns the batch's popularity and, in model mode, only the last
  prompts of the schedule that fit the capacity, since earlier ones would be
  evicted by the time the batch ends.
"""

from __future__ import annotations

from collections import Counter

from .batch_reorder import BatchPlan, plan_batch
from .blocks import Block
from .candidates import CandidateConfig
from .config import PilotConfig
from .index import ContextIndex
from .kernels import OverlapBackend
from .online_reorder import cached_prefix
from .prompts import Preamble
from .schedule import apply_aging_bound

__all__ = ["plan_and_record"]


def plan_and_record(
    index: ContextIndex,
    config: PilotConfig,
    backend: OverlapBackend,
    tenant: str,
    batch: list[list[Block]],
    preamble: Preamble,
    extra_tokens: int,
) -> tuple[list, list[int]]:
    """Block orders (input indices per context) and execution order for a batch; records what the cache will hold."""
    prefixes = None
    state = index.peek(tenant)
    if state is not None and state.trie.node_count():
        prefixes = [cached_prefix(index, tenant, preamble.key, blocks)[0] for blocks in batch]
    plan = plan_batch(batch, prefixes, backend, config.strategies, CandidateConfig.for_batch(len(batch), sum(map(len, batch))))
    schedule = apply_aging_bound(plan.dfs_order, config.max_delay)
    _record_batch(index, config, tenant, batch, plan, schedule, preamble, extra_tokens)
    return plan.orders, schedule


def _record_batch(
    index: ContextIndex,
    config: PilotConfig,
    tenant: str,
    batch: list[list[Block]],
    plan: BatchPlan,
    schedule: list[int],
    preamble: Preamble,
    extra_tokens: int,
) -> None:
    """Feed the index: popularity of the whole batch, and the prompts the cache ends up holding."""
    counts: Counter = Counter()
    for key, count in zip(plan.batch.keys, plan.batch.counts.tolist()):
        counts[key if isinstance(key, int) else key[0]] += count
    orders = plan.orders
    budget = config.capacity_tokens
    tail: list[int] = []
    for c in reversed(schedule):
        tail.append(c)
        budget -= sum(b.tokens for b in batch[c])
        if budget <= 0 or len(tail) >= config.max_nodes:
            break
    sequences = ([(batch[c][j].key, batch[c][j].tokens) for j in orders[c]] for c in reversed(tail))
    index.record_many(tenant, preamble.key, preamble.tokens + extra_tokens, sequences, counts)
