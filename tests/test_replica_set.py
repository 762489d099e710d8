"""The router's replica set without Ray: real proxies opened against stub engines on 127.0.0.1.

Ray Serve only decides which replicas exist (``set_members``) and which one
a request goes to; what the replica set does with that is plain asyncio and
runs here (the real Ray Serve deployment is ``test_ray_router.py``).
"""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("starlette")
pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from contextpilot_engine.proxy import app as proxy_app  # noqa: E402
from contextpilot_engine.proxy.testing import StubBackend, _free_port  # noqa: E402
from contextpilot_engine.routing.engine_server import METADATA_KEY, ServerEndpoints  # noqa: E402
from contextpilot_engine.routing.replica_set import ReplicaSet  # noqa: E402


def test_a_replica_that_leaves_while_its_mirror_opens_is_not_brought_back():
    with StubBackend() as engine:
        metadata = {METADATA_KEY: {"url": engine.url}}

        async def main():
            replicas = ReplicaSet("test/engine")
            replicas.set_members({"r1": metadata})
            opening = asyncio.ensure_future(replicas.ensure("r1", metadata))
            await asyncio.sleep(0)  # its proxy is opening (probing the engine) ...
            assert replicas.set_members({}) == ["r1"]  # ... when Ray Serve removes the replica
            cache = await opening
            try:
                return cache, replicas.members(), replicas.cache("r1")
            finally:
                await replicas.close()

        cache, members, kept = asyncio.run(main())
        assert cache is None and members == [] and kept is None


def test_a_mirror_that_cannot_open_is_retried_after_a_pause_not_per_request(monkeypatch):
    opened = []
    real_open = proxy_app.Proxy.open.__func__

    async def counting_open(cls, config):
        opened.append(config.backend)
        return await real_open(cls, config)

    monkeypatch.setattr(proxy_app.Proxy, "open", classmethod(counting_open))
    # events announced without a page size: the proxy refuses to start (ProxyStartError)
    endpoints = ServerEndpoints(url=f"http://127.0.0.1:{_free_port()}", kv_events=f"tcp://127.0.0.1:{_free_port()}")

    async def main():
        replicas = ReplicaSet("test/engine")
        results = [await replicas.ensure("r1", endpoints) for _ in range(5)]
        return results, replicas.cannot_open("r1")

    results, cannot = asyncio.run(main())
    assert results == [None] * 5 and cannot
    assert len(opened) == 1  # one attempt, not one per request routed there
