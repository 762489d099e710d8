"""The replicas behind one router, each with its own exact mirror and rewrite path, in the ingress's process.

Each replica's engine publishes its KV events; for each replica the
ingress's process keeps a contextpilot proxy (:class:`contextpilot_engine.proxy.app.Proxy`,
opened without its HTTP app): the KV-event subscriber and page mirror of
that engine, its tokenizer, and the integration layer's request path that
rewrites a chat request against that mirror and sends it to that engine.
So there is one mirror per replica, one request interface and one set of
options and errors, exactly those of the proxy and the engine plugins.

Two threads touch a :class:`ReplicaSet`:

* the **router** (Ray Serve runs it on its own event loop) publishes the
  replicas it routes to (:meth:`ReplicaSet.set_members`, from the replica
  metadata each replica published) and reads the mirrors to score them;
  a replica that left is cleared at once, so nothing is routed on its
  stale view;
* the **ingress** opens and closes the proxies on its own event loop
  (:meth:`ReplicaSet.refresh`): their HTTP clients belong to the loop that
  serves the requests.

A replica a request failed on is *suspect* for a while: the router does not
choose it unless it is the only one left, until Ray Serve replaces it (a
new replica id) or the time runs out.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from .engine_server import ServerEndpoints

if TYPE_CHECKING:
    from contextpilot_engine.proxy import Proxy

__all__ = ["ReplicaCache", "ReplicaSet", "find_replica_set", "register_replica_set"]

log = logging.getLogger("contextpilot.routing")


@dataclass
class ReplicaCache:
    """One replica: its endpoints and the proxy that mirrors its engine and rewrites for it."""

    replica: str
    endpoints: ServerEndpoints
    proxy: "Proxy"

    def hit_state(self) -> Any:
        """The integration state the next request to this replica is planned against (mirrored or modelled)."""
        return self.proxy.view.active()

    @property
    def in_flight(self) -> int:
        return self.proxy.view.in_flight

    def clear(self, reason: str) -> None:
        """Forget every page of this replica (it left, or restarted)."""
        self.proxy.view.clear(reason)

    def stats(self) -> dict:
        sub = self.proxy.subscriber
        return {
            "url": self.endpoints.url,
            "pid": self.endpoints.pid,
            "mode": self.proxy.view.mode,
            "in_flight": self.in_flight,
            "kv_events": None if sub is None else {"linked": sub.linked, **sub.stats.as_dict()},
            "index": self.proxy.view.stats(),
        }


class ReplicaSet:
    """The replicas of one engine deployment, as one router and its ingress share them (see the module docstring)."""

    def __init__(self, name: str, options: Mapping[str, Any] | None = None, suspect_s: float = 30.0,
                 tokenizer: str = "auto"):
        self.name = name
        #: contextpilot options of every replica's rewrite (the ``--contextpilot-*`` options)
        self.options = dict(options or {})
        self.suspect_s = suspect_s
        self.tokenizer = tokenizer
        self._lock = threading.Lock()
        self._members: dict[str, ServerEndpoints | None] = {}
        self._caches: dict[str, ReplicaCache] = {}
        self._closing: list[ReplicaCache] = []
        self._suspects: dict[str, float] = {}
        self._open_failed: dict[str, float] = {}
        self._opening: dict[str, asyncio.Future] = {}
        #: replicas that left, newest last (for checks and stats)
        self.departed: list[str] = []

    # ------------------------------------------------------------ router side
    def set_members(self, members: Mapping[str, Mapping[str, Any] | None]) -> list[str]:
        """The replicas the router routes to now (replica id -> its metadata); returns those that left."""
        with self._lock:
            gone = [r for r in self._members if r not in members]
            for replica, metadata in members.items():
                if replica not in self._members:
                    self._members[replica] = ServerEndpoints.from_metadata(metadata)
            for replica in gone:
                self._drop(replica, "the replica left the deployment")
            return gone

    def remove(self, replica: str, reason: str) -> None:
        """One replica died: stop routing to it and clear its mirror now."""
        with self._lock:
            if replica in self._members or replica in self._caches:
                self._drop(replica, reason)

    def _drop(self, replica: str, reason: str) -> None:
        self._members.pop(replica, None)
        self._suspects.pop(replica, None)
        cache = self._caches.pop(replica, None)
        if cache is not None:
            cache.clear(reason)
            self._closing.append(cache)
        self.departed.append(replica)
        del self.departed[:-100]
        log.info("contextpilot routing: replica %s removed (%s); its mirror is cleared", replica, reason)

    def cache(self, replica: str) -> ReplicaCache | None:
        with self._lock:
            return self._caches.get(replica)

    def members(self) -> list[str]:
        with self._lock:
            return list(self._members)

    def suspect(self, replica: str, why: str) -> None:
        """A request failed on ``replica``: avoid it for ``suspect_s`` seconds."""
        with self._lock:
            self._suspects[replica] = time.monotonic() + self.suspect_s
        log.warning("contextpilot routing: a request failed on replica %s (%s); it is avoided for %g s or until "
                    "Ray Serve replaces it", replica, why, self.suspect_s)

    def is_suspect(self, replica: str) -> bool:
        with self._lock:
            until = self._suspects.get(replica)
            if until is None:
                return False
            if until < time.monotonic():
                del self._suspects[replica]
                return False
            return True

    # ----------------------------------------------------------- ingress side
    async def refresh(self) -> None:
        """Open a proxy for every member without one, close those of departed replicas (ingress loop)."""
        with self._lock:
            closing, self._closing = self._closing, []
            todo = [(r, e) for r, e in self._members.items()
                    if e is not None and r not in self._caches and not self.cannot_open(r)]
        for cache in closing:
            await self._close(cache)
        if todo:
            await asyncio.gather(*(self.ensure(r, e) for r, e in todo))

    def cannot_open(self, replica: str) -> bool:
        """Opening the replica's mirror failed within the last few seconds (it is not tried again sooner)."""
        failed = self._open_failed.get(replica)
        return failed is not None and time.monotonic() - failed < 5.0

    async def ensure(self, replica: str, endpoints: ServerEndpoints | Mapping[str, Any] | None) -> ReplicaCache | None:
        """The replica's cache, opening its proxy first if needed; None if it cannot be opened now."""
        if not isinstance(endpoints, ServerEndpoints):
            endpoints = ServerEndpoints.from_metadata(endpoints)
        cache = self.cache(replica)
        if cache is not None or endpoints is None or self.cannot_open(replica):
            return cache  # a failed open is retried after a pause, not on every request sent there
        pending = self._opening.get(replica)
        if pending is None:
            pending = asyncio.ensure_future(self._open(replica, endpoints))
            self._opening[replica] = pending
        try:
            return await asyncio.shield(pending)
        finally:
            if pending.done():
                self._opening.pop(replica, None)

    async def _open(self, replica: str, endpoints: ServerEndpoints) -> ReplicaCache | None:
        from contextpilot_engine.integration.kv_events import EventSource
        from contextpilot_engine.proxy import Proxy, ProxyConfig, ProxyStartError

        events = EventSource(endpoints.kv_events, endpoints.kv_replay) if endpoints.kv_events else None
        config = ProxyConfig(backend=endpoints.url, events=events, block_size=endpoints.block_size,
                             model_path=endpoints.model_path, tokenizer=self.tokenizer, options=self.options)
        try:
            proxy = await Proxy.open(config)
        except (ProxyStartError, OSError) as exc:
            self._open_failed[replica] = time.monotonic()
            log.warning("contextpilot routing: cannot mirror replica %s at %s: %s", replica, endpoints.url, exc)
            return None
        cache = ReplicaCache(replica, endpoints, proxy)
        with self._lock:
            gone = replica not in self._members and replica in self.departed
            if not gone:
                if replica not in self._members:
                    self._members[replica] = endpoints  # known from a selection before the router published it
                self._caches[replica] = cache
        if gone:  # it left while its proxy was opening: nothing to mirror any more
            await self._close(cache)
            return None
        self._open_failed.pop(replica, None)
        return cache

    async def _close(self, cache: ReplicaCache) -> None:
        try:
            await cache.proxy.close()
        except Exception as exc:  # closing is best effort
            log.info("contextpilot routing: closing replica %s: %s", cache.replica, exc)

    async def close(self) -> None:
        with self._lock:
            caches = list(self._caches.values()) + self._closing
            self._caches.clear()
            self._closing = []
        for cache in caches:
            await self._close(cache)

    def stats(self) -> dict:
        with self._lock:
            caches = dict(self._caches)
            members = list(self._members)
            suspects = [r for r, t in self._suspects.items() if t > time.monotonic()]
        return {"members": members, "suspects": suspects, "departed": list(self.departed),
                "replicas": {r: c.stats() for r, c in caches.items()}}


_registry: dict[tuple, ReplicaSet] = {}
_registry_lock = threading.Lock()


def register_replica_set(key: tuple, replica_set: ReplicaSet) -> None:
    """Make ``replica_set`` the one the router of deployment ``key`` (app name, deployment name) uses."""
    with _registry_lock:
        _registry[key] = replica_set


def find_replica_set(key: tuple) -> ReplicaSet | None:
    with _registry_lock:
        return _registry.get(key)
