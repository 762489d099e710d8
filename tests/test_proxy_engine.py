"""The proxy in front of a stock vLLM OpenAI server, synced by vLLM's own KV events.

One vLLM CPU server for the module, started without contextpilot (the proxy
fronts a stock engine) but with ``--kv-events-config`` (ZMQ publisher and
replay socket), a KV cache of 47 usable blocks so that a short trace
evicts, and ``--enable-prompt-tokens-details`` so every response says how
many prompt tokens the engine found cached.  vLLM's publisher connects to
a test relay (:class:`~contextpilot_engine.proxy.testing.EventRelay`) that
forwards to the proxy, so the tests can lose a batch or cut the stream
without touching the engine; the proxy reads the replay socket directly.

What is checked, with the official ``openai`` client (streaming and not):

* every rewritten response's ``expected_cached_tokens`` equals the
  ``cached_tokens`` vLLM reports, request for request, on a trace with
  hundreds of evictions, after 64 concurrent clients, after a lost batch
  (repaired from the replay socket), after the stream dropped and came back,
  and after the engine restarted;
* the response field, streamed chunks, pass-through routes, tenant
  isolation (cache salt), 400s naming the field, 502 naming a backend that
  went away, the modelled fallback with its warning.
"""

from __future__ import annotations

import json
import logging
import random
import time

import pytest

pytestmark = pytest.mark.engine

BLOCKS = 48  # vLLM keeps one block back: 47 usable blocks of 32 tokens


def _docs(n=24, seed=0):
    rng = random.Random(seed)
    # every document opens with the same words, so pages straddling a block boundary are often shared
    return [f"Document {i}: " + " ".join(f"w{i}x{j}" for j in range(rng.randint(15, 40))) for i in range(n)]


DOCS = _docs()


def _server_args(relay_side: str, replay: str) -> list[str]:
    config = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": relay_side, "replay_endpoint": replay}
    return ["--kv-events-config", json.dumps(config), "--num-gpu-blocks-override", str(BLOCKS),
            "--max-model-len", "1024"]


@pytest.fixture(scope="module")
def stack(tiny_model_path):
    pytest.importorskip("openai")
    pytest.importorskip("zmq")
    from contextpilot_engine.bench.engine import engine_env
    from contextpilot_engine.proxy.app import ProxyConfig
    from contextpilot_engine.integration.kv_events import EventSource
    from contextpilot_engine.proxy.testing import EventRelay, ProxyThread
    from contextpilot_engine.vllm_plugin.testing import OpenAIServer, free_port

    env = engine_env({"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}, apply=False)
    replay = f"tcp://127.0.0.1:{free_port()}"
    with EventRelay() as relay:
        server = OpenAIServer(tiny_model_path, _server_args(relay.engine_side, replay), env=env)
        with server:
            config = ProxyConfig(backend=server.url, events=EventSource(relay.proxy_side, replay))
            with ProxyThread(config) as proxy:
                assert _wait(lambda: proxy.proxy.view.mode == "events", 30), "the proxy never linked to the events"
                yield {"server": server, "proxy": proxy, "relay": relay, "env": env, "replay": replay,
                       "model": tiny_model_path}


def _wait(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def client(stack):
    import openai

    return openai.OpenAI(base_url=stack["proxy"].url + "/v1", api_key="unused", max_retries=0, timeout=120)


def ask(c, docs, query, headers=None, **body):
    extra = {"contextpilot": {"contexts": docs}} if docs is not None else {}
    return c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": query}], max_tokens=2,
                                     temperature=0.0, extra_body=extra or None, extra_headers=headers, **body)


def exact(r) -> tuple[int, int]:
    return r.model_extra["contextpilot"]["expected_cached_tokens"], r.usage.prompt_tokens_details.cached_tokens


def stats(stack) -> dict:
    import httpx

    return httpx.get(stack["proxy"].url + "/stats", timeout=10).json()


class Trace:
    """Requests of 4 documents each, never the same list twice, each with its own query."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.seen: set = set()
        self.n = 0

    def next(self) -> tuple[list[str], str]:
        while True:
            pick = tuple(self.rng.sample(range(len(DOCS)), 4))
            if pick not in self.seen:
                self.seen.add(pick)
                self.n += 1
                return [DOCS[i] for i in pick], f"question {self.n} of trace {id(self)}?"


def run_exact(c, trace: Trace, n: int) -> list[tuple[int, int]]:
    pairs = []
    for _ in range(n):
        docs, query = trace.next()
        pairs.append(exact(ask(c, docs, query)))
    return pairs


# ------------------------------------------------------------------------------------------ tests
def test_chat_streaming_and_pass_through_with_the_openai_client(stack):
    import httpx

    from contextpilot_engine.integration.reports import REPORT_KEYS

    c = client(stack)
    r = ask(c, DOCS[:3], "which document is first?")
    report = r.model_extra["contextpilot"]
    assert set(report) == set(REPORT_KEYS) and report["applied"] and report["bound"]
    assert r.usage.prompt_tokens_details is not None and r.choices[0].message is not None

    chunks = list(ask(c, DOCS[1:4], "streamed?", stream=True, stream_options={"include_usage": True}))
    assert chunks[0].model_extra["contextpilot"]["applied"]
    assert all("contextpilot" not in (ch.model_extra or {}) for ch in chunks[1:])
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens_details is not None

    backend = stack["server"].url
    def models(url):
        return [(m["id"], m["root"]) for m in httpx.get(url + "/v1/models").json()["data"]]

    assert models(stack["proxy"].url) == models(backend)
    done = c.completions.create(model="tiny", prompt="hello there", max_tokens=2)
    assert done.choices[0].text is not None and "contextpilot" not in (done.model_extra or {})
    streamed = list(c.completions.create(model="tiny", prompt="hello again", max_tokens=2, stream=True))
    assert streamed and streamed[0].choices
    tok = httpx.post(stack["proxy"].url + "/tokenize", json={"model": "tiny", "prompt": "hi"}).json()
    assert tok["tokens"] == httpx.post(backend + "/tokenize", json={"model": "tiny", "prompt": "hi"}).json()["tokens"]
    assert stats(stack)["tokenizer"] == {"renderer": "local", "check": "verified"}


def test_expected_cached_tokens_equal_vllms_request_for_request_under_eviction(stack):
    c = client(stack)
    before = stats(stack)["index"]["page_events"]["removed"]
    pairs = run_exact(c, Trace(1), 40)
    assert pairs == [(got, got) for _, got in pairs], [p for p in pairs if p[0] != p[1]]
    assert sum(1 for _, got in pairs if got) >= 5  # the trace reuses the cache ...
    s = stats(stack)
    assert s["index"]["page_events"]["removed"] - before > 100  # ... and forces evictions
    assert s["index"]["engine_pages"] <= BLOCKS - 1
    assert s["kv_events"]["gaps"] == 0 and s["mode"] == "events"


def test_tenants_never_share_kv_pages(stack):
    c = client(stack)
    docs = DOCS[10:14]
    a1 = ask(c, docs, "tenant a, first", headers={"X-ContextPilot-Tenant": "a"})
    b1 = ask(c, docs, "tenant b, first", headers={"X-ContextPilot-Tenant": "b"})
    a2 = ask(c, docs, "tenant a, again", headers={"X-ContextPilot-Tenant": "a"})
    assert exact(b1) == (0, 0)  # the same documents, another tenant: nothing reused
    assert exact(a2)[0] == exact(a2)[1] > 4 * 32
    assert a1.model_extra["contextpilot"]["tenant"] == "a" and b1.model_extra["contextpilot"]["tenant"] == "b"


def test_malformed_contextpilot_field_is_a_400_naming_it(stack):
    import openai

    c = client(stack)
    with pytest.raises(openai.BadRequestError, match=r"contextpilot\.contexts\[1\]"):
        ask(c, ["fine", ""], "q")
    with pytest.raises(openai.BadRequestError, match="unknown field"):
        c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "q"}], max_tokens=1,
                                  extra_body={"contextpilot": {"docs": ["a"]}})


def test_64_concurrent_clients_then_still_exact(stack):
    import concurrent.futures

    trace = Trace(2)
    work = [trace.next() for _ in range(64)]
    before = stats(stack)["requests"]

    def one(item):
        docs, query = item
        return ask(client(stack), docs, query)

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        results = list(pool.map(one, work))
    assert len(results) == 64 and all(r.model_extra["contextpilot"]["applied"] for r in results)
    after = stats(stack)["requests"]
    assert after["total"] - before["total"] == 64 and after["backend_errors"] == before["backend_errors"]
    assert after["client_errors"] == before["client_errors"]
    pairs = run_exact(client(stack), trace, 6)
    assert pairs == [(got, got) for _, got in pairs]


def test_a_lost_batch_is_fetched_from_the_replay_socket(stack):
    c = client(stack)
    trace = Trace(3)
    repaired = stats(stack)["kv_events"]["gaps_repaired"]
    stack["relay"].drop_next(1)
    run_exact(c, trace, 2)  # the first one's batch is lost; the second one's shows the gap
    assert _wait(lambda: stats(stack)["kv_events"]["gaps_repaired"] > repaired)
    pairs = run_exact(c, trace, 6)
    assert pairs == [(got, got) for _, got in pairs]


def test_a_dropped_stream_degrades_to_the_modelled_cache_then_recovers(stack, caplog):
    c = client(stack)
    trace = Trace(4)
    relay = stack["relay"]
    with caplog.at_level(logging.WARNING, logger="contextpilot.proxy"):
        relay.cut()
        assert _wait(lambda: stats(stack)["mode"] == "modelled")
    assert any("disconnected" in rec.getMessage() and "modelled cache" in rec.getMessage() for rec in caplog.records)
    docs, query = trace.next()
    r = ask(c, docs, query)
    report = r.model_extra["contextpilot"]
    assert report["applied"] and report["bound"] is False  # served, planned against the model
    resyncs = stats(stack)["kv_events"]["resyncs"]
    relay.restore()
    assert _wait(lambda: stats(stack)["mode"] == "events", 15)
    assert stats(stack)["kv_events"]["resyncs"] == resyncs + 1
    pairs = run_exact(c, trace, 8)  # the mirror was rebuilt from the engine's replay buffer
    assert pairs == [(got, got) for _, got in pairs]


def test_backend_down_is_a_502_and_a_restarted_engine_is_followed(stack):
    import openai

    from contextpilot_engine.vllm_plugin.testing import OpenAIServer

    old = stack["server"]
    c = client(stack)
    run_exact(c, Trace(5), 3)  # the cache holds something the restarted engine will not
    old.stop()
    with pytest.raises(openai.APIStatusError) as err:
        ask(c, DOCS[:2], "anyone there?")
    assert err.value.status_code == 502 and old.url in str(err.value)
    assert stats(stack)["mode"] == "modelled"  # its cache may be gone: the mirror is set aside
    resyncs = stats(stack)["kv_events"]["resyncs"]
    new = OpenAIServer(stack["model"], _server_args(stack["relay"].engine_side, stack["replay"]), env=stack["env"])
    new.port, new.url = old.port, old.url
    new.cmd[new.cmd.index("--port") + 1] = str(old.port)
    with new:
        first = ask(c, DOCS[:2], "the first request after the restart")
        assert first.model_extra["contextpilot"]["bound"] is False  # planned against the model
        assert _wait(lambda: stats(stack)["mode"] == "events", 15)
        assert stats(stack)["kv_events"]["resyncs"] > resyncs  # rebuilt from the new engine's buffer
        pairs = run_exact(c, Trace(5), 3) + run_exact(c, Trace(6), 8)  # the first three are gone from its cache
        assert pairs == [(got, got) for _, got in pairs]
