"""Cache simulator semantics on hand-made cases, and equality with the real vLLM engine."""

from __future__ import annotations

import pytest

from contextpilot_engine.bench.simulator import PrefixCacheSimulator, TokenPrefixCache, simulate


def test_page_rounding_and_last_token():
    sim = PrefixCacheSimulator(page_size=16)
    prompt = [("a", 100)]
    assert sim.serve(prompt) == 0
    assert sim.serve(prompt) == 96  # (100 - 1) // 16 * 16: whole pages, last token recomputed
    exact = [("b", 64)]
    for page, expect in ((32, 32), (16, 48), (1, 63)):
        s = PrefixCacheSimulator(page_size=page)
        s.serve(exact)
        assert s.serve(exact) == expect, page


def test_shared_prefix_stops_at_first_different_segment():
    sim = PrefixCacheSimulator(page_size=16)
    sim.serve([("pre", 20), ("x", 30), ("y", 50), ("tail1", 10)])
    # shares pre+x (50 tokens): the page ending at 48 is the last full shared page
    assert sim.serve([("pre", 20), ("x", 30), ("z", 50), ("tail2", 10)]) == 48
    s1 = PrefixCacheSimulator(page_size=1)
    s1.serve([("pre", 20), ("x", 30), ("y", 50), ("tail1", 10)])
    assert s1.serve([("pre", 20), ("x", 30), ("z", 50), ("tail2", 10)]) == 50


def test_lru_evicts_least_recent_and_tail_first():
    sim = PrefixCacheSimulator(page_size=16, capacity_tokens=64)
    a = [("a", 65)]  # 4 full pages, all usable
    assert sim.serve(a) == 0
    assert sim.serve(a) == 64
    sim.serve([("b", 17)])  # one new page: evicts a's least recently used page, its tail
    assert sim.serve(a) == 48
    sim2 = PrefixCacheSimulator(page_size=16, capacity_tokens=32)
    sim2.serve([("c", 33)])
    sim2.serve([("d", 33)])  # c's two pages are evicted
    assert sim2.serve([("c", 33)]) == 0
    assert sim2.cached_tokens <= 32


def test_page_one_capacity_evicts_whole_segments():
    sim = PrefixCacheSimulator(page_size=1, capacity_tokens=100)
    sim.serve([("p", 40), ("q", 40)])
    sim.serve([("r", 50)])  # 130 tokens > 100: q, the request's tail and least recent, goes whole
    assert sim.evicted_tokens == 40
    assert sim.serve([("p", 40), ("q", 40)]) == 40


def test_token_mode_matches_segment_mode_on_distinct_tokens():
    # segments made of distinct token runs: both simulators see the same sharing
    seg = {"pre": list(range(40)), "x": list(range(100, 170)), "y": list(range(200, 233))}
    seg.update(t1=[900], t2=[901, 902])
    prompts = [["pre", "x", "t1"], ["pre", "x", "y", "t2"], ["pre", "y", "t1"], ["pre", "x", "y", "t1"]]
    for cap_pages in (None, 4):
        cap = None if cap_pages is None else cap_pages * 32
        a = simulate([[(k, len(seg[k])) for k in p] for p in prompts], 32, cap)
        tok = TokenPrefixCache(32, cap_pages)
        hits = [tok.serve([t for k in p for t in seg[k]]) for p in prompts]
        assert hits == a.hits


def test_rejects_bad_parameters():
    with pytest.raises(ValueError):
        PrefixCacheSimulator(page_size=0)
    with pytest.raises(ValueError):
        PrefixCacheSimulator(capacity_tokens=0)
    with pytest.raises(ValueError):
        TokenPrefixCache(block_size=0)


@pytest.mark.engine
def test_token_simulator_equals_vllm_num_cached_tokens(engine_llm, tiny_model_path):
    """Block size 32, one request at a time, ample cache: identical per-request hits."""
    from transformers import AutoTokenizer

    from contextpilot_engine.bench.engine import prefill_timed
    from contextpilot_engine.bench.engine_replay import chat_token_ids
    from contextpilot_engine.bench.methods import _Renderer, run_ours_offline, run_retrieval
    from contextpilot_engine.bench.presets import build_engine_variant

    tok = AutoTokenizer.from_pretrained(str(tiny_model_path))
    wl = build_engine_variant("rag-top20", seed=3)
    wl.requests = wl.requests[:14]
    count = wl.token_counter()
    prompts = []
    for result in (run_retrieval(wl, _Renderer(count)), run_ours_offline(wl, count)):
        prompts += [chat_token_ids(tok, result.messages[i]) for i in result.order]
    prompts += prompts[:3]  # exact repeats: hits stop one token short of the end
    engine_llm.reset_prefix_cache()
    engine = [r.cached_tokens for r in prefill_timed(engine_llm, prompts)]
    sim = TokenPrefixCache(32)
    assert [sim.serve(p) for p in prompts] == engine
    assert sum(engine) > 0
