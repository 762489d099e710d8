"""Cache-aware scheduling (option ``cache_aware_scheduling``) on the real engine, observed behaviourally.

With ``max_num_seqs=1`` the engine admits one waiting request per step, so
the order in which a batch is admitted is visible in each output's
``metrics.scheduled_ts``.  Prompts whose prefix is cached must be admitted
before older cold ones, and the aging bound must stop a cold request from
being overtaken more than ``max_overtakes`` times.
"""

from __future__ import annotations

import random

import pytest

pytestmark = pytest.mark.engine

BLOCK = 32


def ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 4096) for _ in range(n)]


@pytest.fixture(scope="module")
def scheduling_llm(tiny_model_path):
    from contextpilot_engine.bench.engine import close_llm, make_llm

    llm = make_llm(
        tiny_model_path,
        max_num_seqs=1,
        additional_config={"contextpilot": {"cache_aware_scheduling": True, "max_overtakes": 2}},
    )
    yield llm
    close_llm(llm)


def admission_order(llm, prompts: dict[str, list[int]]) -> list[str]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    names = list(prompts)
    outs = llm.generate(
        [TokensPrompt(prompt_token_ids=prompts[n]) for n in names],
        SamplingParams(max_tokens=1, temperature=0.0),
        use_tqdm=False,
    )
    stamps = {n: o.metrics.scheduled_ts for n, o in zip(names, outs)}
    return sorted(names, key=stamps.__getitem__)


def test_cached_prefixes_go_first_within_the_aging_bound(scheduling_llm):
    from contextpilot_engine.bench.engine import prefill

    scheduling_llm.reset_prefix_cache()
    warm_prefixes = {f"W{k}": ids(100 + k, 8 * BLOCK) for k in (1, 2, 3)}
    prefill(scheduling_llm, list(warm_prefixes.values()))  # cache them
    batch = {
        "C1": ids(1, 9 * BLOCK + 5),
        "W1": warm_prefixes["W1"] + ids(11, 20),
        "W2": warm_prefixes["W2"] + ids(12, 20),
        "W3": warm_prefixes["W3"] + ids(13, 20),
        "C2": ids(2, 9 * BLOCK + 5),
    }
    order = admission_order(scheduling_llm, batch)
    # FCFS would be C1 W1 W2 W3 C2.  Cache-aware: the warm ones jump ahead of C1,
    # but C1 may be overtaken only twice (max_overtakes=2), so it goes before W3.
    assert order == ["W1", "W2", "C1", "W3", "C2"]


def test_without_cached_prefixes_the_order_stays_fcfs(scheduling_llm):
    scheduling_llm.reset_prefix_cache()
    batch = {f"C{k}": ids(200 + k, 4 * BLOCK + 3) for k in range(4)}
    assert admission_order(scheduling_llm, batch) == list(batch)


def test_a_request_vllm_pops_and_puts_back_keeps_its_aging(vllm_ready):
    """vLLM's skip path (pop, then prepend at the end of the step) is no admission: counts stay as they were.

    The queue is the plugin's real FCFSRequestQueue subclass; only the block
    pool is a stand-in answering which hashes are cached, since the point is
    the queue's bookkeeping under the scheduler's call sequence.
    """
    from types import SimpleNamespace

    from contextpilot_engine.vllm_plugin.scheduling import make_cache_aware_queue

    class Pool:
        def get_cached_block(self, block_hash, groups):
            return object() if block_hash == "warm" else None

    cold = SimpleNamespace(request_id="cold", block_hashes=["x"])
    warm = [SimpleNamespace(request_id=f"warm{i}", block_hashes=["warm"]) for i in range(10)]
    queue = make_cache_aware_queue(Pool(), window=32, max_overtakes=2, items=[cold] + warm)
    passed = 0
    for step in range(8):
        chosen = queue.peek_request()
        if chosen is cold and step == 2:  # its turn (aging bound), but vLLM cannot schedule it this step
            queue.prepend_requests([queue.pop_request()])
            continue
        queue.pop_request()
        if chosen is cold:
            break
        passed += 1
    assert passed == 2  # overtaken exactly max_overtakes times, skip or not
    assert queue.forced == 1 and queue.reordered == 2


def test_a_preempted_request_stays_admitted_for_the_aging_bound(vllm_ready):
    """vLLM prepends a preempted running request alone: that admission passed the older ones, and still counts."""
    from types import SimpleNamespace

    from contextpilot_engine.vllm_plugin.scheduling import make_cache_aware_queue

    class Pool:  # stand-in for the block pool, as in the test above
        def get_cached_block(self, block_hash, groups):
            return object() if block_hash == "warm" else None

    cold = SimpleNamespace(request_id="cold", block_hashes=["x"])
    warm = [SimpleNamespace(request_id=f"warm{i}", block_hashes=["warm"]) for i in range(4)]
    queue = make_cache_aware_queue(Pool(), window=32, max_overtakes=2, items=[cold] + warm)
    admitted = [queue.pop_request(), queue.pop_request()]  # two younger requests pass the cold one
    queue.prepend_request(admitted[1])  # one of them is preempted later and waits again
    assert queue.peek_request() is cold  # the cold one was passed twice: its turn
