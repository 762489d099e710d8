#!/usr/bin/env python
"""A real-corpus trace through vLLM's OpenAI server: the engine side of issue 11's acceptance.

The simulator scores block orders; this script checks what the engine itself
caches when a real retrieval trace (:mod:`contextpilot_engine.bench.real_traces`:
PostgreSQL manual chunks, real retrievers, the first ``--requests`` requests)
is served by ``python -m vllm.entrypoints.openai.api_server`` on the local
model, block size 32, and a KV cache small enough to evict
(``--num-gpu-blocks-override``, default a quarter of the trace's distinct
pages).  Chunk texts are real, so prompts are sent as they are.

Runs (the plain server is reused, its prefix cache reset before each run;
each plugin run gets a fresh server, so no run inherits another's index):

* ``retrieval order``: the blocks as retrieved, plain vLLM, one at a time
  (what vLLM's own prefix caching gets);
* ``reference online``: ContextPilot 0.5.0's per-request reorder (its online
  mode, through ``bench/reference.py``) in front of plain vLLM, one at a time;
* ``plugin``: the same requests as a client unaware of contextpilot sends
  them (documents as ``<document>`` elements of the system message, or
  ``--delivery contexts`` for the ``contextpilot.contexts`` field), to a
  server started with ``--enable-contextpilot``, one at a time;
* ``optimize_batch burst``: ``optimize_batch``'s prompts, in its schedule
  order, sent to plain vLLM as one concurrent burst (``asyncio.gather`` over
  ``openai.AsyncOpenAI``, as the reference README's offline example does);
* ``plugin burst``: the trace in arrival order to the plugin as one burst.

The library runs render blocks in the prompt layout the plugin serves
(:mod:`contextpilot_engine.prompts`), so only block order differs.  Reported
per run: the cached share (sum of ``usage.prompt_tokens_details.cached_tokens``
over sum of ``usage.prompt_tokens``), computed tokens and wall time; then
the two acceptance ratios (plugin / reference online >= 1.3x one at a time;
plugin burst / optimize_batch burst >= 0.9x).

    PY=$(bash scripts/setup_env.sh | tail -n 1)
    $PY scripts/bench_real_engine.py [--trace real-open-hybrid-k10] [--requests 300] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

#: engine block size (vLLM CPU needs a multiple of 32)
BLOCK = 32
#: the runs, in the order they are made
RUNS = ("retrieval order", "reference online", "plugin", "optimize_batch burst", "plugin burst")
#: issue 11's engine targets: (numerator run, denominator run, ratio)
TARGETS = (("plugin", "reference online", 1.3), ("plugin burst", "optimize_batch burst", 0.9))


@dataclass
class Request:
    """One chat request as sent: its messages and any extra body fields."""

    messages: list[dict]
    extra_body: dict = field(default_factory=dict)


@dataclass
class Run:
    """What the engine reported for one run."""

    name: str
    mode: str  # "one at a time" or "burst"
    prompt_tokens: int = 0
    cached_tokens: int = 0
    wall_seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    applied: int = 0  # responses whose contextpilot field says the plugin rewrote the request
    #: per response, how many other requests the plugin planned it with (its report's ``planned_with``)
    planned_with: list[int] = field(default_factory=list)
    note: str = ""

    @property
    def cached_share(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def computed_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens

    def add(self, reply: Any, seconds: float) -> None:
        usage = reply.usage
        details = usage.prompt_tokens_details
        self.prompt_tokens += int(usage.prompt_tokens)
        self.cached_tokens += int(details.cached_tokens or 0) if details is not None else 0
        self.latencies.append(seconds)
        report = (reply.model_extra or {}).get("contextpilot")
        self.applied += bool(report and report.get("applied"))
        if report and report.get("applied"):
            self.planned_with.append(int(report.get("planned_with", 0)))

    @property
    def groups(self) -> dict:
        """How the plugin grouped the requests: requests planned jointly, groups and the largest."""
        joint = [n for n in self.planned_with if n]
        return {"planned_jointly": len(joint), "groups": round(sum(1 / (n + 1) for n in joint)),
                "largest_group": max(joint, default=-1) + 1}

    def summary(self) -> dict:
        lat = sorted(self.latencies)
        out = {k: v for k, v in asdict(self).items() if k not in ("latencies", "planned_with")}
        if self.planned_with:
            out.update(self.groups)
        out.update(cached_share=self.cached_share, computed_tokens=self.computed_tokens, requests=len(lat),
                   latency_p50_s=lat[len(lat) // 2] if lat else None,
                   latency_p99_s=lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None)
        return out


# ---------------------------------------------------------------------------
# The trace and each run's requests


def load_trace(name: str, n: int, smoke: bool, seed: int):
    """The first ``n`` requests of the real-corpus workload ``name``."""
    from contextpilot_engine.bench.real_traces import real_workloads

    wls = {wl.name: wl for wl in real_workloads(smoke, seed)}
    if name not in wls:
        raise SystemExit(f"unknown trace {name!r}; choose from {sorted(wls)}")
    wl = wls[name]
    wl.requests = wl.requests[:n]
    return wl


def layout_requests(wl, orders: Sequence[Sequence[int]]) -> list[Request]:
    """Each request's blocks in ``orders[i]`` (input positions), in the shared prompt layout."""
    from contextpilot_engine.bench.methods import _Renderer

    renderer = _Renderer(wl.token_counter())
    return [Request(renderer.render(r.contexts, order, r.query)) for r, order in zip(wl.requests, orders)]


def reference_online_orders(wl) -> tuple[list[list[int]], str]:
    """The reference's per-request reorder of every request, in arrival order, as input positions."""
    from contextpilot_engine.bench.methods import block_ids, match_positions
    from contextpilot_engine.bench.reference import ReferenceRunner

    ids, id_text = block_ids(wl)
    res = ReferenceRunner.locate().online(ids)
    orders, note = [], ""
    for i, r in enumerate(wl.requests):
        if i < len(res["reordered"]):
            pos, left, _ = match_positions(r.contexts, [id_text[x] for x in res["reordered"][i]])
            orders.append(pos + left)  # a block the reference dropped is still sent, last
        else:
            orders.append(list(range(len(r.contexts))))
    if res.get("crashed_after") is not None:
        note = f"the reference crashed after {res['crashed_after']} requests; the rest sent in retrieval order"
    return orders, note


def batch_requests(wl) -> list[Request]:
    """``optimize_batch``'s prompts in its schedule order (the order a client sends them in)."""
    from contextpilot_engine import ContextPilot

    messages, _ = ContextPilot(tokenizer=wl.token_counter()).optimize_batch(wl.contexts, wl.queries)
    return [Request(m) for m in messages]


def plugin_requests(wl, delivery: str) -> list[Request]:
    """The trace as a client unaware of contextpilot sends it: blocks in retrieval order."""
    from contextpilot_engine.demo import document_messages

    if delivery == "documents":
        return [Request(document_messages(r.contexts, r.query)) for r in wl.requests]
    return [Request([{"role": "user", "content": r.query}], {"contextpilot": {"contexts": list(r.contexts)}})
            for r in wl.requests]


# ---------------------------------------------------------------------------
# Serving


def start_server(model: str, kv_blocks: int, max_len: int, plugin: bool, plugin_flags: Sequence[str] = ()):
    """A vLLM OpenAI server (multiprocess, as deployed) with ``kv_blocks`` usable KV blocks."""
    from contextpilot_engine.bench.engine import engine_env
    from contextpilot_engine.vllm_plugin.testing import OpenAIServer

    env = engine_env({"VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_SERVER_DEV_MODE": "1"}, apply=False)
    flags = ["--max-model-len", str(max_len), "--hf-overrides", json.dumps({"max_position_embeddings": max_len}),
             "--num-gpu-blocks-override", str(kv_blocks + 1)]  # vLLM keeps one block back (the null block)
    if plugin:
        flags += ["--enable-contextpilot", *plugin_flags]
    server = OpenAIServer(model, flags, env=env, startup_timeout=600)
    server.__enter__()
    try:  # the first chat request starts the API server's subscription to the engine core
        server.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=1)
        reset_cache(server)
    except BaseException:
        server.__exit__(None, None, None)
        raise
    return server


def reset_cache(server) -> None:
    req = urllib.request.Request(server.url + "/reset_prefix_cache", method="POST")
    with urllib.request.urlopen(req, timeout=60):
        pass


def run_one_at_a_time(server, name: str, requests: Sequence[Request]) -> Run:
    client = server.client()
    run = Run(name, "one at a time")
    start = time.perf_counter()
    for req in requests:
        t0 = time.perf_counter()
        reply = client.chat.completions.create(model="tiny", messages=req.messages, max_tokens=1, temperature=0.0,
                                               extra_body=req.extra_body or None)
        run.add(reply, time.perf_counter() - t0)
    run.wall_seconds = time.perf_counter() - start
    return run


def run_burst(server, name: str, requests: Sequence[Request]) -> Run:
    """Every request at once; they are created in order, so they reach the server in that order."""
    import openai

    run = Run(name, "burst")

    async def fire() -> None:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=3600)

        async def one(req: Request):
            t0 = time.perf_counter()
            reply = await client.chat.completions.create(model="tiny", messages=req.messages, max_tokens=1,
                                                         temperature=0.0, extra_body=req.extra_body or None)
            return reply, time.perf_counter() - t0

        try:
            for reply, seconds in await asyncio.gather(*(one(r) for r in requests)):
                run.add(reply, seconds)
        finally:
            await client.close()

    start = time.perf_counter()
    asyncio.run(fire())
    run.wall_seconds = time.perf_counter() - start
    return run


# ---------------------------------------------------------------------------


def prompt_lengths(model: str, requests: Sequence[Request]) -> list[list[int]]:
    """Token ids of each request as the plain engine renders it (for sizing the cache and the model length)."""
    from transformers import AutoTokenizer

    from contextpilot_engine.bench.engine_replay import chat_token_ids

    tok = AutoTokenizer.from_pretrained(model)
    return [chat_token_ids(tok, r.messages) for r in requests]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trace", default="real-open-hybrid-k10", help="real-corpus workload (default: %(default)s)")
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--smoke", action="store_true", help="the smoke-size traces (a quick check of the script)")
    p.add_argument("--seed", type=int, default=1, help="trace seed (the suite's default, 1)")
    p.add_argument("--model", choices=("tiny", "small"), default="tiny")
    p.add_argument("--kv-blocks", type=int, default=None,
                   help="usable KV blocks (default: --kv-share of the retrieval-order prompts' distinct pages)")
    p.add_argument("--kv-share", type=float, default=0.25)
    p.add_argument("--delivery", choices=("documents", "contexts"), default="documents",
                   help="how the plugin runs carry the blocks: <document> elements or contextpilot.contexts")
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma list from: {', '.join(RUNS)}")
    p.add_argument("--plugin-flags", default="", help="more flags for the plugin's server, e.g. "
                   "'--contextpilot-arrival-max-wait-ms 200' (default: none, the plugin's defaults)")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = [r for r in runs if r not in RUNS]
    if unknown:
        p.error(f"unknown run(s) {unknown}")

    from contextpilot_engine.bench.engine import engine_env
    from contextpilot_engine.bench.engine_replay import unique_pages
    from contextpilot_engine.bench.tiny_model import cached_tiny_model

    engine_env()
    model = str(cached_tiny_model(args.model))
    wl = load_trace(args.trace, args.requests, args.smoke, args.seed)
    base = layout_requests(wl, [list(range(len(r.contexts))) for r in wl.requests])
    ids = prompt_lengths(model, base)
    longest = max(len(x) for x in ids)
    max_len = (longest // BLOCK + 8) * BLOCK  # room for the ranking note and the plugin's own layout
    distinct = unique_pages(ids, BLOCK)
    kv_blocks = args.kv_blocks or max(int(args.kv_share * distinct), max_len // BLOCK + 2)
    print(f"{args.trace}: {len(wl.requests)} requests, top-{len(wl.requests[0].contexts)}, prompts of "
          f"{sum(map(len, ids)) // len(ids):,} tokens on average ({longest:,} max, model `{args.model}`); "
          f"{distinct:,} distinct pages of {BLOCK} tokens; KV cache {kv_blocks:,} blocks "
          f"({kv_blocks / distinct:.0%} of them); plugin input: {args.delivery}", flush=True)

    made: dict[str, list[Request]] = {}
    notes: dict[str, str] = {}
    if "retrieval order" in runs:
        made["retrieval order"] = base
    if "reference online" in runs:
        t0 = time.perf_counter()
        orders, notes["reference online"] = reference_online_orders(wl)
        made["reference online"] = layout_requests(wl, orders)
        print(f"reference online orders: {time.perf_counter() - t0:.1f} s", flush=True)
    if "optimize_batch burst" in runs:
        made["optimize_batch burst"] = batch_requests(wl)
    for name in ("plugin", "plugin burst"):
        if name in runs:
            made[name] = plugin_requests(wl, args.delivery)

    results: dict[str, Run] = {}
    plain_runs = [r for r in ("retrieval order", "reference online", "optimize_batch burst") if r in runs]
    if plain_runs:
        server = start_server(model, kv_blocks, max_len, plugin=False)
        try:
            for name in plain_runs:
                reset_cache(server)
                fn = run_burst if name.endswith("burst") else run_one_at_a_time
                results[name] = fn(server, name, made[name])
                results[name].note = notes.get(name, "")
                print(f"  {name}: {results[name].cached_share:.1%} cached, {results[name].wall_seconds:.1f} s",
                      flush=True)
        finally:
            server.__exit__(None, None, None)
    for name in ("plugin", "plugin burst"):
        if name not in runs:
            continue
        server = start_server(model, kv_blocks, max_len, plugin=True, plugin_flags=shlex.split(args.plugin_flags))
        try:
            fn = run_burst if name.endswith("burst") else run_one_at_a_time
            results[name] = fn(server, name, made[name])
            grouped = results[name].groups if results[name].planned_with else None
            print(f"  {name}: {results[name].cached_share:.1%} cached, {results[name].wall_seconds:.1f} s"
                  + (f"; {grouped['planned_jointly']} requests planned jointly in {grouped['groups']} groups "
                     f"(largest {grouped['largest_group']})" if grouped else ""), flush=True)
        finally:
            server.__exit__(None, None, None)

    print()
    print(f"{'run':22s} {'mode':14s} {'cached / prompt tokens':>25s} {'share':>7s} {'computed':>11s} "
          f"{'wall (s)':>9s} {'applied':>8s}")
    for name in RUNS:
        r = results.get(name)
        if r is None:
            continue
        applied = f"{r.applied}/{len(r.latencies)}" if name.startswith("plugin") else "-"
        print(f"{name:22s} {r.mode:14s} {r.cached_tokens:>12,d} / {r.prompt_tokens:>10,d} {r.cached_share:7.1%} "
              f"{r.computed_tokens:>11,d} {r.wall_seconds:9.1f} {applied:>8s}" + (f"  ({r.note})" if r.note else ""))
    checks = []
    for a, b, target in TARGETS:
        if a in results and b in results and results[b].cached_share:
            ratio = results[a].cached_share / results[b].cached_share
            checks.append({"target": f"{a} >= {target}x {b} (cached share)", "ratio": ratio, "pass": ratio >= target})
            print(f"{a} / {b}: {ratio:.2f}x (target {target}x): {'PASS' if ratio >= target else 'FAIL'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "trace": {"name": args.trace, "requests": len(wl.requests),
                                                     "manifest": wl.params.get("manifest")},
                       "kv_blocks": kv_blocks, "distinct_pages": distinct, "max_model_len": max_len,
                       "runs": {k: v.summary() for k, v in results.items()}, "targets": checks}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
