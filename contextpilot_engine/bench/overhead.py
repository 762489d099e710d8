"""Planning overheads: ``optimize_batch`` time and memory, online ``optimize`` latency.

* **Batch**: for each size a *child process* builds a RAG batch (top-20,
  calibrated popularity), then times ``ContextPilot.optimize_batch`` once,
  and measures memory: the growth of the child's peak RSS over the timed
  call (``VmHWM`` reset just before it), and, in a second, separate call
  under ``tracemalloc``, the peak bytes allocated (numpy reports its
  buffers).  A fresh process per size keeps
  one size's garbage out of the next one's numbers.  The reference is timed
  on the same batches by its driver (:mod:`.reference`), inside its own
  process, imports excluded.
* **Online**: one ``ContextPilot`` with the default limits (an index of at
  most 2M cached tokens and 200k nodes, LRU) serves a stream of RAG
  requests one ``optimize`` call at a time.  "N requests indexed" means N
  requests have gone through ``optimize`` before the measured window; with
  the default capacity the index then holds only the most recent requests
  that fit (the node count is reported).  Latency p50/p99 is taken over
  the next ``window`` requests.  The stream is generated vectorised
  (:func:`rag_stream`) so a million requests cost seconds, not minutes.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
import tracemalloc
from typing import Callable, Iterator

import numpy as np

from .presets import RAG_CALIBRATION

__all__ = ["batch_overhead", "batch_overhead_in_child", "online_latency", "rag_stream", "RAG_OVERHEAD_PARAMS"]

#: the batch used for overheads: the calibrated top-20 RAG batch of the suite
RAG_OVERHEAD_PARAMS = dict(top_k=20, **RAG_CALIBRATION)


def _status_kb(field: str) -> int:
    """``VmRSS``/``VmHWM`` of this process from /proc (0 where unavailable).

    ``getrusage``'s ``ru_maxrss`` is not used: Linux carries it across
    ``exec``, so a child of a large process would report its parent's peak.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _reset_peak() -> bool:
    """Reset this process's VmHWM (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def batch_overhead(n: int, seed: int = 1, repeats: int = 5) -> dict:
    """Time and memory of ``optimize_batch`` on ``n`` contexts (run it in a fresh process).

    ``seconds`` is the median of ``repeats`` calls on fresh instances (the
    first one also gives the RSS peak), which tames a shared machine's noise.
    """
    from .. import ContextPilot
    from .workloads import rag_batch

    wl = rag_batch(n_queries=n, seed=seed, **RAG_OVERHEAD_PARAMS)
    contexts, queries, count = wl.contexts, wl.queries, wl.token_counter()
    gc.collect()
    rss_before = _status_kb("VmRSS")
    peak_known = _reset_peak()
    pilot = ContextPilot(tokenizer=count)
    start = time.perf_counter()
    pilot.optimize_batch(contexts, queries)
    seconds = time.perf_counter() - start
    peak_rss = _status_kb("VmHWM") if peak_known else 0
    del pilot
    times = [seconds]
    for _ in range(repeats - 1):
        gc.collect()
        pilot = ContextPilot(tokenizer=count)
        start = time.perf_counter()
        pilot.optimize_batch(contexts, queries)
        times.append(time.perf_counter() - start)
        del pilot
    times.sort()
    seconds = times[len(times) // 2]
    gc.collect()
    tracemalloc.start()
    ContextPilot(tokenizer=count).optimize_batch(contexts, queries)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "contexts": n,
        "blocks": sum(len(c) for c in contexts),
        "seconds": seconds,
        "all_seconds": times,
        "peak_traced_mb": peak / 2**20,
        "peak_rss_growth_mb": max(0, peak_rss - rss_before) / 1024 if peak_known else None,
    }


def batch_overhead_in_child(n: int, seed: int = 1, timeout: float = 3600.0) -> dict:
    """:func:`batch_overhead` in a fresh interpreter."""
    proc = subprocess.run(
        [sys.executable, "-m", "contextpilot_engine.bench.overhead", "batch", str(n), str(seed)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, PYTHONHASHSEED="0"),
    )
    if proc.returncode != 0:
        raise RuntimeError(f"overhead child for n={n} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def rag_stream(
    n: int,
    top_k: int = 20,
    n_chunks: int = 50_000,
    chunks_per_topic: int = 20,
    zipf_alpha: float = 1.25,
    topic_share: float = 0.3,
    min_tokens: int = 200,
    max_tokens: int = 1300,
    seed: int = 0,
    batch: int = 10_000,
) -> tuple[Iterator[list[str]], Callable[[str], int]]:
    """A long stream of RAG contexts (Zipf popularity, topic pools), generated in vectorised batches.

    Topic ``t`` owns chunks ``[t * chunks_per_topic, (t + 1) * chunks_per_topic)``;
    global popularity is Zipf over a random permutation of the chunks.
    Returns the stream and a token counter for its chunk texts.
    """
    rng = np.random.default_rng(seed)
    n_topics = n_chunks // chunks_per_topic
    ranks = np.arange(1, n_chunks + 1, dtype=np.float64) ** (-zipf_alpha)
    global_cdf = np.cumsum(ranks[rng.permutation(n_chunks)])
    global_cdf /= global_cdf[-1]
    local = np.arange(1, chunks_per_topic + 1, dtype=np.float64) ** (-zipf_alpha)
    local_cdf = np.cumsum(local) / local.sum()
    lengths = rng.integers(min_tokens, max_tokens + 1, size=n_chunks)
    texts = [f"stream chunk {c}" for c in range(n_chunks)]
    table = dict(zip(texts, lengths.tolist()))
    n_local = int(round(top_k * topic_share))

    def count(text: str) -> int:
        got = table.get(text)
        return got if got is not None else max(1, (len(text) + 3) // 4)

    def gen() -> Iterator[list[str]]:
        done = 0
        while done < n:
            m = min(batch, n - done)
            topic = rng.integers(0, n_topics, size=m)
            loc = topic[:, None] * chunks_per_topic + np.searchsorted(local_cdf, rng.random((m, 2 * n_local + 1)))
            glob = np.searchsorted(global_cdf, rng.random((m, 3 * top_k)))
            glob = np.minimum(glob, n_chunks - 1)
            for r in range(m):
                picked: list[int] = []
                seen = set()
                for c in loc[r].tolist():
                    if len(picked) >= n_local:
                        break
                    if c not in seen:
                        seen.add(c)
                        picked.append(c)
                for c in glob[r].tolist():
                    if len(picked) >= top_k:
                        break
                    if c not in seen:
                        seen.add(c)
                        picked.append(c)
                rng.shuffle(picked)
                yield [texts[c] for c in picked]
            done += m

    return gen(), count


def online_latency(checkpoints: list[int], window: int = 2000, seed: int = 1, capacity_tokens: int | None = None,
                   progress: Callable[[int], None] | None = None) -> list[dict]:
    """p50/p99 of ``optimize`` over ``window`` requests after each checkpoint's number of requests."""
    from .. import ContextPilot

    checkpoints = sorted(set(checkpoints))
    total = checkpoints[-1] + window
    stream, count = rag_stream(total, seed=seed)
    kwargs = {} if capacity_tokens is None else {"capacity_tokens": capacity_tokens}
    pilot = ContextPilot(tokenizer=count, **kwargs)
    latency = np.empty(total)
    nodes: dict[int, int] = {}
    starts = set(checkpoints)
    for i, ctx in enumerate(stream):
        if i in starts:
            nodes[i] = int(pilot.stats()["nodes"])
        start = time.perf_counter()
        pilot.optimize(ctx, f"question {i}")
        latency[i] = time.perf_counter() - start
        if progress and (i + 1) % 10_000 == 0:
            progress(i + 1)
    out = []
    for c in checkpoints:
        lat = latency[c : c + window]
        out.append(
            {
                "indexed": c,
                "window": window,
                "p50_ms": float(np.percentile(lat, 50) * 1e3),
                "p99_ms": float(np.percentile(lat, 99) * 1e3),
                "index_nodes": nodes[c],
                "capacity_tokens": "default (2M tokens)" if capacity_tokens is None else (
                    "unbounded (200k nodes)" if capacity_tokens >= 10**12 else capacity_tokens
                ),
            }
        )
    return out


def _main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "batch":
        print(json.dumps(batch_overhead(int(argv[1]), int(argv[2]))))
        return 0
    print("usage: python -m contextpilot_engine.bench.overhead batch N SEED", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
