"""Core benchmark: hit ratio against the baselines, optimize_batch time, online latency.

Prints, for a seeded synthetic RAG batch (Zipf-popular chunks, top-k 20,
chunks of 200-1,300 tokens):

1. the token hit ratio of an exact-prefix cache with 16-token pages and
   unlimited capacity, for retrieval order, the frequency-sort baseline and
   ours (``optimize_batch``), each serving its prompts in its own execution
   order;
2. ``optimize_batch`` wall time at 1k, 10k and 100k contexts;
3. online ``optimize`` latency (p50, p99) while 100k requests are indexed.

Numbers are wall-clock on whatever machine runs it; compare ratios taken in
the same run.  Usage: ``python scripts/bench_core.py [--quick]``.
"""

from __future__ import annotations

import argparse
import gc
import time

import numpy as np

from contextpilot_engine import ContextPilot
from contextpilot_engine.bench.baselines import frequency_sort, retrieval_order
from contextpilot_engine.bench.simulator import hit_ratio, simulate
from contextpilot_engine.bench.workloads import Workload, rag_batch

PAGE = 16


def prompts(wl: Workload, perms, order, pilot: ContextPilot):
    """Segments of every prompt in execution order: preamble, blocks, request-specific tail."""
    count = wl.token_counter()
    pre = pilot.layout.preamble(None, count)
    out = []
    for i in order:
        ctx = wl.requests[i].contexts
        segs = [("preamble", pre.tokens)]
        segs += [(ctx[j], count(ctx[j]) + 3) for j in perms[i]]  # "[k] " and the newline
        segs.append((("tail", i), 2 * len(ctx) + 24))  # ranking note and query
        out.append(segs)
    return out


def ours_perms(wl: Workload, messages, order):
    perms = {}
    for m, i in zip(messages, order):
        body = m[0]["content"].split("<documents>\n", 1)[1].split("</documents>", 1)[0]
        served = [line.split("] ", 1)[1] for line in body.splitlines()]
        slot = {}
        for j, t in enumerate(wl.requests[i].contexts):
            slot.setdefault(t, []).append(j)
        perms[i] = [slot[t].pop(0) for t in served]
    return perms


def hit_ratios(n: int, seed: int) -> dict:
    wl = rag_batch(n_queries=n, top_k=20, seed=seed)
    pilot = ContextPilot(tokenizer=wl.token_counter())
    out = {}
    for name, (perms, order) in (
        ("retrieval order", retrieval_order(wl.contexts)),
        ("frequency sort", frequency_sort(wl.contexts)),
    ):
        out[name] = hit_ratio(simulate(prompts(wl, perms, order, pilot), PAGE))
    messages, order = pilot.optimize_batch(wl.contexts, wl.queries)
    out["ours (optimize_batch)"] = hit_ratio(simulate(prompts(wl, ours_perms(wl, messages, order), order, pilot), PAGE))
    return out


def batch_time(n: int, seed: int) -> float:
    wl = rag_batch(n_queries=n, top_k=20, seed=seed)
    pilot = ContextPilot(tokenizer=wl.token_counter())
    gc.collect()
    t = time.perf_counter()
    pilot.optimize_batch(wl.contexts, wl.queries)
    return time.perf_counter() - t


def online_latency(n: int, seed: int, capacity: int | None) -> dict:
    wl = rag_batch(n_queries=n, top_k=20, seed=seed)
    kwargs = {} if capacity is None else {"capacity_tokens": capacity, "max_nodes": capacity}
    pilot = ContextPilot(tokenizer=wl.token_counter(), **kwargs)
    lat = np.empty(n)
    for i, r in enumerate(wl.requests):
        t = time.perf_counter()
        pilot.optimize(r.contexts, r.query)
        lat[i] = time.perf_counter() - t
    tail = lat[-max(1, n // 10) :]  # the last tenth: the index already holds 90% of the requests
    stats = pilot.stats()
    return {
        "p50_ms": float(np.percentile(tail, 50) * 1e3),
        "p99_ms": float(np.percentile(tail, 99) * 1e3),
        "p99_all_ms": float(np.percentile(lat, 99) * 1e3),
        "nodes": stats["nodes"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    hit_n = 500 if args.quick else 2000
    sizes = [1000, 5000] if args.quick else [1000, 10_000, 100_000]
    online_n = 5000 if args.quick else 100_000

    print(f"== token hit ratio, exact-prefix cache, page {PAGE}, unlimited capacity ({hit_n} RAG requests, top-20)")
    ratios = hit_ratios(hit_n, args.seed)
    base = ratios["frequency sort"]
    for name, r in ratios.items():
        print(f"  {name:24s} {r:7.2%}   x{r / base:4.2f} vs frequency sort")

    print("== optimize_batch wall time")
    for n in sizes:
        print(f"  {n:>7} contexts  {batch_time(n, args.seed):6.2f} s")

    for label, cap in (("default capacity (2M tokens)", None), ("capacity holding every request", 10**12)):
        print(f"== online optimize latency, {online_n} requests, {label}")
        s = online_latency(online_n, args.seed, cap)
        print(
            f"  last 10%: p50 {s['p50_ms']:.3f} ms  p99 {s['p99_ms']:.3f} ms   all: p99 {s['p99_all_ms']:.3f} ms"
            f"   index nodes {s['nodes']}"
        )


if __name__ == "__main__":
    main()
