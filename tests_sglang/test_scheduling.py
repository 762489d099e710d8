"""Cache-aware admission order on SGLang's real ``SchedulePolicy`` and radix cache.

SGLang's ``lpm`` falls back to first-come-first-served above 128 waiting
requests; with ``cache_aware_scheduling`` the plugin orders the first
``scheduling_window`` requests by their cached prefix at any queue length,
and a request passed over ``max_overtakes`` times goes first.
"""

from __future__ import annotations

from array import array

import pytest

BASE = list(range(100, 164))  # 64 tokens the tree holds
SHARED = [0, 10, 60, 30, 0, 50]


def make_queue(n: int):
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.sampling.sampling_params import SamplingParams

    queue = []
    for i in range(n):
        own = list(range(9000 + 100 * i, 9000 + 100 * i + 40))
        queue.append(Req(rid=f"r{i}", origin_input_text="", sampling_params=SamplingParams(max_new_tokens=4),
                         origin_input_ids=array("q", BASE[: SHARED[i % len(SHARED)]] + own)))
    return queue


@pytest.fixture
def cache(published):
    from contextpilot_engine.sglang_plugin.testing import insert_tokens, make_cache

    def make(**options):
        published(**options)
        tree, alloc = make_cache("rust", 1, slots=4096)
        insert_tokens(tree, alloc, BASE, 1)
        return tree

    return make


def test_sglang_lpm_gives_up_above_128_waiting_but_ours_does_not(cache):
    from sglang.srt.managers.schedule_policy import SchedulePolicy

    tree = cache()  # contextpilot on, cache-aware scheduling off: SGLang's own policies
    lpm = make_queue(130)
    SchedulePolicy("lpm", tree, False, False, False).calc_priority(lpm)
    assert [r.rid for r in lpm[:6]] == [f"r{i}" for i in range(6)]  # FCFS: SGLang's fallback

    tree = cache(cache_aware_scheduling=True, scheduling_window=12)
    ours = make_queue(130)
    SchedulePolicy("fcfs", tree, False, False, False).calc_priority(ours)
    window = ours[:12]
    assert [r.prefix_len for r in window] == sorted((r.prefix_len for r in window), reverse=True)
    assert window[0].prefix_len == 60 and window[0].rid == "r2"
    assert [r.rid for r in ours[12:]] == [f"r{i}" for i in range(12, 130)]  # beyond the window: untouched


def fcfs_with_aging(cache, max_overtakes: int):
    """SGLang's FCFS policy with cache-aware scheduling, six waiting requests, and the cold one (nothing cached)."""
    from sglang.srt.managers.schedule_policy import SchedulePolicy

    tree = cache(cache_aware_scheduling=True, scheduling_window=6, max_overtakes=max_overtakes)
    queue = make_queue(6)
    return SchedulePolicy("fcfs", tree, False, False, False), queue, queue[0]


def test_aging_bound(cache):
    policy, queue, cold = fcfs_with_aging(cache, max_overtakes=2)
    for decision in range(3):
        policy.calc_priority(queue)
        if decision < 2:
            assert queue[0] is not cold
            queue.pop(0)  # SGLang admits the first request
    assert queue[0] is cold  # two younger requests were admitted ahead of it: it goes first now


def test_the_aging_bound_counts_admissions_not_decisions(cache):
    policy, queue, cold = fcfs_with_aging(cache, max_overtakes=2)
    for _ in range(5):  # decisions that admit nothing (a full batch, chunked prefill) pass nobody
        policy.calc_priority(queue)
    assert queue.index(cold) == 2  # by its prefix it would go last; its bound lets two younger ones ahead
    del queue[:3]  # one decision admits a batch of three: the two ahead of it, and itself
    assert cold not in queue


def test_a_request_at_its_bound_goes_next_after_a_batch_passed_it(cache):
    policy, queue, cold = fcfs_with_aging(cache, max_overtakes=2)
    policy.calc_priority(queue)
    del queue[:2]  # a batch admits the two younger requests ahead of it
    policy.calc_priority(queue)
    assert queue[0] is cold


def test_off_by_default(cache):
    from sglang.srt.managers.schedule_policy import SchedulePolicy

    tree = cache()
    queue = make_queue(6)
    SchedulePolicy("fcfs", tree, False, False, False).calc_priority(queue)
    assert [r.rid for r in queue] == [f"r{i}" for i in range(6)]


def test_priority_scheduling_keeps_sglang_order(cache):
    """With --enable-priority-scheduling the priorities SGLang sorted by stay: no reorder across them."""
    import time

    from sglang.srt.managers.schedule_policy import SchedulePolicy

    tree = cache(cache_aware_scheduling=True, scheduling_window=8)
    queue = make_queue(4)
    for r, prio in zip(queue, (0, 0, 10, 10)):  # r2 holds the longest cached prefix, at the later priority
        r.priority = prio
        r.time_stats.wait_queue_entry_time = time.monotonic()
    SchedulePolicy("fcfs", tree, False, True, True).calc_priority(queue)  # priority scheduling, low values first
    assert [r.priority for r in queue] == [0, 0, 10, 10]


def test_a_retracted_request_counts_as_admitted_and_waits_afresh(cache):
    policy, queue, cold = fcfs_with_aging(cache, max_overtakes=1)
    policy.calc_priority(queue)
    ahead = queue[0]
    assert ahead is not cold
    ahead.retraction_count += 1  # admitted, then retracted before the next decision: back in the queue
    policy.calc_priority(queue)
    assert queue[0] is cold  # that admission passed it, which is its whole bound


def test_another_policy_is_left_as_sglang_ordered_it(cache):
    from sglang.srt.managers.schedule_policy import SchedulePolicy

    tree = cache(cache_aware_scheduling=True, scheduling_window=6)
    queue = make_queue(6)
    SchedulePolicy("lof", tree, False, False, False).calc_priority(queue)  # longest output first: all equal
    assert [r.rid for r in queue] == [f"r{i}" for i in range(6)]  # SGLang's order, not ours by cached prefix
