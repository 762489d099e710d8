"""The engine-side mirror on the real engine: exact after every step, under eviction, duplicates and reset.

One in-process engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, the harness
default) with a 16-block KV cache, so prompts evict each other; chunked
prefill with a small token budget, so prefills span several steps; and a
request that skips reading the prefix cache, so vLLM stores a second physical
block under an existing hash (a duplicate the mirror must reference-count).

The check after every ``LLMEngine.step()`` compares the index's cached pages
with what ``BlockPool.cached_block_hash_to_block`` holds, naming vLLM's
hashes through a table computed independently (vLLM's own hash function over
the prompts sent, see ``vllm_plugin.testing``), not through the mirror.

The channel test reuses the engine: it subscribes a second index over a real
Unix socket in the middle of the run (so it starts from a snapshot) and
checks that it converges to the same pages.
"""

from __future__ import annotations

import os
import random
import tempfile
import time

import pytest

pytestmark = pytest.mark.engine

BLOCK = 32
VOCAB = 4096


def ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, VOCAB) for _ in range(n)]


@pytest.fixture(scope="module")
def mirrored_llm(tiny_model_path):
    from contextpilot_engine.bench.engine import close_llm, make_llm

    llm = make_llm(
        tiny_model_path,
        num_kv_blocks=16,
        max_model_len=16 * BLOCK,
        max_num_batched_tokens=96,
        max_num_seqs=4,
        additional_config={"contextpilot": {}},
    )
    yield llm
    close_llm(llm)


def _engine_parts(llm):
    from contextpilot_engine import vllm_plugin

    state = vllm_plugin.engine_state(llm)
    assert state is not None and state.engine_local, "in-process engines share the request side's state"
    return state, vllm_plugin.block_pool_of(llm)


class Driver:
    """Feeds token prompts to the engine and checks the mirror after every step."""

    def __init__(self, llm):
        from contextpilot_engine.vllm_plugin.testing import engine_hash_table

        self.llm = llm
        self.engine = llm.llm_engine
        self.state, self.pool = _engine_parts(llm)
        self.table: dict = {}
        self._hash = engine_hash_table
        self.steps = 0
        self.duplicate_steps = 0
        self.evictions = 0
        self._previous: set = set()
        self._n = 0
        self.checks: list = []

    def add(self, prompt: list[int], skip_cache_read: bool = False) -> None:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        assert len(prompt) % BLOCK not in (0, BLOCK - 1), "the one output token must not fill a block"
        self.table.update(self._hash(self.llm, [prompt]))
        params = SamplingParams(max_tokens=1, temperature=0.0, skip_reading_prefix_cache=skip_cache_read or None)
        self._n += 1
        self.engine.add_request(f"m{self._n}", TokensPrompt(prompt_token_ids=prompt), params)

    def check(self) -> None:
        from contextpilot_engine.vllm_plugin.testing import expected_canonical_counts

        expected = expected_canonical_counts(self.pool, self.table)
        assert self.state.index.cached_pages() == expected, f"mirror != block pool after step {self.steps}"
        raw = self.pool.cached_block_hash_to_block._cache
        if any(isinstance(v, dict) and len(v) > 1 for v in raw.values()):
            self.duplicate_steps += 1
        keys = set(raw)
        self.evictions += len(self._previous - keys)
        self._previous = keys

    def run(self) -> None:
        while self.engine.has_unfinished_requests():
            self.engine.step()
            self.steps += 1
            self.check()


def test_mirror_equals_block_pool_after_every_step(mirrored_llm):
    driver = Driver(mirrored_llm)
    assert mirrored_llm.reset_prefix_cache() is True
    driver.check()

    shared = ids(1, 3 * BLOCK)
    # Wave 1: prompts sharing a prefix, more blocks than the cache holds in total.
    for seed in range(2, 6):
        driver.add(shared + ids(seed, 2 * BLOCK + 9))
    driver.run()
    # Wave 2: the same prompt again, read from cache and recomputed (a duplicate hash).
    again = shared + ids(2, 2 * BLOCK + 9)
    driver.add(again)
    driver.add(again, skip_cache_read=True)
    driver.run()
    # Wave 3: long unrelated prompts force evictions of everything above.
    for seed in range(10, 13):
        driver.add(ids(seed, 7 * BLOCK + 3))
    driver.run()

    assert driver.steps >= 10
    assert driver.duplicate_steps > 0, "the scenario must create duplicate hashes"
    assert driver.evictions > 0, "the scenario must evict cached blocks"
    assert sum(driver.state.index.cached_pages().values()) > 0

    # Reset empties both; the mirror keeps working afterwards.
    assert mirrored_llm.reset_prefix_cache() is True
    driver.check()
    assert driver.state.index.cached_pages() == {}
    driver.add(shared + ids(20, BLOCK + 1))
    driver.run()
    assert sum(driver.state.index.cached_pages().values()) == 4


def test_mirror_updates_inside_the_block_pool_call(mirrored_llm):
    """No per-step delay: the index holds the pages as soon as ``cache_full_blocks`` returns, mid-step."""
    from contextpilot_engine.pages import chain_page_keys

    state, pool = _engine_parts(mirrored_llm)
    assert mirrored_llm.reset_prefix_cache() is True
    prompt = ids(30, 2 * BLOCK + 5)  # one prefill chunk (the budget is 96 tokens)
    seen_during_step = []
    original = type(pool).cache_full_blocks

    def spy(self, request, *args, **kwargs):
        out = original(self, request, *args, **kwargs)
        seen_during_step.append(sum(state.index.cached_pages().values()))
        return out

    pool.cache_full_blocks = spy.__get__(pool)  # instance attribute: only this pool, only this test
    try:
        from contextpilot_engine.bench.engine import prefill

        prefill(mirrored_llm, [prompt])
    finally:
        del pool.cache_full_blocks
    assert seen_during_step and seen_during_step[0] == 2
    assert set(state.index.cached_pages()) == set(chain_page_keys(prompt, BLOCK))


def test_channel_subscriber_converges_to_the_mirror(mirrored_llm):
    """The cross-process channel's protocol, over a real socket: snapshot, then events."""
    from contextpilot_engine.index import ContextIndex
    from contextpilot_engine.integration.channel import ChannelServer, ChannelSubscriber
    from contextpilot_engine.integration.state import LagStats

    driver = Driver(mirrored_llm)
    assert mirrored_llm.reset_prefix_cache() is True  # only this test's prompts are in the table
    mirror = driver.state.mirror
    path = os.path.join(tempfile.gettempdir(), f"cp-test-{os.getpid()}.sock")
    server = ChannelServer(path, mirror)
    server.start()
    mirror.publisher = server
    remote = ContextIndex()
    lag = LagStats()
    sub = None
    try:
        for seed in range(40, 43):
            driver.add(ids(seed, 3 * BLOCK + 4))
        driver.run()
        sub = ChannelSubscriber(path, remote, lag).start()  # late: must start from a snapshot
        assert sub.connected.wait(30)
        for seed in range(43, 47):
            driver.add(ids(seed, 5 * BLOCK + 2))
        driver.run()
        assert mirrored_llm.reset_prefix_cache() is True
        driver.add(ids(47, 2 * BLOCK + 1))
        driver.run()

        deadline = time.monotonic() + 30  # a hang guard, not a timing assertion
        while remote.cached_pages() != driver.state.index.cached_pages() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert remote.cached_pages() == driver.state.index.cached_pages()
        assert remote.page_size == BLOCK
        assert sub.hellos == 1 and sub.frames > 0
        assert lag.summary()["events"] > 0
    finally:
        mirror.publisher = None
        if sub is not None:
            sub.close()
        server.close()
    assert not os.path.exists(path)  # closing the channel removes its socket


# ----------------------------------------------------------------------------------------------
# The same hooks on a bare vLLM BlockPool (real vLLM classes, no model): paths the engine run
# above does not reach on this model, such as move_block_hashes and cache salts.


@pytest.fixture
def bare_pool(vllm_ready):
    from vllm.v1.core.block_pool import BlockPool

    from contextpilot_engine.index import ContextIndex
    from contextpilot_engine.integration.mirror import PageMirror
    from contextpilot_engine.vllm_plugin.block_pool import ATTR, install_block_pool_hooks

    assert install_block_pool_hooks()
    pool = BlockPool(num_gpu_blocks=10, enable_caching=True, hash_block_size=4)  # 9 usable
    index = ContextIndex()
    index.attach_engine(4)
    mirror = PageMirror(index, 4)
    pool.__dict__[ATTR] = mirror
    return pool, mirror, index


def make_request(rid: str, tokens: list[int], cache_salt: str | None = None):
    from vllm import SamplingParams
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request

    hash_fn = get_hash_fn_by_name("sha256")
    init_none_hash(hash_fn)
    return Request(rid, tokens, SamplingParams(max_tokens=1), None, cache_salt=cache_salt,
                   block_hasher=get_request_block_hasher(4, hash_fn))


def cache(pool, request, n_blocks: int):
    blocks = pool.get_new_blocks(n_blocks)
    pool.cache_full_blocks(request, blocks, 0, n_blocks, 4, 0)
    return blocks


def pool_keys_by_mirror(pool, mirror) -> dict:
    from contextpilot_engine.vllm_plugin.block_pool import pool_canonical_counts

    return pool_canonical_counts(pool, mirror.engine_hash_map().__getitem__)


def test_bare_pool_duplicates_move_salt_eviction_reset(bare_pool):
    from contextpilot_engine.pages import chain_page_keys
    from contextpilot_engine.integration.engine_keys import page_salt

    pool, mirror, index = bare_pool
    tokens = list(range(10, 22))  # three pages of 4
    a = cache(pool, make_request("a", tokens + [1]), 3)
    keys = chain_page_keys(tokens, 4)
    assert index.cached_pages() == dict.fromkeys(keys, 1)

    b = cache(pool, make_request("b", tokens + [2]), 3)  # same hashes on other blocks: duplicates
    assert index.cached_pages() == dict.fromkeys(keys, 2) == pool_keys_by_mirror(pool, mirror)

    salted = cache(pool, make_request("s", tokens + [3], cache_salt="tenant-x"), 2)
    salted_keys = chain_page_keys(tokens[:8], 4, salt=page_salt("tenant-x", None))
    assert not set(salted_keys) & set(keys)
    assert all(index.cached_pages()[k] == 1 for k in salted_keys)

    (fresh,) = pool.get_new_blocks(1)  # the last free block: not cached, nothing evicted
    pool.move_block_hashes(salted[0], fresh)  # vLLM re-points the only copy of a page: it must stay
    assert index.cached_pages()[salted_keys[0]] == 1 and mirror.unattributed == 0
    assert index.cached_pages() == pool_keys_by_mirror(pool, mirror)

    pool.free_blocks(list(reversed(b)) + list(reversed(salted)))
    new = pool.get_new_blocks(4)  # reuses free blocks, evicting the cached ones among them (b's copies)
    assert index.cached_pages() == pool_keys_by_mirror(pool, mirror)
    assert index.cached_pages() == {**dict.fromkeys(keys, 1), salted_keys[0]: 1, salted_keys[1]: 1}

    pool.free_blocks(a + [fresh] + new)  # everything allocated is free again
    assert pool.reset_prefix_cache() is True
    assert index.cached_pages() == {} and len(pool.cached_block_hash_to_block) == 0
