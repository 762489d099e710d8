#!/usr/bin/env python
"""The SGLang plugin on SGLang's real code (CPU): cache reuse with and without it, mirror cost, channel lag.

SGLang's server cannot run on this machine (it needs a CUDA GPU or an AMX
CPU), so the scheduler is stood in for by what it does with a prompt once
prefilled: its full pages are inserted into a real ``UnifiedRadixCache`` on
CPU memory pools, small enough that inserts evict.  Everything else is
SGLang's own: ``OpenAIServingChat`` converts each chat request (the plugin's
request path included) with the local model's tokenizer, and the tree core
is SGLang's default (Rust).

1. **Reuse.**  The same RAG trace (documents as ``<document>`` elements in
   the system message, retrieval order, one request at a time) through a
   deployment without the plugin and one with it: hit tokens are the
   device prefix the tree holds for each prompt just before it is inserted.
2. **Mirror cost**: time spent applying the tree's events to the index,
   per page event.
3. **Channel lag**: the same trace on a mirror published over the channel,
   read by a subscriber thread, as SGLang's main process reads its scheduler.

Run (the SGLang environment; about a minute)::

    SPY=$(bash scripts/setup_sglang.sh | tail -n1)
    $SPY scripts/bench_sglang.py [--requests 200] [--slots 8192] [--page 16]
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def trace(args):
    from contextpilot_engine.demo import rag_conversations

    return rag_conversations(args.requests, args.top_k, args.chunks, args.doc_tokens, args.seed)


def run(conversations, model_dir, args, plugin: bool, port: int) -> dict:
    from sglang.srt.entrypoints.openai.protocol import ChatCompletionRequest

    from contextpilot_engine.sglang_plugin.frontend import state_for_serving
    from contextpilot_engine.sglang_plugin.testing import (
        cached_prefix,
        insert_tokens,
        make_cache,
        make_serving_chat,
        publish_server_args,
    )

    server_args = publish_server_args("scheduler", port=port, **({"_contextpilot": {}} if plugin else {}))
    chat = make_serving_chat(model_dir, server_args)
    state = state_for_serving(chat)
    cache, alloc = make_cache("rust", args.page, slots=args.slots)
    prompt = hits = 0
    start = time.perf_counter()
    for messages in conversations:
        request = ChatCompletionRequest(model="tiny", messages=messages, max_tokens=1)
        adapted, _ = chat._convert_to_internal_request(request, None)
        ids = adapted.input_ids
        prompt += len(ids)
        hits += cached_prefix(cache, ids)
        insert_tokens(cache, alloc, ids, args.page)
    out = {"prompt_tokens": prompt, "hit_tokens": hits, "seconds": time.perf_counter() - start}
    if state is not None and state.mirror is not None:
        from contextpilot_engine.sglang_plugin.radix_cache import mirror_of

        m = state.mirror
        out["mirror_updates"], out["mirror_seconds"] = m.updates, m.update_seconds
        out["page_events"] = mirror_of(cache).page_events
        out["cached_pages"] = sum(state.index.cached_pages().values())
        out["tree_pages"] = (cache.evictable_size() + cache.protected_size()) // args.page
    return out


def channel_lag(conversations, model_dir, args, port: int) -> dict:
    """A mirror published over the channel, as in a scheduler process, read by a subscriber thread."""
    from sglang.srt.entrypoints.openai.protocol import ChatCompletionRequest

    from contextpilot_engine.index import ContextIndex
    from contextpilot_engine.integration.channel import ChannelSubscriber
    from contextpilot_engine.integration.state import LagStats, socket_path
    from contextpilot_engine.sglang_plugin.config import engine_key
    from contextpilot_engine.sglang_plugin.radix_cache import mirror_of
    from contextpilot_engine.sglang_plugin.testing import insert_tokens, make_cache, make_serving_chat, \
        publish_server_args

    plain = make_serving_chat(model_dir, publish_server_args("tokenizer", port=port + 1))
    server_args = publish_server_args("scheduler", port=port, _contextpilot={})
    cache, alloc = make_cache("rust", args.page, slots=args.slots)  # no request side here: published
    remote, lag = ContextIndex(), LagStats()
    sub = ChannelSubscriber(socket_path(engine_key(server_args), 0), remote, lag).start()
    try:
        assert sub.connected.wait(30)
        for messages in conversations:
            request = ChatCompletionRequest(model="tiny", messages=messages, max_tokens=1)
            adapted, _ = plain._convert_to_internal_request(request, None)
            insert_tokens(cache, alloc, adapted.input_ids, args.page)
            time.sleep(0.002)  # the scheduler prefills between two inserts
        deadline = time.monotonic() + 10
        local = mirror_of(cache).mirror.index
        while remote.cached_pages() != local.cached_pages() and time.monotonic() < deadline:
            time.sleep(0.01)
        return {"equal": remote.cached_pages() == local.cached_pages(), **lag.summary()}
    finally:
        sub.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--doc-tokens", type=int, default=150)
    parser.add_argument("--chunks", type=int, default=60)
    parser.add_argument("--slots", type=int, default=16384, help="KV slots of the pool (small: inserts evict)")
    parser.add_argument("--page", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)

    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from sglang.srt.plugins import load_plugins

    load_plugins()
    import sglang

    from contextpilot_engine.bench.tiny_model import cached_tiny_model

    model_dir = str(cached_tiny_model("tiny"))
    conversations = trace(args)
    base = run(conversations, model_dir, args, plugin=False, port=31000)
    ours = run(conversations, model_dir, args, plugin=True, port=31002)
    lag = channel_lag(conversations, model_dir, args, port=31004)

    print(f"sglang {sglang.__version__} (UnifiedRadixCache, Rust tree core, page {args.page}, {args.slots} KV slots), "
          f"{len(conversations)} RAG chat requests (top-{args.top_k} of {args.chunks} chunks), one at a time")
    for name, r in (("SGLang, radix cache", base), ("SGLang + contextpilot", ours)):
        print(f"  {name:24s} {r['hit_tokens']:>9,d} / {r['prompt_tokens']:>9,d} prompt tokens hit the tree "
              f"({r['hit_tokens'] / r['prompt_tokens']:.1%})")
    print(f"  hit tokens x{ours['hit_tokens'] / max(1, base['hit_tokens']):.2f}")
    print(f"mirror: {ours['page_events']:,d} page events in {ours['mirror_updates']:,d} updates, "
          f"{ours['mirror_seconds'] / max(1, ours['page_events']) * 1e6:.2f} us per page event; "
          f"index pages {ours['cached_pages']:,d}, tree pages {ours['tree_pages']:,d}")
    every = lag["all"]
    print(f"channel: {lag['batches']:,d} frames / {lag['events']:,d} page events, lag mean "
          f"{every.get('mean_s', 0) * 1e6:,.0f} us, p50 {every.get('p50_s', 0) * 1e6:,.0f} us, "
          f"p99 {every.get('p99_s', 0) * 1e6:,.0f} us; subscriber equal to the mirror: {lag['equal']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "baseline": base, "contextpilot": ours, "channel": lag}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
