"""Smoke tests of vLLM's prefix cache on the CPU engine, through contextpilot_engine.bench.engine.

They pin down the engine behaviour the rest of the project relies on:
shared prefixes are reused in whole blocks, unrelated prompts are not, the
Prometheus counters agree with the per-request numbers, a cache reset really
empties the cache, and a small cache evicts old prefixes.

One engine is shared by the module (``engine_llm`` in conftest.py) because
importing vLLM and starting an engine costs about 10 s.  Each test uses its
own random token ids, so tests do not depend on each other's cache contents.
The eviction test builds a second engine and therefore runs last: vLLM's
metrics registry is process-global and follows the newest engine.
"""

from __future__ import annotations

import random

import pytest

from contextpilot_engine.bench.engine import (
    max_cached_tokens,
    prefill,
    prefill_timed,
    prefix_cache_counters,
)

pytestmark = pytest.mark.engine

BLOCK = 32  # make_llm's default block size, used by the engine_llm fixture
FIRST_ORDINARY_ID = 3  # ids 0-2 are the tokenizer's special tokens
VOCAB = 4096


def random_ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(FIRST_ORDINARY_ID, VOCAB) for _ in range(n)]


def test_shared_prefix_is_reused_in_whole_blocks(engine_llm):
    prefix = random_ids(1, 20 * BLOCK + 7)  # does not end on a block boundary
    first, second = prefix + random_ids(2, 100), prefix + random_ids(3, 100)
    assert first[len(prefix)] != second[len(prefix)]

    cold, warm = prefill(engine_llm, [first, second])

    assert cold == 0
    assert warm > 0
    assert warm % BLOCK == 0
    # Exactly the full blocks of the shared prefix: the partial block differs.
    assert warm == len(prefix) // BLOCK * BLOCK


def test_identical_prompt_reuses_all_but_the_last_block(engine_llm):
    prompt = random_ids(4, 10 * BLOCK)
    cold, warm = prefill(engine_llm, [prompt, prompt])
    assert cold == 0
    assert warm == max_cached_tokens(len(prompt), BLOCK) == 9 * BLOCK


def test_unrelated_prompt_gets_no_hit(engine_llm):
    prefill(engine_llm, [random_ids(5, 600)])
    (unrelated,) = prefill(engine_llm, [random_ids(6, 600)])
    assert unrelated == 0


def test_counters_track_per_request_hits(engine_llm):
    prefix = random_ids(7, 12 * BLOCK)
    prompts = [prefix + random_ids(8, 50), prefix + random_ids(9, 50), random_ids(10, 300)]

    before = prefix_cache_counters(engine_llm)
    results = prefill_timed(engine_llm, prompts)
    after = prefix_cache_counters(engine_llm)

    assert [r.cached_tokens for r in results] == [0, 12 * BLOCK, 0]
    assert [r.prompt_tokens for r in results] == [len(p) for p in prompts]
    assert all(r.seconds > 0 for r in results)
    # Queries count every prompt token looked up; hits the ones found.
    assert after["queries"] - before["queries"] == sum(len(p) for p in prompts)
    assert after["hits"] - before["hits"] == sum(r.cached_tokens for r in results) > 0


def test_text_and_chat_prompts_hit_the_cache(engine_llm):
    # Exercises the tokenizer and chat template shipped with the tiny model.
    text = "def handler(request):\n    return request.body\n" * 40
    text_cold, text_warm = prefill_timed(engine_llm, [text, text])
    assert text_cold.cached_tokens == 0
    assert text_warm.cached_tokens == max_cached_tokens(text_warm.prompt_tokens, BLOCK) > 0

    messages = [
        {"role": "system", "content": "You are terse. " * 60},
        {"role": "user", "content": "Summarise the document."},
    ]
    chat_cold, chat_warm = prefill_timed(engine_llm, [messages, messages])
    assert chat_cold.prompt_tokens == chat_warm.prompt_tokens > 4 * BLOCK
    assert chat_warm.cached_tokens == max_cached_tokens(chat_warm.prompt_tokens, BLOCK)


def test_reset_prefix_cache_forgets_everything(engine_llm):
    prompt = random_ids(11, 8 * BLOCK + 5)
    cold, warm = prefill(engine_llm, [prompt, prompt])
    assert (cold, warm) == (0, 8 * BLOCK)

    assert engine_llm.reset_prefix_cache() is True

    assert prefill(engine_llm, [prompt]) == [0]


def test_make_llm_rejects_a_model_len_larger_than_the_cache(tiny_model_path):
    from contextpilot_engine.bench.engine import make_llm

    with pytest.raises(ValueError, match="does not fit"):
        make_llm(tiny_model_path, num_kv_blocks=4, max_model_len=1024)


@pytest.fixture(scope="module")
def small_cache_llm(tiny_model_path, engine_llm):
    """A second engine with 16 usable KV blocks of 32 tokens, so that prefixes get evicted.

    Module-scoped on purpose: shutting an in-process engine down breaks every
    other open engine (see close_llm), so both engines close together at the
    end of the module.  It depends on engine_llm so that it closes first.
    """
    from contextpilot_engine.bench.engine import close_llm, make_llm

    llm = make_llm(tiny_model_path, num_kv_blocks=16, max_model_len=16 * BLOCK)
    yield llm
    close_llm(llm)


# Keep last: the second engine takes over vLLM's process-global metrics registry.
def test_small_kv_cache_evicts_the_oldest_prefix(small_cache_llm, engine_llm):
    llm = small_cache_llm
    # Each 256-token prompt fills 8 blocks, so three of them cannot all stay cached.
    old, other, newer = random_ids(12, 8 * BLOCK), random_ids(13, 8 * BLOCK), random_ids(14, 8 * BLOCK)
    cold, warm = prefill(llm, [old, old])
    assert (cold, warm) == (0, max_cached_tokens(len(old), BLOCK))

    prefill(llm, [other, newer])  # needs the blocks that hold `old`
    (after_eviction,) = prefill(llm, [old])
    assert after_eviction < warm

    # The most recent prompt is still cached: eviction is least-recently-used.
    (newest_again,) = prefill(llm, [newer])
    assert newest_again == max_cached_tokens(len(newer), BLOCK)

    counters = prefix_cache_counters(llm)
    assert counters["hits"] == warm + after_eviction + newest_again
    with pytest.raises(RuntimeError, match="newer engine"):
        prefix_cache_counters(engine_llm)
