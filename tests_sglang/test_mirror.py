"""The mirror of SGLang's real ``UnifiedRadixCache`` is exact after every operation, on both tree cores.

The cache runs on real CPU memory pools, small enough that inserting evicts.
Operation sequences (insert a request's prompt the way a finished request's
checkpoint does, match and lock a prefix, evict, unlock, reset) come from a
benchmark RAG trace whose chunks are token runs, in an order hypothesis
chooses.  After every operation, the Context Index must hold exactly the
canonical keys of the pages the tree holds on the device: for every prompt
inserted so far, the pages of its cached prefix (read back with
``match_prefix``), and nothing else; and as many pages as the tree's
device size says.  A user's own KV-event publisher still receives every
event, in order.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contextpilot_engine.pages import chain_page_keys

CORES = ("rust", "python")


def trace_prompts(seed: int, n: int = 24) -> list[list[int]]:
    """A RAG trace from the benchmark generator, each chunk a run of token ids, each prompt its chunks in order."""
    from contextpilot_engine.bench.workloads import rag_batch

    wl = rag_batch(n_queries=n, top_k=4, n_chunks=16, n_topics=3, min_tokens=4, max_tokens=40, seed=seed)
    runs = {}
    for text, tokens in wl.chunk_tokens.items():
        rng = random.Random(text)
        runs[text] = [rng.randrange(10, 4000) for _ in range(tokens)]
    preamble = list(range(1, 9))
    return [preamble + [t for c in r.contexts for t in runs[c]] + [4000 + q, 4001] for q, r in enumerate(wl.requests)]


def expected_keys(cache, inserted, page):
    from contextpilot_engine.sglang_plugin.testing import cached_prefix

    keys = set()
    for tokens in inserted:
        keys.update(chain_page_keys(tokens[: cached_prefix(cache, tokens)], page))
    return keys


def check(cache, index, inserted, page):
    cached = index.cached_pages()
    assert set(cached) == expected_keys(cache, inserted, page)
    assert sum(cached.values()) * page == cache.evictable_size() + cache.protected_size()


@pytest.mark.parametrize("core", CORES)
@pytest.mark.parametrize("page", [1, 16])
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), ops=st.lists(st.tuples(st.sampled_from("iiiimelur"), st.integers(0, 10**6)),
                                                 min_size=10, max_size=40))
def test_index_equals_the_trees_device_pages_after_every_operation(published, core, page, seed, ops):
    from array import array

    from contextpilot_engine.sglang_plugin.radix_cache import mirror_of
    from contextpilot_engine.sglang_plugin.testing import insert_tokens, make_cache
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams, MatchPrefixParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    published(tenant=f"t-{core}-{page}")
    cache, alloc = make_cache(core, page, slots=512)
    m = mirror_of(cache)
    assert m is not None and m.mirror.index.cached_pages() == {}
    index = m.mirror.index
    prompts = trace_prompts(seed)
    inserted: list[list[int]] = []
    locks = []
    for op, pick in ops:
        if op == "i":
            tokens = prompts[pick % len(prompts)]
            if insert_tokens(cache, alloc, tokens, page) is not None:
                inserted.append(tokens)
        elif op == "m" and inserted:
            tokens = inserted[pick % len(inserted)]
            cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", tokens))))
        elif op == "l" and inserted and len(locks) < 3:
            tokens = inserted[pick % len(inserted)]
            result = cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", tokens))))
            locks.append(cache.lock(result.last_device_node))
        elif op == "u" and locks:
            cache.unlock(locks.pop(pick % len(locks)))
        elif op == "e":
            cache.evict(EvictParams(num_tokens=1 + pick % 200))
        elif op == "r" and not locks:
            cache.reset()
            alloc.clear()
            inserted.clear()
        check(cache, index, inserted, page)
    for lock in locks:
        cache.unlock(lock)


@pytest.mark.parametrize("core", CORES)
def test_a_users_publisher_still_gets_every_event(published, core):
    """With --kv-events-config the user's publisher drains take_events(); the mirror must not steal them."""
    from contextpilot_engine.index import ContextIndex
    from contextpilot_engine.sglang_plugin.radix_cache import CacheMirror, mirror_of
    from contextpilot_engine.sglang_plugin.testing import insert_tokens, make_cache
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams

    published(tenant=f"events-{core}")
    cache, alloc = make_cache(core, 16, slots=256, events=True)
    m = mirror_of(cache)
    assert m is not None and m.keep_events
    publisher_view = ContextIndex()
    publisher_view.attach_engine(16)
    replay = CacheMirror(publisher_view, 16, keep_events=False)  # what the user's publisher sees, applied
    for i, tokens in enumerate(trace_prompts(3)):
        insert_tokens(cache, alloc, tokens, 16)
        if i % 5 == 4:
            cache.evict(EvictParams(num_tokens=64))
        if i % 3 == 2:  # the publisher runs now and then, as SGLang's does
            replay.apply(cache.take_events())
    replay.apply(cache.take_events())
    assert publisher_view.cached_pages() == m.mirror.index.cached_pages() != {}
    assert cache.take_events() == []  # nothing is handed out twice


@pytest.mark.parametrize("core", CORES)
def test_after_a_mirror_failure_the_recorder_it_turned_on_is_still_drained(published, core):
    """The mirror is off after our failure (fail open), and SGLang's event recorder does not grow for ever."""
    from contextpilot_engine.sglang_plugin.testing import insert_tokens, make_cache

    published(tenant=f"leak-{core}")  # no --kv-events-config: recording is on only for the mirror
    tree, alloc = make_cache(core, 1, slots=512)
    mirror = tree.__dict__["_contextpilot_mirror"]
    real = mirror.mirror.index.pages_stored

    def fails_once(keys):
        mirror.mirror.index.pages_stored = real
        raise RuntimeError("injected: the index fails once")

    mirror.mirror.index.pages_stored = fails_once
    for i in range(50):
        insert_tokens(tree, alloc, [i * 1000 + j for j in range(64)], 1)
    assert not mirror.mirror.enabled
    take = type(tree).take_events
    assert list(getattr(take, "__wrapped__", take)(tree) or ()) == []  # nothing left queued


@pytest.mark.parametrize("core", CORES)
def test_an_eagle_tree_is_not_mirrored(published, core):
    """EAGLE's tree keys pages by token pairs: no mirror, and no recorder turned on for one."""
    import torch
    from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
    from sglang.srt.mem_cache.unified_cache.components import ComponentType
    from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

    published(tenant=f"eagle-{core}")
    r2t = ReqToTokenPool(size=8, max_context_len=4096, device="cpu", enable_memory_saver=False)
    kv = MHATokenToKVPool(size=1024, page_size=1, dtype=torch.bfloat16, head_num=1, head_dim=8, layer_num=1,
                          device="cpu", enable_memory_saver=False)
    alloc = TokenToKVPoolAllocator(size=1024, dtype=torch.bfloat16, device="cpu", kvcache=kv, need_sort=False)
    params = CacheInitParams(disable=False, req_to_token_pool=r2t, token_to_kv_pool_allocator=alloc, page_size=1,
                             enable_kv_cache_events=False, tree_components=(ComponentType.FULL,),
                             tree_core_backend=core, is_eagle=True)
    tree = UnifiedRadixCache(params)
    assert "_contextpilot_mirror" not in tree.__dict__ and params.enable_kv_cache_events is False
