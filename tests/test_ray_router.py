"""The Ray Serve application on one machine: two vLLM CPU replicas behind contextpilot's router.

Local Ray (``ray.init()``), the application of ``docs/ray.md`` built by
:func:`contextpilot_engine.routing.build_app` with two managed replicas,
each a vLLM OpenAI server on 127.0.0.1 with KV events on and a small KV
cache (so pages are evicted during the trace), driven through Serve's HTTP
endpoint by the official ``openai`` client with a RAG trace of the
benchmark generators (documents as ``<document>`` elements, in retrieval
order, as a client unaware of contextpilot sends them).

Checked against the mirrors: every decision replays under the documented
rule from what the router saw; the replica chosen was planned against the
same mirror (its rewrite expects what the router scored) and the engine's
own ``cached_tokens`` match the mirror's expectation; pages were evicted
and the mirrors followed; both replicas served requests within the
imbalance bound.  Then conversations stick to their replica, and last a
replica's engine is killed while a request is in flight on it: the request
is retried once on the other replica, Ray Serve replaces the replica, the
dead replica's mirror leaves the router, and the new one serves requests.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import threading
import time
import urllib.request

import pytest

pytestmark = pytest.mark.engine

KV_BLOCKS = 160  # 5,120 tokens per replica: the trace's corpus is several times that
ENGINE_ARGS = ["--served-model-name", "tiny", "--dtype", "bfloat16", "--max-model-len", "4096", "--enforce-eager",
               "--enable-prefix-caching", "--enable-prompt-tokens-details", "--block-size", "32", "--seed", "0",
               "--num-gpu-blocks-override", str(KV_BLOCKS + 1)]


@pytest.fixture(scope="module")
def ray_app(tiny_model_path):
    from conftest import _skip_unless_importable

    _skip_unless_importable("ray")
    import ray
    from ray import serve

    from contextpilot_engine.bench.engine import engine_env
    from contextpilot_engine.routing import build_app
    from contextpilot_engine.routing.engine_server import free_port

    env = engine_env({"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}, apply=False)
    port = free_port()
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=200 * 1024 * 1024,
             _temp_dir=os.path.join(tempfile.gettempdir(), "ray"), log_to_driver=False, logging_level="WARNING")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app({"model": str(tiny_model_path), "args": ENGINE_ARGS, "env": env}, num_replicas=2,
                        health_check_period_s=1.0)
        serve.run(app, name="cp", route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        wait_until_mirrored(base)
        yield base
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def client(base: str):
    import openai

    return openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=300)


def routing(base: str) -> dict:
    with urllib.request.urlopen(base + "/contextpilot/routing", timeout=30) as r:
        return json.load(r)


def wait_until_mirrored(base: str, timeout: float = 120.0) -> None:
    """Requests without documents until the ingress mirrors both replicas from their KV events.

    Until a replica's event stream is linked and resynced its rewrite plans against a modelled cache
    (the proxy's rule), and those prompts are not bound to the engine's pages.
    """
    c = client(base)
    deadline = time.monotonic() + timeout
    while True:
        ask(c, [{"role": "user", "content": "warm up"}])
        replicas = routing(base)["replica_set"]["replicas"]
        if len(replicas) == 2 and all(r["mode"] == "events" for r in replicas.values()):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"the replicas' KV events were not mirrored within {timeout:g} s: {replicas}")
        time.sleep(0.2)


def ask(c, messages, **kw):
    kw.setdefault("max_tokens", 1)
    return c.chat.completions.create(model="tiny", messages=messages, temperature=0.0, **kw)


def test_routes_a_rag_trace_by_the_mirrors(ray_app):
    from contextpilot_engine.demo import rag_conversations
    from contextpilot_engine.routing.policy import ReplicaLoad, RoutingPolicy, decide

    c = client(ray_app)
    trace = rag_conversations(60, 6, 40, 150, seed=3)
    rows = []
    for messages in trace:
        reply = ask(c, messages)
        rows.append((reply.model_extra["contextpilot"], reply.model_extra["contextpilot_route"],
                     reply.usage.prompt_tokens_details.cached_tokens))
    policy = RoutingPolicy()
    exact = 0
    for report, route, cached in rows:
        assert report["applied"] and report["bound"], report
        cands = [ReplicaLoad(r, route["hit_tokens"][r], route["queue"][r], route["recent"][r])
                 for r in route["hit_tokens"]]
        # the decision follows the documented rule from what the router saw
        assert decide(cands, route["prompt_tokens"], policy).replica == route["replica"]
        exact += report["expected_cached_tokens"] == cached
    # the chosen replica's mirror is exact: what its rewrite expects is what the engine reuses
    assert exact >= 0.9 * len(rows), [(r["expected_cached_tokens"], c) for r, _, c in rows]
    # affinity is used: requests went where more of them was cached
    assert sum(1 for _, route, _ in rows
               if route["reason"] == "cache" and len(set(route["hit_tokens"].values())) > 1) >= 10
    assert sum(cached for _, _, cached in rows) > 0
    stats = routing(ray_app)["replica_set"]
    assert len(stats["members"]) == 2
    served = {r: 0 for r in stats["members"]}
    for _, route, _ in rows:
        served[route["replica"]] += 1
    assert min(served.values()) > 0
    # the documented bound holds over the router's window, which also counts what the router sent
    # before this trace (the fixture's warm-up): the trace's counts start from what it saw first;
    # a request routed by the shortest-queue fallback (reason "balance") may go past it by one
    seen = {r: rows[0][1]["recent"].get(r, 0) + n for r, n in served.items()}
    fallbacks = sum(1 for _, route, _ in rows if route["reason"] == "balance")
    assert max(seen.values()) <= policy.balance_ratio * min(seen.values()) + policy.balance_slack + fallbacks
    for replica in stats["replicas"].values():
        assert replica["mode"] == "events" and replica["kv_events"]["linked"]
        assert replica["index"]["page_events"]["removed"] > 0  # the small caches evicted, the mirrors followed


def test_conversations_stick_to_their_replica(ray_app):
    """A follow-up turn goes to its conversation's replica whenever the imbalance bound allows it."""
    c = client(ray_app)
    homes: dict[str, str] = {}
    sticky = 0
    for turn in range(3):
        for k, conv in enumerate(("chat-a", "chat-b", "chat-c")):
            docs = [f"Document {k}-{i}: " + " ".join(f"c{k}d{i}w{j}" for j in range(80)) for i in range(8)]
            messages = [{"role": "user", "content": f"turn {turn} of {conv}"}]
            reply = ask(c, messages, extra_body={"contextpilot": {"contexts": docs[turn:turn + 5]}},
                        extra_headers={"X-ContextPilot-Conversation": conv})
            route = reply.model_extra["contextpilot_route"]
            assert reply.model_extra["contextpilot"]["conversation_id"] == conv
            if turn == 0:
                homes[conv] = route["replica"]
            elif homes[conv] in route["eligible"]:
                assert (route["replica"], route["reason"]) == (homes[conv], "sticky"), route
                sticky += 1
            else:  # the home replica is over the imbalance bound: this turn spills over, the home stays
                assert route["replica"] != homes[conv]
    assert sticky >= 3


def test_a_killed_replica_is_replaced_and_requests_go_on(ray_app):
    from contextpilot_engine.demo import rag_conversations

    c = client(ray_app)
    before = routing(ray_app)["replica_set"]
    long_messages = rag_conversations(4, 6, 40, 150, seed=5)
    results: list = []
    errors: list = []

    def send(messages, max_tokens):
        try:
            reply = ask(c, messages, max_tokens=max_tokens)
            results.append(reply.model_extra["contextpilot_route"])
        except Exception as exc:  # noqa: BLE001 - collected and asserted on below
            errors.append(exc)

    # Long answers (a few seconds of decoding each) keep requests in flight on both replicas.
    threads = [threading.Thread(target=send, args=(m, 1500)) for m in long_messages[:2]]
    for t in threads:
        t.start()
    victim = None
    deadline = time.monotonic() + 60
    while victim is None and time.monotonic() < deadline:
        for replica, info in routing(ray_app)["replica_set"]["replicas"].items():
            if info["in_flight"] > 0 and info["pid"]:
                victim = replica, info["pid"]
                break
        time.sleep(0.05)
    assert victim is not None, "no request was in flight"
    os.kill(victim[1], signal.SIGKILL)
    for t in threads:
        t.join(300)
    # every request answered; the one cut off on the dead engine was retried once on the other replica
    assert not errors, errors
    assert len(results) == 2
    retried = [r for r in results if r["attempt"] == 2]
    assert retried and all(r["replica"] != victim[0] for r in retried)
    log = routing(ray_app)["recent"]
    assert any(e["replica"] == victim[0] and e["status"] in (502, 504) for e in log)
    # Ray Serve replaces the replica: the dead one leaves the router with its mirror, a new one joins
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        stats = routing(ray_app)["replica_set"]
        new = set(stats["members"]) - set(before["members"])
        if victim[0] not in stats["members"] and new and all(r in stats["replicas"] for r in new):
            break
        ask(c, long_messages[2])  # requests go on meanwhile, on the surviving replica
        time.sleep(1.0)
    else:
        pytest.fail(f"the killed replica was not replaced: {stats}")
    assert victim[0] in stats["departed"] and victim[0] not in stats["replicas"]
    seen = set()
    for messages in rag_conversations(12, 6, 40, 150, seed=7):
        seen.add(ask(c, messages).model_extra["contextpilot_route"]["replica"])
    assert new & seen, (new, seen)  # the replacement serves requests
