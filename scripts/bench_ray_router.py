"""Routing across engine replicas on Ray Serve: round robin, Ray's PrefixCacheAffinityRouter, the Rust
cache_aware router (vllm-router), and contextpilot's router, on the same RAG trace, the same replicas, one run.

Run with the Ray environment's python:

    RAY_PY=$(bash scripts/setup_ray.sh | tail -n 1)
    $RAY_PY scripts/bench_ray_router.py [--requests 240] [--concurrency 2] [--kv-blocks 128]

Two vLLM CPU servers (the tiny local model, KV events on, ``--kv-blocks`` blocks of 32 tokens each, so
the trace's corpus does not fit in one of them) are started once, outside Ray, and every router is
deployed in front of those same two servers in turn (``engine={"servers": [...]}``), each after both
prefix caches were reset.  Then the two servers are stopped and one server with the *same total
cache* (twice the blocks) serves the trace behind contextpilot's router: the ceiling that splitting
the cache over replicas should approach.

Per router: aggregate cached share (cached / prompt tokens, from the engine's own usage counts),
computed (prefilled) tokens, requests per replica (max/min, from each engine's
``vllm:request_success_total``), and client-side latency p50/p99.  Round robin and Ray's router send
requests through Ray to a replica that forwards them unchanged; ours picks a replica with Ray Serve's
``choose_replica`` and the ingress sends the rewritten request to that engine directly; vllm-router
is its own HTTP server in front of the two engines.  Writes ``results/ray_router.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ENGINE_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
    "VLLM_LOGGING_LEVEL": "WARNING", "VLLM_SERVER_DEV_MODE": "1", "VLLM_NO_USAGE_STATS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def engine_args(blocks: int, max_len: int) -> list[str]:
    return ["--served-model-name", "tiny", "--dtype", "bfloat16", "--max-model-len", str(max_len), "--enforce-eager",
            "--enable-prefix-caching", "--enable-prompt-tokens-details", "--block-size", "32", "--seed", "0",
            "--num-gpu-blocks-override", str(blocks + 1)]


def post(url: str, timeout: float = 30.0) -> int:
    req = urllib.request.Request(url, data=b"", method="POST")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status


def requests_served(url: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(float(m.group(1)) for m in re.finditer(r"^vllm:request_success_total\{[^}]*\} (\S+)$", text, re.M))


def warm_up(base_url: str) -> None:
    """Two requests without documents, not counted, so that every router has opened its connections (ours:
    each replica's mirror and tokenizer) before the trace runs."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)
    for _ in range(2):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "warm up"}], max_tokens=1)


def run_trace(base_url: str, trace: list, concurrency: int) -> list[dict]:
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)

    def one(messages):
        t = time.perf_counter()
        r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=1, temperature=0.0)
        details = r.usage.prompt_tokens_details
        return {"latency_s": time.perf_counter() - t, "prompt": r.usage.prompt_tokens,
                "cached": (details.cached_tokens if details else 0) or 0}

    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, trace))


def summarise(name: str, rows: list[dict], per_replica: list[float], note: str = "") -> dict:
    prompt = sum(r["prompt"] for r in rows)
    cached = sum(r["cached"] for r in rows)
    lat = sorted(r["latency_s"] for r in rows)
    pct = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))]  # noqa: E731
    counts = [int(round(c)) for c in per_replica]
    return {"router": name, "requests": len(rows), "prompt_tokens": prompt, "cached_tokens": cached,
            "cached_share": cached / prompt if prompt else 0.0, "computed_tokens": prompt - cached,
            "per_replica": counts, "max_min": (max(counts) / min(counts)) if counts and min(counts) else None,
            "p50_ms": pct(0.5) * 1e3, "p99_ms": pct(0.99) * 1e3, "note": note}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=240)
    ap.add_argument("--top-k", type=int, default=6)
    ap.add_argument("--chunks", type=int, default=48)
    ap.add_argument("--doc-tokens", type=int, default=150)
    ap.add_argument("--kv-blocks", type=int, default=128, help="KV blocks (32 tokens) per replica")
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--port", type=int, default=0, help="Serve HTTP port (0: a free one)")
    ap.add_argument("--out", default=str(ROOT / "results"))
    ap.add_argument("--policy", action="append", default=None, metavar="JSON",
                    help="RoutingPolicy options of a contextpilot row, as JSON (repeat for one row each; "
                         "default: one row with the default policy)")
    ap.add_argument("--skip", default="", help="comma-separated rows to skip: rr,pca,vllm_router,ours,single")
    args = ap.parse_args()
    import logging

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    skip = set(filter(None, args.skip.split(",")))
    policies = [json.loads(p) for p in args.policy] if args.policy else [{}]

    from contextpilot_engine.bench.tiny_model import cached_tiny_model
    from contextpilot_engine.demo import rag_conversations
    from contextpilot_engine.routing.engine_server import EngineServer, free_port

    model = str(cached_tiny_model("tiny"))
    trace = rag_conversations(args.requests, args.top_k, args.chunks, args.doc_tokens, seed=args.seed)
    max_len = min(4096, args.kv_blocks * 32)
    results: list[dict] = []
    started = time.time()

    import ray
    from ray import serve

    from contextpilot_engine.routing.baselines import PREFIX_CACHE_AFFINITY_ROUTER, RoundRobinRouter
    from contextpilot_engine.routing.deployment import build_app

    port = args.port or free_port()
    import tempfile

    ray_tmp = tempfile.mkdtemp(prefix="cp-ray-")
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=200 * 1024 * 1024, log_to_driver=False,
             logging_level="WARNING", _temp_dir=ray_tmp)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}/v1"

    def through_serve(name: str, servers: list, router, note: str, router_kwargs: dict | None = None) -> None:
        app = build_app({"servers": [dataclasses.asdict(s.endpoints()) for s in servers]}, router=router,
                        router_kwargs=router_kwargs, health_check_period_s=5.0)
        serve.run(app, name="bench", route_prefix="/")
        warm_up(base)
        for s in servers:
            post(s.url + "/reset_prefix_cache")
        before = [requests_served(s.url) for s in servers]
        rows = run_trace(base, trace, args.concurrency)
        after = [requests_served(s.url) for s in servers]
        serve.delete("bench")
        row = summarise(name, rows, [a - b for a, b in zip(after, before)], note)
        results.append(row)
        print(json.dumps(row), flush=True)

    servers = [EngineServer(model, engine_args(args.kv_blocks, max_len), env=ENGINE_ENV) for _ in range(2)]
    try:
        for s in servers:  # one after the other: two starts at once on 2 cores take longer than in turn
            s.start()
        if "rr" not in skip:
            through_serve("round robin", servers, RoundRobinRouter, "Ray Serve, custom RequestRouter")
        if "pca" not in skip:
            through_serve("Ray PrefixCacheAffinityRouter", servers, PREFIX_CACHE_AFFINITY_ROUTER,
                          "ray 2.60 defaults (imbalanced_threshold=inf, match_rate_threshold=0.1)")
        if "vllm_router" not in skip:
            results.append(vllm_router_row(servers, trace, args.concurrency))
            print(json.dumps(results[-1]), flush=True)
        if "ours" not in skip:
            for policy in policies:
                through_serve("contextpilot router", servers, "contextpilot_engine.routing.router:ContextPilotRouter",
                              f"RoutingPolicy {json.dumps(policy)}" if policy else "default RoutingPolicy", policy)
    finally:
        for s in servers:
            s.stop()
    if "single" not in skip:
        single = EngineServer(model, engine_args(2 * args.kv_blocks, max_len), env=ENGINE_ENV)
        try:
            single.start()
            through_serve("contextpilot, one replica with the same total cache", [single],
                          "contextpilot_engine.routing.router:ContextPilotRouter", f"{2 * args.kv_blocks} blocks",
                          policies[0])
        finally:
            single.stop()
    serve.shutdown()
    ray.shutdown()
    shutil.rmtree(ray_tmp, ignore_errors=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"args": vars(args), "wall_s": time.time() - started, "machine": f"{os.cpu_count()} cores"}
    (out / "ray_router.json").write_text(json.dumps({"meta": meta, "rows": results}, indent=2))
    (out / "ray_router.md").write_text(markdown(results, args))
    print(markdown(results, args))
    return 0


def vllm_router_row(servers: list, trace: list, concurrency: int) -> dict:
    """The Rust cache_aware router of vllm-router (PyPI), in front of the same two engines."""
    exe = shutil.which("vllm-router") or str(Path(sys.executable).parent / "vllm-router")
    if not os.path.exists(exe):
        return {"router": "vllm-router cache_aware", "note": "not installed (requirements/ray.lock pins it)"}
    from contextpilot_engine.routing.engine_server import free_port

    port = free_port()
    log = open(os.path.join(servers[0].tmpdir, "vllm-router.log"), "w")
    proc = subprocess.Popen([exe, "--host", "127.0.0.1", "--port", str(port), "--policy", "cache_aware",
                             "--worker-urls", *[s.url for s in servers], "--log-level", "warning"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                log.flush()
                return {"router": "vllm-router cache_aware",
                        "note": f"does not run here: exited with {proc.returncode}: "
                                f"{Path(log.name).read_text()[-300:]}"}
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                if time.time() > deadline:
                    return {"router": "vllm-router cache_aware", "note": "did not become healthy in 120 s"}
                time.sleep(0.5)
        warm_up(f"http://127.0.0.1:{port}/v1")
        for s in servers:
            post(s.url + "/reset_prefix_cache")
        before = [requests_served(s.url) for s in servers]
        rows = run_trace(f"http://127.0.0.1:{port}/v1", trace, concurrency)
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    after = [requests_served(s.url) for s in servers]
    return summarise("vllm-router cache_aware", rows, [a - b for a, b in zip(after, before)],
                     "vllm-router 0.1.17 defaults, its own HTTP server (not Ray)")


def markdown(rows: list[dict], args) -> str:
    lines = [
        f"RAG trace: {args.requests} requests, top-{args.top_k} of {args.chunks} chunks of about {args.doc_tokens} "
        f"tokens, {args.concurrency} concurrent clients; 2 vLLM CPU replicas of {args.kv_blocks} KV blocks "
        "(32 tokens) each.",
        "",
        "| router | cached share | computed tokens | requests per replica (max/min) | p50 ms | p99 ms | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "cached_share" not in r:
            lines.append(f"| {r['router']} | {r.get('note', '')} | | | | | |")
            continue
        mm = f"{'/'.join(map(str, r['per_replica']))}" + (f" ({r['max_min']:.2f})" if r["max_min"] else "")
        lines.append(f"| {r['router']} | {r['cached_share']:.1%} | {r['computed_tokens']:,} | {mm} | "
                     f"{r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r.get('note', '')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
