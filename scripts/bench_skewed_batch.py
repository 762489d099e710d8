#!/usr/bin/env python
"""``optimize_batch`` on a batch of short contexts with and without one very long context.

The planner's arrays are as wide as a batch's longest context; this measures
what one long context (``--long`` blocks, within the default per-context
limit) costs a batch of ``--contexts`` short ones (three blocks each, drawn
from a shared pool), side by side in one run: time and peak traced memory
of the skewed batch over the same batch without it.  Run (the pinned
environment)::

    PY=$(bash scripts/setup_env.sh | tail -n1)
    $PY scripts/bench_skewed_batch.py --contexts 5000 --long 4096
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

from contextpilot_engine import ContextPilot


def batches(n: int, long_blocks: int) -> tuple[list[list[str]], list[list[str]]]:
    pool = [f"shared passage {i} " + "text " * 20 for i in range(max(8, n // 4))]
    short = [[pool[(c * 7 + j * 13) % len(pool)] for j in range(3)] for c in range(n)]
    long_one = [f"long document section {j} " + "words " * 20 for j in range(long_blocks - 3)] + pool[:3]
    return short, short[:-1] + [long_one]


def measure(contexts: list[list[str]]) -> tuple[float, int]:
    pilot = ContextPilot()
    tracemalloc.start()
    start = time.perf_counter()
    pilot.optimize_batch(contexts, [f"q{i}" for i in range(len(contexts))])
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return seconds, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", type=int, default=5000)
    ap.add_argument("--long", type=int, default=4096, help="blocks of the one long context")
    args = ap.parse_args()
    flat, skewed = batches(args.contexts, args.long)
    (t_flat, m_flat), (t_skew, m_skew) = measure(flat), measure(skewed)
    print(f"{args.contexts:,} contexts of 3 blocks: {t_flat:.2f} s, peak {m_flat / 2**20:.0f} MiB")
    print(f"the same with one of {args.long:,} blocks: {t_skew:.2f} s, peak {m_skew / 2**20:.0f} MiB")
    print(f"skewed over flat: time {t_skew / t_flat:.1f}x, peak memory {m_skew / m_flat:.1f}x")


if __name__ == "__main__":
    main()
