"""``contextpilot demo``: the same RAG requests through a real vLLM engine, with and without contextpilot.

Everything is local: a tiny random-weight Llama model is built on first use
(no download), the engine runs in-process on the CPU with prefix caching on,
and each request is sent on its own so every run sees the cache its
predecessors left.  The engine's own counter (``num_cached_tokens`` per
request) says how much of each prompt came from the cache; answers are noise,
since the weights are random.

Runs, each on a freshly reset prefix cache:

* **without contextpilot**: the blocks in retrieval order, in the same prompt
  layout;
* **contextpilot online**: ``ContextPilot.optimize`` per request;
* **contextpilot offline**: ``ContextPilot.optimize_batch`` for the whole
  batch, sent in its execution order.

Plugin mode (``--mode plugin`` or ``all``, the default) sends what a client
unaware of contextpilot sends, the documents as ``<document>`` elements in
the system message in retrieval order, to the same engine without the plugin
and then to a second engine built with
``additional_config={"contextpilot": {}}`` (the vLLM plugin reorders them
against the live cache inside the engine).  In-process engines are built one
after another, each closed before the next (see
``contextpilot_engine.bench.engine.close_llm``).
"""

from __future__ import annotations

import argparse
import time

from .arg_types import int_at_least

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--requests", type=int_at_least(1), default=60, help="RAG requests (default 60)")
    parser.add_argument("--top-k", type=int_at_least(1), default=8, help="blocks per request (default 8)")
    parser.add_argument("--chunks", type=int_at_least(2), default=40, help="distinct chunks in the corpus (default 40)")
    parser.add_argument("--model", choices=("tiny", "small"), default="tiny", help="local model size")
    parser.add_argument("--seed", type=int_at_least(0), default=0)
    parser.add_argument(
        "--mode",
        choices=("all", "library", "plugin"),
        default="all",
        help="library API rows, vLLM plugin rows, or both (default)",
    )


def _identity_messages(pilot, docs, query):
    """The contextpilot prompt layout with the blocks left in retrieval order (the fair baseline)."""
    from .prompts import render_messages
    from .validation import parse_context

    blocks = parse_context(docs, "docs", pilot.count_tokens, 4096)
    preamble = pilot.layout.preamble(None, pilot.count_tokens)
    return render_messages(pilot.layout, preamble, blocks, [f"[{i + 1}]" for i in range(len(blocks))], query)


def demo_workload(requests: int, top_k: int, chunks: int, seed: int):
    """The demo's RAG trace (also the vLLM plugin benchmark's): short real-text chunks, Zipf popularity."""
    from .bench.workloads import materialise, rag_batch

    return materialise(
        rag_batch(
            n_queries=requests,
            top_k=top_k,
            n_chunks=chunks,
            n_topics=max(2, chunks // 8),
            min_tokens=60,
            max_tokens=240,
            seed=seed,
        )
    )


def rag_conversations(requests: int, top_k: int, chunks: int, doc_tokens: int, seed: int = 0) -> list[list[dict]]:
    """A RAG trace as chat messages, documents of about ``doc_tokens`` tokens of the local models' tokenizer.

    The local tokenizer (trained on Python source) splits the filler words
    finely: about 0.32 words per token gives documents of about
    ``doc_tokens`` real tokens.  The benchmarks of both engine plugins send it.
    """
    from .bench.workloads import materialise, rag_batch

    wl = materialise(
        rag_batch(n_queries=requests, top_k=top_k, n_chunks=chunks, n_topics=max(2, chunks // 8),
                  min_tokens=int(doc_tokens * 0.8), max_tokens=int(doc_tokens * 1.2), seed=seed),
        words_per_token=0.32,
    )
    return [document_messages(r.contexts, r.query) for r in wl.requests]


def document_messages(docs, query):
    """What a RAG client unaware of contextpilot sends: the documents in retrieval order."""
    system = "Answer from the documents.\n" + "".join(f"<document>{d}</document>\n" for d in docs)
    return [{"role": "system", "content": system}, {"role": "user", "content": query}]


def run(args: argparse.Namespace) -> int:
    from . import ContextPilot
    from .bench.engine import engine_env, make_llm, prefill_timed
    from .bench.tiny_model import cached_tiny_model

    engine_env()
    print(f"building/loading the local {args.model} model ...", flush=True)
    model = cached_tiny_model(args.model)
    wl = demo_workload(args.requests, args.top_k, args.chunks, args.seed)
    mode = getattr(args, "mode", "all")
    print("starting vLLM (in-process, CPU, prefix caching on) ...", flush=True)
    llm = make_llm(model, block_size=32)  # vLLM's CPU attention needs multiples of 32

    def measure(name, conversations, engine=None):
        engine = engine or llm
        engine.reset_prefix_cache()
        start = time.perf_counter()
        results = prefill_timed(engine, conversations)
        wall = time.perf_counter() - start
        cached = sum(r.cached_tokens for r in results)
        prompt = sum(r.prompt_tokens for r in results)
        print(f"  {name:28s} {cached:8d} / {prompt:8d} prompt tokens cached = {cached / prompt:6.1%}   {wall:6.2f} s")
        return cached / prompt

    print(f"\n{len(wl.requests)} RAG requests, top-{args.top_k}, one at a time:")
    if mode in ("all", "library"):
        print("library API (prompts built by ContextPilot, plain vLLM engine):")
        base_pilot = ContextPilot()
        identity = [_identity_messages(base_pilot, r.contexts, r.query) for r in wl.requests]
        base = measure("without contextpilot", identity)
        online_pilot = ContextPilot()
        online = measure("contextpilot online", [online_pilot.optimize(r.contexts, r.query) for r in wl.requests])
        batch, _ = ContextPilot().optimize_batch(wl.contexts, wl.queries)
        offline = measure("contextpilot offline (batch)", batch)
        print(
            f"cache hit ratio: online x{online / max(base, 1e-9):.2f}, offline x{offline / max(base, 1e-9):.2f} "
            "the baseline's (engine counters, same engine, same run)"
        )
    if mode in ("all", "plugin"):
        from .bench.engine import close_llm

        plain = [document_messages(r.contexts, r.query) for r in wl.requests]
        print("vLLM plugin (the same <document> messages; the engine reorders them):")
        without = measure("engine without the plugin", plain)
        close_llm(llm)  # one in-process engine at a time
        plugin_llm = make_llm(model, block_size=32, additional_config={"contextpilot": {}})
        try:
            with_plugin = measure("engine with the plugin", plain, plugin_llm)
        finally:
            close_llm(plugin_llm)
        print(
            f"cache hit ratio: plugin x{with_plugin / max(without, 1e-9):.2f} the plain engine's "
            "(engine counters, same messages, same run)"
        )
    return 0
