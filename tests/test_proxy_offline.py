"""The proxy without an engine: wire format, event-stream repair, faults, bad requests, bounds.

A stub OpenAI backend (instant, slow, or absent) and a fake KV-event
publisher that speaks the engines' protocol (PUB frames ``(topic, seq,
payload)``, a ROUTER replay answering from a start number and ending with
-1) stand in for the engine, so the paths a real engine rarely takes are
driven on purpose: a lost batch repaired by replay, a lost batch the replay
no longer has, a restarted publisher, a stream that drops and comes back.
The real engine behind the proxy is ``test_proxy_engine.py``.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

pytest.importorskip("starlette")
pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
zmq = pytest.importorskip("zmq")
msgspec = pytest.importorskip("msgspec")

import httpx  # noqa: E402

from contextpilot_engine.index import ContextIndex  # noqa: E402
from contextpilot_engine.integration.engine_keys import page_salt  # noqa: E402
from contextpilot_engine.integration.mirror import PageMirror  # noqa: E402
from contextpilot_engine.integration.reports import REPORT_KEYS  # noqa: E402
from contextpilot_engine.pages import chain_page_keys  # noqa: E402
from contextpilot_engine.proxy.app import ProxyConfig, ProxyStartError  # noqa: E402
from contextpilot_engine.proxy.backend import BackendTimeouts  # noqa: E402
from contextpilot_engine.integration.kv_events import EventSource, KvEventSubscriber  # noqa: E402
from contextpilot_engine.integration.kv_wire import apply_batch, decode_batch  # noqa: E402
from contextpilot_engine.proxy.sse import sse_events  # noqa: E402
from contextpilot_engine.proxy.testing import ProxyThread, StubBackend, _free_port  # noqa: E402

PAGE = 4
_enc = msgspec.msgpack.Encoder()


def stored(hashes, parent, tokens, **extra):
    return {"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": parent, "token_ids": tokens,
            "block_size": PAGE, "lora_id": None, "medium": "GPU", "lora_name": None, **extra}


def batch(*events, ts=None):
    return _enc.encode([time.time() if ts is None else ts, list(events), 0])


# ------------------------------------------------------------------- wire format
def test_batches_decode_and_name_pages_like_the_request_side():
    index = ContextIndex()
    index.attach_engine(PAGE)
    mirror = PageMirror(index, PAGE)
    tokens = list(range(1, 13))
    payload = batch(
        stored([11, 12], None, tokens[:8], extra_keys=[["tenant-salt"], None], group_idx=0,
               kv_cache_spec_kind="full_attention"),
        stored([13], 12, tokens[8:12], extra_keys=None),
        {"type": "SomethingNew", "x": 1},  # a later engine's event type: skipped alone
        {"type": "BlockRemoved", "block_hashes": [13], "medium": "GPU"},
    )
    decoded, unknown = decode_batch(payload)
    assert unknown == 1 and len(decoded.events) == 3
    effect = apply_batch(mirror, decoded)
    assert (effect.stored, effect.removed, effect.skipped) == (3, 1, 0)
    keys = chain_page_keys(tokens, PAGE, salt=page_salt("tenant-salt", None))
    assert index.cached_pages() == {keys[0]: 1, keys[1]: 1}  # the third page was removed again


def test_sglang_salt_and_pages_the_mirror_cannot_name_are_left_out():
    index = ContextIndex()
    index.attach_engine(PAGE)
    mirror = PageMirror(index, PAGE)
    effect = apply_batch(mirror, decode_batch(batch(
        stored([1], None, [5, 6, 7, 8], cache_salt="s"),                       # SGLang's field
        stored([2], None, [1, 2, 3, 4], medium="CPU"),                         # another medium
        stored([3], None, [1, 2, 3, 4], extra_keys=[[["img", 0]]]),            # a multimodal page
        stored([4], 999, [1, 2, 3, 4]),                                        # a parent never seen
        {"type": "BlockStored", "block_hashes": [5], "parent_block_hash": None, "token_ids": [1, 2],
         "block_size": 2, "medium": "GPU"},                                   # another page size
    ))[0])
    assert effect.stored == 1 and effect.skipped == 3 and effect.wrong_size == 1
    assert list(index.cached_pages()) == chain_page_keys([5, 6, 7, 8], PAGE, salt=page_salt("s", None))


def test_sse_events_regroup_arbitrary_pieces():
    import asyncio

    text = 'data: {"a": 1}\n\ndata: {"b": 2}\r\n\r\ndata: [DONE]\n\n'

    async def pieces():
        for i in range(0, len(text), 3):
            yield text[i:i + 3]

    async def collect():
        return [e async for e in sse_events(pieces())]

    assert asyncio.run(collect()) == ['data: {"a": 1}\n\n', 'data: {"b": 2}\r\n\r\n', "data: [DONE]\n\n"]


# ------------------------------------------------------------------ event stream
class FakePublisher:
    """An engine's KV-event publisher: PUB (bound) plus a ROUTER replay of everything it sent."""

    def __init__(self, port=None, replay_port=None):
        self.port, self.replay_port = port or _free_port(), replay_port or _free_port()
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self.replay = f"tcp://127.0.0.1:{self.replay_port}"
        self.buffer: list[tuple[int, bytes]] = []
        self.seq = 0
        self.forget_before = 0  # replay answers from here on only (a buffer that overflowed)
        self._ctx = zmq.Context()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.pub = None
        self.open()
        self._router = self._ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.bind(self.replay)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def open(self):
        self.pub = self._ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.bind(self.endpoint)

    def close_pub(self):
        self.pub.close(0)
        self.pub = None

    def restart(self):
        """A new engine: numbers start at 0 again, the buffer is empty."""
        with self._lock:
            self.buffer, self.seq, self.forget_before = [], 0, 0

    def publish(self, payload: bytes, send: bool = True) -> int:
        with self._lock:
            seq = self.seq
            self.seq += 1
            self.buffer.append((seq, payload))
        if send:
            self.pub.send_multipart([b"", seq.to_bytes(8, "big"), payload])
        return seq

    def _serve(self):
        while not self._stop.is_set():
            if not self._router.poll(20):
                continue
            client, _, start = self._router.recv_multipart()
            start = int.from_bytes(start, "big")
            with self._lock:
                frames = [(s, p) for s, p in self.buffer if s >= max(start, self.forget_before)]
            for s, p in frames:
                self._router.send_multipart([client, b"", b"", s.to_bytes(8, "big"), p])
            self._router.send_multipart([client, b"", b"", (-1).to_bytes(8, "big", signed=True), b""])

    def stop(self):
        self._stop.set()
        self._thread.join(2)
        if self.pub is not None:
            self.pub.close(0)
        self._router.close(0)
        self._ctx.term()


class RecordingSink:
    def __init__(self):
        index = ContextIndex()
        index.attach_engine(PAGE)
        self.index = index
        self.mirror = PageMirror(index, PAGE)
        self.log: list[str] = []
        self.seqs: list[int] = []

    def apply(self, seq, batch):
        self.seqs.append(seq)
        apply_batch(self.mirror, batch)

    def clear(self, reason):
        self.log.append("clear")
        self.mirror.cleared()

    def link_up(self):
        self.log.append("up")

    def link_down(self, reason):
        self.log.append("down")


def wait_for(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def page_batch(first_token: int) -> bytes:
    return batch(stored([first_token], None, [first_token] * PAGE))


def test_event_stream_resyncs_repairs_gaps_and_follows_restarts():
    pub = FakePublisher()
    pub.publish(page_batch(1), send=False)  # published before the subscriber existed
    sink = RecordingSink()
    sub = KvEventSubscriber(EventSource(pub.endpoint, pub.replay, replay_timeout_s=1.0), sink).start()
    try:
        assert wait_for(lambda: "up" in sink.log)
        assert sink.log[:2] == ["clear", "up"] and sink.seqs == [0]  # learnt from the replay at link-up
        time.sleep(0.2)  # let the subscription reach the publisher
        pub.publish(page_batch(2))
        pub.publish(page_batch(3), send=False)  # lost on the way
        pub.publish(page_batch(4))
        assert wait_for(lambda: sink.seqs[-1:] == [3])
        assert sink.seqs == [0, 1, 2, 3] and sub.stats.gaps == 1 and sub.stats.gaps_repaired == 1
        assert len(sink.index.cached_pages()) == 4

        # a loss the replay can no longer supply: the mirror restarts empty and goes on
        pub.forget_before = pub.seq + 1
        pub.publish(page_batch(5), send=False)
        pub.publish(page_batch(6))
        assert wait_for(lambda: sink.seqs[-1:] == [5])
        assert sink.log.count("clear") == 2 and len(sink.index.cached_pages()) == 1

        # a publisher that restarted behind a forwarder: numbers start over, with newer timestamps
        pub.restart()
        pub.publish(page_batch(7))
        assert wait_for(lambda: sub.stats.resyncs == 2)
        assert wait_for(lambda: sink.seqs[-1:] == [0])
        assert list(sink.index.cached_pages()) == chain_page_keys([7] * PAGE, PAGE)

        # the stream drops, then comes back: degrade, then resync from the replay
        pub.close_pub()
        assert wait_for(lambda: sink.log[-1] == "down")
        pub.publish(page_batch(8), send=False)  # while the link was down
        pub.open()
        assert wait_for(lambda: sink.log[-1] == "up", timeout=10)
        assert wait_for(lambda: sink.seqs[-1:] == [1])
        assert len(sink.index.cached_pages()) == 2
    finally:
        sub.close()
        pub.stop()


def test_a_publisher_that_never_connects_is_reported():
    sink = RecordingSink()
    port = _free_port()
    sub = KvEventSubscriber(EventSource(f"tcp://127.0.0.1:{port}", None, bind=True, connect_timeout_s=0.3),
                            sink).start()
    try:
        assert wait_for(lambda: sink.log == ["down"])
    finally:
        sub.close()


# ------------------------------------------------------------------- HTTP faults
DOCS = [f"Doc {i}: " + " ".join(f"t{i}w{j}" for j in range(20)) for i in range(12)]


def chat(client, docs=None, query="q", headers=None, **extra):
    body = {"model": "tiny", "messages": [{"role": "user", "content": query}], **extra}
    if docs is not None:
        body["contextpilot"] = {"contexts": docs}
    return client.post("/v1/chat/completions", json=body, headers=headers or {})


def test_backend_down_is_a_502_naming_it_and_slow_is_a_504_never_a_hang():
    dead = f"http://127.0.0.1:{_free_port()}"
    with ProxyThread(ProxyConfig(backend=dead, timeouts=BackendTimeouts(connect_s=1.0, read_s=0.5))) as px:
        # the clients' own timeouts bound every call: a hang would raise instead of answering
        r = chat(httpx.Client(base_url=px.url, timeout=10), DOCS[:3])
        assert r.status_code == 502 and dead in r.json()["error"]["message"]
        health = httpx.get(px.url + "/health", timeout=10)
        assert health.status_code == 503 and health.json()["backend"]["healthy"] is False
        assert httpx.get(px.url + "/v1/models", timeout=10).status_code == 502
    with StubBackend(delay_s=3.0) as slow:
        with ProxyThread(ProxyConfig(backend=slow.url, timeouts=BackendTimeouts(read_s=0.5))) as px:
            client = httpx.Client(base_url=px.url, timeout=10)
            r = chat(client, DOCS[:3])
            assert r.status_code == 504 and slow.url in r.json()["error"]["message"]
            r = chat(client, DOCS[:3], stream=True)
            assert r.status_code == 504
            stats = client.get("/stats").json()
            assert stats["requests"]["backend_errors"] == 2


def test_a_client_that_disconnects_takes_the_backend_call_with_it():
    """A non-streamed request whose client gives up is dropped at the backend too (the stub aborts like vLLM)."""
    with StubBackend(delay_s=5.0) as slow, ProxyThread(ProxyConfig(backend=slow.url)) as px:
        with pytest.raises(httpx.ReadTimeout):
            chat(httpx.Client(base_url=px.url, timeout=0.5), DOCS[:3])
        assert wait_for(lambda: slow.aborted == 1, timeout=4.0)  # well before the stub's 5 s answer
        stats = httpx.get(px.url + "/stats", timeout=10).json()
        assert stats["requests"]["client_gone"] == 1 and stats["requests"]["backend_errors"] == 0
        slow.delay_s = 0.0
        assert chat(httpx.Client(base_url=px.url, timeout=10), DOCS[:3]).status_code == 200  # and serves on


def test_headers_past_ascii_and_odd_fields_are_forwarded_not_a_500():
    with StubBackend() as be, ProxyThread(ProxyConfig(backend=be.url)) as px:
        client = httpx.Client(base_url=px.url, timeout=10)
        odd = {"x-note": "caf\xe9".encode("latin-1")}  # obs-text: HTTP allows it, ASCII encoding does not
        assert chat(client, DOCS[:3], headers=odd).status_code == 200
        assert be.received_headers[-1]["x-note"] == "caf\xe9"
        assert client.get("/v1/models", headers=odd).status_code == 200
        body = {"model": ["tiny"], "messages": [{"role": "user", "content": "q"}], "contextpilot": {"contexts": DOCS[:3]}}
        assert client.post("/v1/chat/completions", json=body).status_code == 200  # the backend judges the model
        assert be.received[-1]["model"] == ["tiny"]


def test_malformed_requests_are_400_naming_the_field():
    with StubBackend() as be, ProxyThread(ProxyConfig(backend=be.url)) as px:
        client = httpx.Client(base_url=px.url, timeout=10)
        r = chat(client, ["fine", ""])
        assert r.status_code == 400 and r.json()["error"]["message"].startswith("contextpilot.contexts[1]")
        assert r.json()["error"]["param"] == "contextpilot"
        r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": [], "contextpilot": {"context": []}})
        assert r.status_code == 400 and "unknown field(s) ['context']" in r.json()["error"]["message"]
        r = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and "not JSON" in r.json()["error"]["message"]
        r = chat(client, query="q", headers={"X-ContextPilot-Tenant": ""})
        assert r.status_code == 400 and "x-contextpilot-tenant" in r.json()["error"]["message"]
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": "p", "contextpilot": {"contexts": ["a"]}})
        assert r.status_code == 400 and "contextpilot.contexts" in r.json()["error"]["message"]
        assert len(be.received) == 0  # nothing malformed reached the backend


def test_rewrite_report_streaming_and_tenant_salt_with_a_stub():
    with StubBackend() as be, ProxyThread(ProxyConfig(backend=be.url)) as px:
        client = httpx.Client(base_url=px.url, timeout=10)
        r = chat(client, DOCS[:4], headers={"X-ContextPilot-Tenant": "team-a"})
        report = r.json()["contextpilot"]
        assert set(report) == set(REPORT_KEYS) and report["applied"] and report["tenant"] == "team-a"
        sent = be.received[-1]
        assert "contextpilot" not in sent and sent["cache_salt"] == "contextpilot-tenant=team-a"
        assert all(d in sent["messages"][0]["content"] for d in DOCS[:4])
        with client.stream("POST", "/v1/chat/completions", json={
                "model": "tiny", "stream": True, "messages": [{"role": "user", "content": "q"}],
                "contextpilot": {"contexts": DOCS[:2]}}) as s:
            events = [line for line in s.iter_lines() if line.startswith("data: ")]
        first = json.loads(events[0][len("data: "):])
        assert first["contextpilot"]["applied"] and "contextpilot" not in json.loads(events[1][len("data: "):])
        assert events[-1] == "data: [DONE]"
        # completions pass through, salted by tenant
        client.post("/v1/completions", json={"model": "tiny", "prompt": "p"}, headers={"X-ContextPilot-Tenant": "b"})
        assert be.received[-1]["cache_salt"] == "contextpilot-tenant=b" and be.received[-1]["prompt"] == "p"


def test_a_client_salt_cannot_spell_a_tenant_namespace():
    with StubBackend() as be, ProxyThread(ProxyConfig(backend=be.url)) as px:
        client = httpx.Client(base_url=px.url, timeout=10)
        for forged in ("contextpilot-tenant=team-a", "x|contextpilot-tenant=team-a"):
            r = chat(client, DOCS[:3], cache_salt=forged)
            assert r.status_code == 400 and "cache_salt" in r.json()["error"]["message"]
            r = client.post("/v1/completions", json={"model": "tiny", "prompt": "p", "cache_salt": forged})
            assert r.status_code == 400
        assert not be.received  # nothing forged reached the backend
        chat(client, DOCS[:3], cache_salt="mine")
        assert be.received[-1]["cache_salt"] == "mine"  # an ordinary salt goes on as given
        chat(client, DOCS[:3], cache_salt="mine", headers={"X-ContextPilot-Tenant": "team-a"})
        assert be.received[-1]["cache_salt"] == "mine|contextpilot-tenant=team-a"


def test_reorder_evict_reset_stats_metrics():
    with StubBackend() as be, ProxyThread(ProxyConfig(backend=be.url)) as px:
        client = httpx.Client(base_url=px.url, timeout=10)
        r = client.post("/reorder", json={"contexts": [["a", "b", "c"], ["c", "b", "d"]], "alpha": 0.001})
        out = r.json()
        assert r.status_code == 200 and out["mode"] == "stateless" and out["num_contexts"] == 2
        assert sorted(out["original_indices"]) == [0, 1]
        for i, ctx in zip(out["original_indices"], out["reordered_contexts"]):
            assert sorted(ctx) == sorted([["a", "b", "c"], ["c", "b", "d"]][i])
        one = client.post("/reorder", json={"contexts": [3, 1, 2]}).json()
        assert one["input_type"] == "integer" and sorted(one["reordered_contexts"][0]) == [1, 2, 3]
        assert client.post("/reorder", json={"contexts": [["a", ""]]}).status_code == 400

        first = chat(client, DOCS[:3]).json()
        assert first["contextpilot"]["applied"] and first["contextpilot"]["bound"] is False  # modelled: no pages
        second = chat(client, DOCS[:3], query="again").json()
        assert second["contextpilot"]["expected_cached_tokens"] > 0  # the model remembers the first
        ev = client.post("/evict", json={"request_ids": [first["id"], second["id"], "nope"]}).json()
        assert ev["status"] == "success" and ev["removed_count"] == 1 and ev["not_found"] == ["nope"]
        assert chat(client, DOCS[:3], query="third").json()["contextpilot"]["expected_cached_tokens"] == 0
        assert client.post("/evict", json={"ids": []}).status_code == 400
        assert client.post("/reset").json()["status"] == "success"
        stats = client.get("/stats").json()
        assert stats["mode"] == "modelled" and stats["index"]["modelled"]["tenants"] == 0
        text = client.get("/metrics").text
        assert "contextpilot:proxy_requests_total" in text and "contextpilot:requests_total" in text
        assert client.get("/health").json()["status"] == "ok"
        assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"  # passed through


def test_memory_stays_bounded_and_64_concurrent_clients_all_get_answers():
    options = {"max_tenants": 4, "max_nodes": 50, "max_conversations": 8, "max_conversation_entries": 64,
               "max_tracked_blocks": 40, "capacity_tokens": 2000}
    with StubBackend() as be, ProxyThread(ProxyConfig(backend=be.url, options=options)) as px:
        client = httpx.Client(base_url=px.url, timeout=30)
        for i in range(400):
            docs = [DOCS[(i + k) % len(DOCS)] + f" v{i % 37}" for k in range(3)]
            r = chat(client, docs, query=f"q{i}", headers={"X-ContextPilot-Tenant": f"t{i % 9}",
                                                            "X-ContextPilot-Conversation": f"c{i % 23}"})
            assert r.status_code == 200
        work = client.get("/stats").json()["overhead"]
        assert work["n"] == 400  # the proxy's own work per request is measured (figures: scripts/bench_proxy.py)
        recent = client.get("/stats", params={"last": 150}).json()
        assert recent["overhead"]["n"] == recent["overhead_cpu"]["n"] == 150
        assert recent["overhead"]["max_ms"] <= work["max_ms"]
        for bad in ("0", "x", "-3"):
            r = client.get("/stats", params={"last": bad})
            assert r.status_code == 400 and r.json()["error"]["param"] == "last"
        index = px.proxy.view.modelled.index
        stats = index.stats()
        assert stats["tenants"] <= 4 and stats["nodes"] <= 4 * 50
        assert len(px.proxy.view.modelled.pilot.conversations) <= 8
        assert len(px.proxy.view.modelled.reports) <= 1000

        import concurrent.futures

        def one(i):
            with httpx.Client(base_url=px.url, timeout=30) as c:
                return chat(c, DOCS[i % 5: i % 5 + 4], query=f"parallel {i}")

        before = len(be.received)
        with concurrent.futures.ThreadPoolExecutor(64) as pool:
            results = list(pool.map(one, range(64)))
        assert [r.status_code for r in results] == [200] * 64
        assert all(r.json()["contextpilot"]["applied"] for r in results)
        assert len(be.received) - before == 64
        assert len({r.json()["id"] for r in results}) == 64


def test_start_up_refuses_events_without_a_page_size():
    with StubBackend() as be:
        with pytest.raises(ProxyStartError, match="block size is unknown"):
            with ProxyThread(ProxyConfig(backend=be.url, events=EventSource(f"tcp://127.0.0.1:{_free_port()}"))):
                pass


def test_cli_help_and_bad_option():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "contextpilot_engine.cli", "serve", "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0
    for flag in ("--backend", "--kv-events", "--kv-events-replay", "--port", "--model-path", "--block-size",
                 "--contextpilot-tenant", "--enable-contextpilot"):
        assert flag in out.stdout
    bad = subprocess.run([sys.executable, "-m", "contextpilot_engine.cli", "serve", "--backend", "http://x",
                          "--contextpilot-popularity-decay", "2"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "popularity_decay" in bad.stderr


def _consecutive_ports(n=2):
    import socket

    for _ in range(50):
        base = _free_port()
        socks = []
        try:
            for k in range(n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", base + k))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no consecutive free ports")


def test_data_parallel_ranks_have_their_own_mirror_and_requests_are_pinned_to_one():
    from contextpilot_engine.integration.kv_events import offset_endpoint

    assert offset_endpoint("tcp://*:5557", 2) == "tcp://*:5559" and offset_endpoint("tcp://h:0", 1) == "tcp://h:0"
    assert offset_endpoint("ipc:///tmp/kv", 1) == "ipc:///tmp/kv_dp1" and offset_endpoint(None, 3) is None
    base, replay = _consecutive_ports(), _consecutive_ports()
    pubs = [FakePublisher(base + r, replay + r) for r in range(2)]  # what a 2-rank engine binds
    try:
        config = ProxyConfig(backend="", events=EventSource(pubs[0].endpoint, pubs[0].replay), block_size=PAGE,
                             data_parallel_size=2)
        with StubBackend(delay_s=0.3) as be, ProxyThread(dataclasses_replace(config, backend=be.url)) as px:
            client = httpx.Client(base_url=px.url, timeout=30)
            assert wait_for(lambda: [r["mode"] for r in client.get("/stats").json()["data_parallel"]]
                            == ["events", "events"], timeout=15)
            time.sleep(0.2)  # let the subscriptions reach the publishers
            pubs[1].publish(page_batch(9))  # rank 1 caches a page, rank 0 does not
            assert wait_for(lambda: [r["engine_pages"] for r in client.get("/stats").json()["data_parallel"]]
                            == [0, 1])
            chat(client, DOCS[:3])  # one at a time: rank 0
            assert be.received_headers[-1]["x-data-parallel-rank"] == "0"
            chat(client, DOCS[:3], headers={"X-data-parallel-rank": "1"})  # the client's choice is kept
            assert be.received_headers[-1]["x-data-parallel-rank"] == "1"
            odd = chat(client, DOCS[:3], headers={"X-data-parallel-rank": "\xb2".encode("latin-1")})  # '²'
            assert odd.status_code == 200  # not a rank: chosen by load, as with no header
            import concurrent.futures

            with concurrent.futures.ThreadPoolExecutor(2) as pool:  # two at once: one per rank
                done = list(pool.map(lambda i: chat(httpx.Client(base_url=px.url, timeout=30), DOCS[i:i + 3],
                                                    query=f"at once {i}"), range(2)))
            assert [r.status_code for r in done] == [200, 200]
            assert sorted(h["x-data-parallel-rank"] for h in list(be.received_headers)[-2:]) == ["0", "1"]
            health = client.get("/health").json()["proxy"]
            assert [r["endpoint"] for r in health["ranks"]] == [pubs[0].endpoint, pubs[1].endpoint]
        with StubBackend() as be, ProxyThread(ProxyConfig(backend=be.url)) as px:  # one rank: no header
            chat(httpx.Client(base_url=px.url, timeout=10), DOCS[:3])
            assert "x-data-parallel-rank" not in be.received_headers[-1]
    finally:
        for pub in pubs:
            pub.stop()


def dataclasses_replace(obj, **changes):
    import dataclasses

    return dataclasses.replace(obj, **changes)


def test_kv_event_pieces_live_in_the_integration_layer():
    """The integration layer (and routing) never reach into the proxy's internals, nor its HTTP stack."""
    import ast
    import pathlib

    root = pathlib.Path(__file__).resolve().parent.parent / "contextpilot_engine"
    allowed_from_routing = {"contextpilot_engine.proxy"}  # the proxy's public names only
    for folder, banned_http in (("integration", True), ("routing", False)):
        for path in (root / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    names = [node.module]
                for name in names:
                    if name.startswith("contextpilot_engine.proxy"):
                        assert folder == "routing" and name in allowed_from_routing, f"{path}: imports {name}"
                    if banned_http:
                        assert name.split(".")[0] not in ("starlette", "httpx", "uvicorn", "fastapi"), \
                            f"{path}: imports {name}"
    assert not (root / "proxy" / "kv_wire.py").exists() and not (root / "proxy" / "kv_events.py").exists()


def test_the_modelled_cache_calibrates_its_capacity_from_the_reported_cached_tokens():
    docs = [f"Note {i}: " + " ".join(f"n{i}x{j}" for j in range(60)) for i in range(40)]
    with StubBackend() as be, ProxyThread(ProxyConfig(backend=be.url, options={"capacity_tokens": 50_000})) as px:
        client = httpx.Client(base_url=px.url, timeout=10)
        trie = lambda: px.proxy.view.modelled.index.peek("default").trie  # noqa: E731
        for i in range(30):  # every answer says nothing was cached: the engine holds less than the model
            chat(client, docs[i % 10: i % 10 + 4], query=f"q{i}")
        shrunk = client.get("/stats").json()["index"]["calibration"]["shrunk"]
        assert shrunk >= 1 and trie().capacity_tokens < 50_000
        small = trie().capacity_tokens
        be.cached_tokens = 100_000  # now the engine reports more than the (full) model promises
        for i in range(60):
            chat(client, docs[i % 36: i % 36 + 4], query=f"r{i}")
        stats = client.get("/stats").json()["index"]["calibration"]
        assert stats["grown"] >= 1 and small < trie().capacity_tokens <= 50_000


def test_prompt_pieces_are_cut_where_the_lookbehind_pattern_cuts():
    """The line-token cache's fast cutter agrees with the plain pattern it replaced, Unicode blanks included."""
    import random
    import re

    from contextpilot_engine.proxy.tokenization import _pieces

    plain = re.compile(r"(?<=\S\n)(?=\S)|(?<=\])(?= \S)")
    rnd = random.Random(7)
    alphabet = "ab \n]\t\u00a0\u2028\u3000\x85\u00e9"
    texts = ["", "\n", "]", "] x", "a\nb", " \nb", "a\n b", "x]\ny", "[1] doc\n[2] doc\n</documents>"]
    texts += ["".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 40))) for _ in range(5000)]
    for text in texts:
        assert _pieces(text) == plain.split(text), repr(text)


def test_the_serving_process_freezes_its_start_up_heap():
    import subprocess
    import sys

    code = ("import gc; from contextpilot_engine.proxy import collector; collector.tune(); "
            "print(gc.get_freeze_count() > 0, gc.get_threshold()[1] == collector.MIDDLE_EVERY)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["True", "True"], out.stderr


def test_backend_lanes_keep_the_connection_limit():
    """Requests rotate over several connection pools, and together they never open more than the limit."""
    import asyncio

    from contextpilot_engine.proxy.backend import Backend

    stub = StubBackend(delay_s=0.3)
    inner = stub.app()
    at_once = {"now": 0, "peak": 0}

    async def counting(scope, receive, send):  # the stub, counting the generation requests it holds at once
        busy = scope["type"] == "http" and scope["path"] == "/v1/chat/completions"
        if busy:
            at_once["now"] += 1
            at_once["peak"] = max(at_once["peak"], at_once["now"])
        try:
            await inner(scope, receive, send)
        finally:
            at_once["now"] -= int(busy)

    stub.app = lambda: counting

    async def burst(limit: int, n: int) -> list[int]:
        backend = Backend(stub.url, max_connections=limit)
        body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}).encode()

        async def one() -> int:
            response = await backend.open("POST", "/v1/chat/completions", content=body,
                                          headers={"content-type": "application/json"})
            await backend.read(response)
            return response.status_code

        try:
            return await asyncio.gather(*(one() for _ in range(n)))
        finally:
            await backend.aclose()

    with stub:
        assert asyncio.run(burst(4, 12)) == [200] * 12
        assert at_once["peak"] == 4  # four lanes of one connection each: never a fifth
        at_once["peak"] = 0
        assert asyncio.run(burst(64, 48)) == [200] * 48
        assert at_once["peak"] == 48  # the lanes together hold every request at once


def test_line_token_cache_checks_off_the_event_loop_and_turns_itself_off_for_a_joining_tokenizer():
    """A real Rust BPE tokenizer whose merge spans a line break: the background check finds it.

    The first prompts are checked on a thread of their own; once a check finds
    that the pieces' ids differ from the whole prompt's, later prompts are
    tokenized whole (so their ids are the engine's again).
    """
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from contextpilot_engine.proxy.tokenization import LineTokenCache

    vocab = {c: i for i, c in enumerate(["x", "\n", "a", "y", "\na"])}
    joining = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, [("\n", "a")]))  # no pre-tokenizer: "\na" merges
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=joining)
    cache = LineTokenCache(fast)
    pieces_ids = cache.encode("x\nay")  # cut after the line break: "x\n" + "ay"
    assert pieces_ids == [0, 1, 2, 3]
    assert cache.checks[0].result(timeout=10) is False
    assert not cache.enabled
    assert cache.encode("x\nay") == [0, 4, 3]  # whole now: the merge the engine makes


def test_line_token_cache_keeps_itself_on_when_pieces_tokenize_alike():
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from contextpilot_engine.proxy.tokenization import LineTokenCache

    vocab = {c: i for i, c in enumerate(["x", "\n", "a", "y"])}
    plain = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, []))
    cache = LineTokenCache(transformers.PreTrainedTokenizerFast(tokenizer_object=plain))
    for text in ("x\nay", "ay\nx", "x\nx\nx"):
        cache.encode(text)
    assert all(check.result(timeout=10) for check in cache.checks) and cache.enabled
    assert cache.checked == 3


def test_line_token_cache_is_bounded_by_size_not_only_by_entries():
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from contextpilot_engine.proxy.tokenization import LineTokenCache

    vocab = {c: i for i, c in enumerate(["x", "\n", "a", "y"])}
    plain = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, []))
    cache = LineTokenCache(transformers.PreTrainedTokenizerFast(tokenizer_object=plain), max_bytes=2 << 20)
    for n in range(200):  # one-line documents of some kB each: past the bytes, far under the entries
        text = "y" * n + "a" * 300
        assert cache.encode(text) == [3] * n + [2] * 300  # every answer right, kept or not
    assert cache.nbytes <= cache.max_bytes and 0 < len(cache._ids) < 200
    huge = "x" * 2_000  # past a sixty-fourth of the bound: tokenized, never kept
    assert cache.encode(huge) == [0] * 2_000 and huge not in cache._ids


def test_evicting_a_request_keeps_a_shorter_request_it_contains():
    from contextpilot_engine.proxy.evictions import ServedPath, ServedPaths

    index = ContextIndex()
    pre, b1, b2 = 100, 1, 2
    index.record("t", pre, 10, [(b1, 50)])  # request A: preamble, b1
    index.record("t", pre, 10, [(b1, 50), (b2, 50)])  # request B continues A
    paths = ServedPaths()
    paths.remember("A", ServedPath("t", (pre, b1), modelled=True))
    paths.remember("B", ServedPath("t", (pre, b1, b2), modelled=True))
    assert paths.evict(["B"], [index]) == (1, [])
    assert index.match("t", pre, {b1: 1}, {b1: 50}).hit_tokens == 60  # A (preamble and b1) was not evicted
    assert index.match("t", pre, {b1: 1, b2: 1}, {b1: 50, b2: 50}).hit_tokens == 60  # only B's own block went
    assert paths.evict(["A"], [index]) == (1, [])
    assert index.match("t", pre, {b1: 1}, {b1: 50}).hit_tokens == 0


def test_a_request_remembered_under_two_ids_is_evicted_by_either():
    from contextpilot_engine.proxy.evictions import ServedPath, ServedPaths

    index = ContextIndex()
    pre, b1, b2 = 100, 1, 2
    paths = ServedPaths()
    a = ServedPath("t", (pre, b1), modelled=True)
    index.record("t", pre, 10, [(b1, 50)])
    paths.remember("chatcmpl-A", a)  # the backend's id and the client's request_id: one request
    paths.remember("req-A", a)
    assert paths.evict(["chatcmpl-A"], [index]) == (1, []) and len(paths) == 0
    b = ServedPath("t", (pre, b1, b2), modelled=True)
    index.record("t", pre, 10, [(b1, 50), (b2, 50)])
    paths.remember("chatcmpl-B", b)
    paths.remember("req-B", b)
    assert paths.evict(["req-B"], [index]) == (1, [])
    assert index.match("t", pre, {b1: 1}, {b1: 50}).hit_tokens == 0  # A's end was forgotten with A
    assert paths.evict(["req-A", "chatcmpl-B"], [index]) == (0, ["req-A", "chatcmpl-B"])
