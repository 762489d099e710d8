#!/usr/bin/env python
"""How long the arrival window holds requests under steady traffic on a busy engine.

The window plans requests that arrive together jointly, and while the engine
is busy it lets a burst pause longer before closing its group.  Steady
traffic is not a burst: this drives the real :class:`ArrivalWindow` and the
integration layer's request path (an :class:`EngineState` with its pilot;
only the engine is absent) on an asyncio loop with Poisson arrivals at each
``--rates`` value, every request kept "being served" for ``--service-ms`` so
the engine is always busy, and reports the time from a request's arrival to
its release (planned and admitted), mean / median / p99, and how many
requests were planned in groups.

Run (the pinned environment; about half a minute)::

    PY=$(bash scripts/setup_env.sh | tail -n1)
    $PY scripts/bench_arrivals.py [--rates 10,30,60,120] [--requests 300] [--service-ms 500]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time

from contextpilot_engine.integration import arrivals
from contextpilot_engine.integration.options import PluginOptions
from contextpilot_engine.integration.state import EngineState

DOCS = [f"Document {i}. " + ("lorem ipsum dolor sit amet " * (20 + i % 17)) for i in range(40)]


def conversation(ids: list[int], query: str) -> list[dict]:
    system = "You answer.\n" + "".join(f"<document>{DOCS[i]}</document>" for i in ids)
    return [{"role": "system", "content": system}, {"role": "user", "content": query}]


async def steady(rate: float, requests: int, service_s: float, seed: int) -> dict:
    state = EngineState(f"bench-arrivals-{rate}", PluginOptions(channel="off"), None)
    window = arrivals.window_for(state)
    rng = random.Random(seed)
    holds: list[float] = []

    async def one(n: int) -> None:
        start = time.monotonic()
        ticket = await window.arrive(state, [conversation(rng.sample(range(len(DOCS)), 8), f"q{n}")], None, None, [])
        await ticket.finish()
        holds.append(time.monotonic() - start)
        await asyncio.sleep(service_s)  # the engine works on it
        ticket.completed()

    tasks = []
    for n in range(requests):
        tasks.append(asyncio.ensure_future(one(n)))
        await asyncio.sleep(rng.expovariate(rate))
    await asyncio.gather(*tasks)
    holds.sort()
    return {
        "mean_ms": 1000 * sum(holds) / len(holds),
        "median_ms": 1000 * holds[len(holds) // 2],
        "p99_ms": 1000 * holds[min(len(holds) - 1, int(len(holds) * 0.99))],
        "grouped": window.grouped_requests,
        "groups": window.groups,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rates", default="10,30,60,120", help="arrival rates, requests per second")
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--service-ms", type=float, default=500.0, help="how long each request keeps the engine busy")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    print(f"{'req/s':>6} {'mean ms':>8} {'median ms':>10} {'p99 ms':>8} {'grouped':>8} {'groups':>7}")
    for rate in (float(r) for r in args.rates.split(",")):
        r = asyncio.run(steady(rate, args.requests, args.service_ms / 1000.0, args.seed))
        print(f"{rate:6g} {r['mean_ms']:8.1f} {r['median_ms']:10.1f} {r['p99_ms']:8.1f} {r['grouped']:8d} {r['groups']:7d}")


if __name__ == "__main__":
    main()
