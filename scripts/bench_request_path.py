#!/usr/bin/env python
"""Request-path overhead of the vLLM plugin, measured side by side with vLLM's own chat rendering.

One in-process engine with the plugin (tiny local model, block 32); its
index is first filled with ``--index-nodes`` prefix-tree nodes bound to
synthetic pages, as a long-running server's would be.  Then, for each of
``--requests`` RAG conversations (``--top-k`` documents of about
``--doc-tokens`` tokens each, as ``<document>`` elements in the system
message), the renderer's ``render_chat`` is timed twice, alternating: the
plugin's wrapped method (everything the plugin adds between receiving the
conversation and handing token ids to the engine, plus vLLM's own work) and
vLLM's original method on the same conversation.  The overhead of a request
is the difference; p50/p99 are over all requests.  The top entries of a
cProfile of the wrapped calls show where the time goes.

Run (the pinned environment; about a minute)::

    PY=$(bash scripts/setup_env.sh | tail -n1)
    $PY scripts/bench_request_path.py [--requests 300] [--index-nodes 100000] [--profile 12]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time


def conversations(args):
    from contextpilot_engine.demo import rag_conversations

    return rag_conversations(args.requests, args.top_k, args.chunks, args.doc_tokens, args.seed)


def fill_index(index, nodes: int, page: int) -> None:
    """Bind synthetic served prompts (10 blocks each) until the index holds ``nodes`` nodes."""
    from contextpilot_engine.pages import chain_page_keys

    tenant = "default"
    k = 0
    while index.stats()["nodes"] < nodes:
        blocks = [(10_000_000 + k * 10 + j, page * 2) for j in range(10)]
        tokens = [(k * 31 + t) % 4000 for t in range(page * 21)]
        ends = [page] + [page * (2 * j + 3) for j in range(10)]
        index.bind(tenant, 12345 + k % 3, page, blocks, ends, chain_page_keys(tokens, page))
        k += 1


def percentile(data, p):
    data = sorted(data)
    return data[min(len(data) - 1, int(p * len(data)))]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--doc-tokens", type=int, default=300)
    parser.add_argument("--chunks", type=int, default=200)
    parser.add_argument("--index-nodes", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", type=int, default=12, help="cProfile entries to print (0: none)")
    args = parser.parse_args(argv)

    from contextpilot_engine.bench.engine import close_llm, engine_env, make_llm

    engine_env()
    from vllm import SamplingParams  # noqa: F401  (imports vLLM before timing anything)

    from contextpilot_engine import vllm_plugin
    from contextpilot_engine.bench.tiny_model import cached_tiny_model

    try:
        from contextpilot_engine.integration.failopen import original
    except ImportError:  # an older layout of the plugin
        from contextpilot_engine.vllm_plugin.failopen import original
    from vllm.renderers.base import BaseRenderer

    convs = conversations(args)
    llm = make_llm(cached_tiny_model("tiny"), additional_config={"contextpilot": {}})
    try:
        renderer = llm.renderer if hasattr(llm, "renderer") else llm.llm_engine.renderer
        state = vllm_plugin.engine_state(llm)
        chat_params = llm._get_chat_params() if hasattr(llm, "_get_chat_params") else None
        page = state.index.page_size
        t0 = time.perf_counter()
        fill_index(state.index, args.index_nodes, page)
        fill_s = time.perf_counter() - t0
        wrapped = BaseRenderer.render_chat
        plain = original(BaseRenderer, "render_chat")
        if chat_params is None:
            from vllm.renderers.params import ChatParams

            chat_params = ChatParams()
        for conv in convs[:5]:  # warm both paths (tokenizer caches, first-call imports)
            wrapped(renderer, [conv], chat_params)
            plain(renderer, [conv], chat_params)
        prompt_lens = [len(plain(renderer, [c], chat_params)[1][0]["prompt_token_ids"]) for c in convs[:20]]
        ours_lens = [len(wrapped(renderer, [c], chat_params)[1][0]["prompt_token_ids"]) for c in convs[:20]]
        overhead, base, ours = [], [], []
        profiler = cProfile.Profile()
        for i, conv in enumerate(convs):
            for first in ((wrapped, plain) if i % 2 else (plain, wrapped)):
                start = time.perf_counter()
                if first is wrapped:
                    profiler.enable()
                    first(renderer, [conv], chat_params)
                    profiler.disable()
                    ours.append(time.perf_counter() - start)
                else:
                    first(renderer, [conv], chat_params)
                    base.append(time.perf_counter() - start)
            overhead.append(ours[-1] - base[-1])
        nodes = state.index.stats()["nodes"]
        internal = list(getattr(state, "overhead", []))[-len(convs):]
    finally:
        close_llm(llm)

    print(f"{len(convs)} RAG conversations, top-{args.top_k} documents of ~{args.doc_tokens} tokens "
          f"({statistics.mean(prompt_lens):,.0f} prompt tokens on average as sent, "
          f"{statistics.mean(ours_lens):,.0f} as rewritten); "
          f"index: {nodes:,d} nodes (filled in {fill_s:.1f} s)")
    print(f"  vLLM render_chat alone:        p50 {statistics.median(base) * 1e3:7.3f} ms   "
          f"p99 {percentile(base, 0.99) * 1e3:7.3f} ms")
    print(f"  with the plugin:               p50 {statistics.median(ours) * 1e3:7.3f} ms   "
          f"p99 {percentile(ours, 0.99) * 1e3:7.3f} ms")
    print(f"  overhead (difference, paired): p50 {statistics.median(overhead) * 1e3:7.3f} ms   "
          f"p99 {percentile(overhead, 0.99) * 1e3:7.3f} ms")
    if internal:
        print(f"  overhead (plugin's own clock): p50 {statistics.median(internal) * 1e3:7.3f} ms   "
              f"p99 {percentile(internal, 0.99) * 1e3:7.3f} ms")
    if args.profile:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(args.profile)
        print("\nprofile of the plugin's render_chat calls (by own time):")
        print("\n".join(line for line in out.getvalue().splitlines() if line.strip())[:6000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
