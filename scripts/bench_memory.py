"""Memory soak: the process memory budget under a long, many-tenant ``optimize`` load.

A benchmark, not a timed test (issue 14).  It runs, in one process:

1. **Soak.**  ``--requests`` (default 1,000,000) ``ContextPilot.optimize``
   calls, with the library's default options, over ``--tenants`` tenants and
   ``--conversations`` conversations.  Conversations are Zipf-popular, each
   belongs to one tenant (tenants' sizes are Zipf too, so a few tenants are
   noisy), and every request carries its conversation id and ``--top-k``
   blocks drawn from a ``--corpus``-chunk Zipf corpus (each tenant's
   popularity ranking is shifted, so tenants have hot sets of their own).
   The requests are drawn in batches as the run goes, so the generator's
   memory does not grow.  Every 1% of the run it samples the resident set
   (``/proc/self/statm``) and the budget's accounted use.  It reports the
   growth of the resident set over the last 20% of the run, its peak against
   the budget, and per-request latency on the wall clock and on the thread's
   CPU clock (the machine may be shared: a request that loses the CPU to
   another process shows up only on the wall clock).
2. **Hit ratio.**  The benchmark suite's ``ours online`` method
   (:func:`contextpilot_engine.bench.methods.run_ours_online`) on the suite's
   RAG workloads, scored by the suite's prefix-cache simulator (16-token
   pages, an unlimited cache and one of 25% of the unique tokens, the index
   told that capacity), three ways: with the budget unbounded; with the
   default budget and nothing else in the process; and with the default
   budget full, the soak's state still held and ``--interleave`` soak
   requests from the other tenants before every RAG request, so the RAG
   tenant competes for the budget throughout.

Usage::

    python scripts/bench_memory.py                 # the full soak (about 15 minutes on 2 cores)
    python scripts/bench_memory.py --smoke         # seconds
    python scripts/bench_memory.py --json out.json

Exit status 0 whatever the figures are; the acceptance checks are printed
(``PASS``/``FAIL``) and written to the JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from contextpilot_engine import ContextPilot  # noqa: E402
from contextpilot_engine.memory_budget import DEFAULT_BUDGET_MB, MIB, process_budget  # noqa: E402

PAGE = 16
#: the request path's per-request budget the soak's p99 is checked against (ms)
REQUEST_PATH_P99_MS = 3.0
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE_BYTES


def zipf_weights(n: int, alpha: float) -> np.ndarray:
    w = np.arange(1, n + 1, dtype=np.float64) ** -alpha
    return w / w.sum()


def make_corpus(n: int, words: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    vocab = [f"w{i}" for i in range(5000)]
    ids = rng.integers(0, len(vocab), size=(n, words))
    return [f"chunk {i}: " + " ".join(vocab[j] for j in row) for i, row in enumerate(ids)]


class Traffic:
    """The soak's request stream, drawn batch by batch from fixed Zipf distributions."""

    def __init__(self, args, corpus: list[str], seed: int):
        self.rng = np.random.default_rng(seed)
        self.corpus = corpus
        self.top_k = args.top_k
        self.batch = 8192
        n_conv, n_ten, n_chunks = args.conversations, args.tenants, len(corpus)
        self.conv_p = zipf_weights(n_conv, args.conversation_alpha)
        self.conv_perm = self.rng.permutation(n_conv)  # popularity rank -> conversation
        # each conversation belongs to one tenant; tenants' shares of the conversations are Zipf
        self.conv_tenant = self.rng.choice(n_ten, size=n_conv, p=zipf_weights(n_ten, args.tenant_alpha))
        self.shift = self.rng.integers(0, n_chunks, size=n_ten)  # each tenant's own hot set
        self.block_p = zipf_weights(n_chunks, args.block_alpha)
        self.tenant_names = [f"t{i}" for i in range(n_ten)]
        self.conv_names = [f"c{i}" for i in range(n_conv)]
        self.queries = [f"question {i}?" for i in range(997)]
        self._buf: list = []
        self._pos = 0
        self.drawn = 0

    def _refill(self) -> None:
        n = self.batch
        conv = self.conv_perm[self.rng.choice(len(self.conv_p), size=n, p=self.conv_p)]
        ten = self.conv_tenant[conv]
        ranks = self.rng.choice(len(self.block_p), size=(n, self.top_k), p=self.block_p)
        blocks = (ranks + self.shift[ten][:, None]) % len(self.corpus)
        c, tn, q = self.corpus, self.tenant_names, self.queries
        self._buf = [
            ([c[j] for j in blocks[i]], q[(self.drawn + i) % len(q)], tn[ten[i]], self.conv_names[conv[i]])
            for i in range(n)
        ]
        self._pos = 0
        self.drawn += n

    def next(self):
        if self._pos >= len(self._buf):
            self._refill()
        r = self._buf[self._pos]
        self._pos += 1
        return r


def soak(args, pilot: ContextPilot, traffic: Traffic) -> dict:
    n = args.requests
    budget = pilot.index.budget
    wall = np.empty(n, dtype=np.float32)
    cpu = np.empty(n, dtype=np.float32)
    wall.fill(0.0)  # touch the pages now, so that filling them does not count as growth
    cpu.fill(0.0)
    samples_every = max(1, n // 100)
    samples = []
    gc.collect()
    base_rss = rss_bytes()
    samples.append({"requests": 0, "rss": base_rss, "used_bytes": budget.used_bytes,
                    "used_entries": budget.used_entries, "seconds": 0.0})
    load_start = os.getloadavg()
    perf, thread = time.perf_counter, time.thread_time
    optimize = pilot.optimize
    started = perf()
    next_print = started
    for i in range(n):
        docs, query, tenant, cid = traffic.next()
        t0, c0 = perf(), thread()
        optimize(docs, query, tenant=tenant, conversation_id=cid)
        c1, t1 = thread(), perf()
        wall[i] = t1 - t0
        cpu[i] = c1 - c0
        if (i + 1) % samples_every == 0 or i + 1 == n:
            samples.append({"requests": i + 1, "rss": rss_bytes(), "used_bytes": budget.used_bytes,
                            "used_entries": budget.used_entries, "seconds": t1 - started})
            if not args.quiet and (t1 >= next_print or i + 1 == n):
                s = samples[-1]
                print(f"  {i + 1:>9,} requests  {s['seconds']:7.1f} s  {(i + 1) / s['seconds']:6.0f} req/s  "
                      f"rss {s['rss'] / MIB:7.1f} MiB  budget used {s['used_bytes'] / MIB:7.1f} MiB "
                      f"({s['used_entries']:,} entries)", flush=True)
                next_print = t1 + args.print_every
    seconds = perf() - started
    load_end = os.getloadavg()
    rss = np.array([s["rss"] for s in samples], dtype=np.float64)
    reqs = np.array([s["requests"] for s in samples])
    at80 = int(np.searchsorted(reqs, int(0.8 * n)))
    tail = rss[at80:]
    limit = budget.max_bytes
    stats = pilot.stats()["memory"]
    last = slice(int(0.8 * n), n)

    def pct(a: np.ndarray) -> dict:
        ms = a.astype(np.float64) * 1e3
        return {f"p{p}": float(np.percentile(ms, p)) for p in (50, 90, 99, 99.9)} | {"max": float(ms.max())}

    return {
        "requests": n,
        "seconds": seconds,
        "requests_per_second": n / seconds,
        "load_average_start": load_start,
        "load_average_end": load_end,
        "rss_before_first_request_mib": base_rss / MIB,
        "rss_at_80pct_mib": float(rss[at80] / MIB),
        "rss_end_mib": float(rss[-1] / MIB),
        "rss_peak_mib": float(rss.max() / MIB),
        "rss_peak_last20_mib": float(tail.max() / MIB),
        # growth over the last 20% of the run: end against the 80% mark, and the highest sample after it
        "rss_growth_last20_pct": float((rss[-1] - rss[at80]) / rss[at80] * 100),
        "rss_growth_last20_peak_pct": float((tail.max() - rss[at80]) / rss[at80] * 100),
        "rss_peak_above_start_mib": float((rss.max() - base_rss) / MIB),
        "budget_mib": None if limit is None else limit / MIB,
        "budget_used_peak_mib": max(s["used_bytes"] for s in samples) / MIB,
        "first_full_at_requests": next((s["requests"] for s in samples
                                        if limit is not None and s["used_bytes"] >= 0.95 * limit), None),
        "latency_wall_ms": pct(wall),
        "latency_cpu_ms": pct(cpu),
        "latency_wall_last20_ms": pct(wall[last]),
        "latency_cpu_last20_ms": pct(cpu[last]),
        "memory_stats": stats,
        "samples": [{**s, "rss_mib": s["rss"] / MIB, "used_mib": s["used_bytes"] / MIB} for s in samples],
    }


def hit_ratios(args, workloads: list[str], soak_pilot: ContextPilot | None, traffic: Traffic | None,
               limit_bytes: int | None) -> dict:
    """The suite's ``ours online`` on its RAG workloads, scored with the suite's simulator."""
    from contextpilot_engine.bench import methods
    from contextpilot_engine.bench.methods import _Renderer, run_ours_online, run_retrieval
    from contextpilot_engine.bench.presets import build
    from contextpilot_engine.bench.scoring import simulate_prompts, unique_tokens

    budget = process_budget()
    budget.configure(max_bytes=limit_bytes, max_entries=None)
    plain = methods.ContextPilot
    interleave = args.interleave

    class UnderPressure(plain):  # type: ignore[misc, valid-type]
        """The suite's pilot, with soak requests from the other tenants before each of its requests."""

        def optimize_with_report(self, *a, **kw):
            for _ in range(interleave):
                docs, query, tenant, cid = traffic.next()  # type: ignore[union-attr]
                soak_pilot.optimize(docs, query, tenant=tenant, conversation_id=cid)  # type: ignore[union-attr]
            return super().optimize_with_report(*a, **kw)

    out = {}
    for name in workloads:
        wl = build(name, args.smoke, args.seed)
        count = wl.token_counter()
        base = run_retrieval(wl, _Renderer(count))
        capacity = int(0.25 * unique_tokens(base.prompts(count)))
        row = {"requests": len(wl.requests), "capacity_25pct_tokens": capacity}
        before = budget.stats()["evictions"]
        if soak_pilot is not None:
            methods.ContextPilot = UnderPressure
        try:
            started = time.perf_counter()
            ample = run_ours_online(wl, count, None)
            told = run_ours_online(wl, count, capacity)
            row["seconds"] = time.perf_counter() - started
        finally:
            methods.ContextPilot = plain
        row["unlimited"] = simulate_prompts(ample.prompts(count), PAGE, None).hit_ratio
        row["cache_25pct"] = simulate_prompts(told.prompts(count), PAGE, capacity).hit_ratio
        after = budget.stats()
        row["budget_used_mib"] = after["used_bytes"] / MIB
        row["tenants"] = after["tenants"]
        row["evicted_entries_during"] = {
            f"{s}/{r}": c["entries"] - before.get(s, {}).get(r, {}).get("entries", 0)
            for s, reasons in after["evictions"].items() for r, c in reasons.items()
            if c["entries"] - before.get(s, {}).get(r, {}).get("entries", 0)
        }
        out[name] = row
        del ample, told
        gc.collect()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1_000_000)
    ap.add_argument("--tenants", type=int, default=1000)
    ap.add_argument("--conversations", type=int, default=100_000)
    ap.add_argument("--corpus", type=int, default=200_000, help="chunks in the Zipf corpus")
    ap.add_argument("--chunk-words", type=int, default=40)
    ap.add_argument("--top-k", type=int, default=10, help="blocks per request")
    ap.add_argument("--block-alpha", type=float, default=1.1, help="Zipf exponent of block popularity")
    ap.add_argument("--conversation-alpha", type=float, default=1.0)
    ap.add_argument("--tenant-alpha", type=float, default=1.0, help="Zipf exponent of tenants' sizes")
    ap.add_argument("--budget-mb", type=int, default=None,
                    help=f"memory_budget_mb for the soak (default: the library default, {DEFAULT_BUDGET_MB})")
    ap.add_argument("--workloads", default="rag-top10,rag-top20", help="suite RAG workloads for the hit ratio")
    ap.add_argument("--interleave", type=int, default=10, help="soak requests before each RAG request (pressure)")
    ap.add_argument("--no-hit-ratio", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="a small run (seconds): sizes / 50, smoke workloads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--print-every", type=float, default=30.0, help="seconds between progress lines")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    if args.smoke:
        given = set(a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]))
        for opt, attr, value in (("--requests", "requests", 20_000), ("--tenants", "tenants", 50),
                                 ("--conversations", "conversations", 2_000), ("--corpus", "corpus", 20_000)):
            if opt not in given:
                setattr(args, attr, value)
        if "--budget-mb" not in given:
            args.budget_mb = 16  # small enough that the smoke run fills it
        args.print_every = min(args.print_every, 2.0)

    budget_mb = args.budget_mb if args.budget_mb is not None else DEFAULT_BUDGET_MB
    limit = budget_mb * MIB
    print(f"memory soak: {args.requests:,} requests, {args.tenants:,} tenants, {args.conversations:,} "
          f"conversations, top-{args.top_k} of {args.corpus:,} chunks, budget {budget_mb} MiB", flush=True)
    corpus = make_corpus(args.corpus, args.chunk_words, args.seed)
    traffic = Traffic(args, corpus, args.seed + 1)
    process_budget().configure(max_bytes=limit, max_entries=None)
    pilot = ContextPilot(memory_budget_mb=budget_mb)
    result: dict = {"args": vars(args), "python": sys.version.split()[0], "cpus": os.cpu_count()}
    result["soak"] = s = soak(args, pilot, traffic)
    mem = s["memory_stats"]
    print(f"\nsoak: {s['seconds']:.0f} s ({s['requests_per_second']:.0f} req/s), load average "
          f"{s['load_average_start'][0]:.1f} -> {s['load_average_end'][0]:.1f} on {os.cpu_count()} CPUs")
    print(f"  rss: {s['rss_before_first_request_mib']:.0f} MiB before the first request, "
          f"{s['rss_at_80pct_mib']:.0f} MiB at 80%, {s['rss_end_mib']:.0f} MiB at the end, peak "
          f"{s['rss_peak_mib']:.0f} MiB; growth over the last 20%: {s['rss_growth_last20_pct']:+.2f}% "
          f"(highest sample {s['rss_growth_last20_peak_pct']:+.2f}%)")
    print(f"  budget {s['budget_mib']:.0f} MiB: accounted use peak {s['budget_used_peak_mib']:.1f} MiB, "
          f"end {mem['used_bytes'] / MIB:.1f} MiB ({mem['used_entries']:,} entries), full from request "
          f"{s['first_full_at_requests']}")
    for name, use in mem["structures"].items():
        print(f"    {name:<16} {use['entries']:>10,} entries {use['bytes'] / MIB:9.1f} MiB"
              f"{'' if use['budgeted'] else '  (outside the budget)'}")
    for name, reasons in mem["evictions"].items():
        print(f"    evicted {name:<16} " + ", ".join(f"{r}: {c['entries']:,}" for r, c in reasons.items()))
    for label, key in (("all", ""), ("last 20%", "_last20")):
        w, c = s[f"latency_wall{key}_ms"], s[f"latency_cpu{key}_ms"]
        print(f"  latency ({label}): wall p50 {w['p50']:.3f} / p99 {w['p99']:.3f} / p99.9 {w['p99.9']:.3f} ms; "
              f"thread CPU p50 {c['p50']:.3f} / p99 {c['p99']:.3f} / p99.9 {c['p99.9']:.3f} ms")

    checks = {
        "rss growth over the last 20% < 2%": s["rss_growth_last20_pct"] < 2.0,
        "rss peak above the start within the budget": s["rss_peak_above_start_mib"] <= budget_mb,
        "rss peak under the budget": s["rss_peak_mib"] <= budget_mb,
        "accounted use within the budget": s["budget_used_peak_mib"] <= budget_mb,
        f"p99 wall <= {REQUEST_PATH_P99_MS} ms": s["latency_wall_ms"]["p99"] <= REQUEST_PATH_P99_MS,
        f"p99 thread CPU <= {REQUEST_PATH_P99_MS} ms": s["latency_cpu_ms"]["p99"] <= REQUEST_PATH_P99_MS,
    }
    if not args.no_hit_ratio:
        names = [n for n in args.workloads.split(",") if n]
        print("\nhit ratio, the suite's `ours online` (unlimited cache / 25% cache):", flush=True)
        pressured = hit_ratios(args, names, pilot, traffic, limit)
        del pilot
        gc.collect()
        alone = hit_ratios(args, names, None, None, limit)
        unbounded = hit_ratios(args, names, None, None, None)
        process_budget().configure(max_bytes=limit)
        result["hit_ratio"] = {"unbounded": unbounded, "default_budget_alone": alone,
                               "default_budget_full": pressured}
        for name in names:
            u = unbounded[name]
            for label, row in (("unbounded", u), ("budget, alone", alone[name]), ("budget, full", pressured[name])):
                print(f"  {name:<10} {label:<14} {row['unlimited']:.4f} / {row['cache_25pct']:.4f}"
                      f"   (budget used {row['budget_used_mib']:.0f} MiB, {row['tenants']} tenants, "
                      f"evicted during: {row['evicted_entries_during'] or 'none'})")
            for label, row in (("alone", alone[name]), ("full", pressured[name])):
                for col in ("unlimited", "cache_25pct"):
                    # relative: within 1% of the unbounded run's ratio (stricter than 1 point)
                    delta = abs(row[col] - u[col])
                    checks[f"{name} {col} hit ratio, budget {label}, within 1% of unbounded"] = (
                        delta <= 0.01 * u[col] + 1e-12)
    print()
    for what, ok in checks.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {what}")
    result["checks"] = checks
    result["max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=float))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
