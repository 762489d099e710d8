"""What the proxy believes the engine caches: a mirror of its KV events, or a model when there are none.

Two integration states (:class:`~contextpilot_engine.integration.state.EngineState`),
each with its own Context Index and ContextPilot:

* **mirrored**: an index attached to the engine's page size and driven
  only by the engine's KV events through a
  :class:`~contextpilot_engine.integration.mirror.PageMirror`; served
  prompts are bound to it from their token ids, so ``expected_cached_tokens``
  is what the engine will find, page for page;
* **modelled**: an index without an engine, which models the cache by its
  token capacity with least-recently-used eviction (``capacity_tokens``).
  It is approximate: the engine's real capacity, other clients and the
  engine's own eviction order are unknown to it.

Planning uses the mirrored state while the event stream is linked and
resynced, the modelled one otherwise (no events configured, the publisher
not connected yet, or the stream dropped); every switch is logged.  A
backend that stops answering may be restarting, with an empty cache, while
its event stream still looks linked (a forwarder in between); so when the
backend is unreachable the mirror is set aside too, and once the backend
answers again it is rebuilt from the engine's replay buffer before it is
trusted again.

**Calibration.**  The modelled cache's capacity is unknown (the engine's
size, its other clients), so it is fitted to what the engine reports
(:meth:`CacheView.calibrate`): a response with clearly fewer cached tokens
than the model promised means the engine holds less than the model, and the
tenant's modelled capacity shrinks to below what the model held; one with
more, while the model was full, lets it grow back (never beyond
``capacity_tokens``).

**Settling.**  An engine publishes the events of a scheduler step after
the step, on another socket than the response, so a response can reach the
proxy just before the events of its last step.  Before planning a request
when nothing else is in flight at the backend, :meth:`CacheView.settle`
waits until the stream has been quiet for a short time after the last
response (bounded), so a client that sends one request after another is
planned against every event its previous requests caused.  Under
concurrent load the stream never goes quiet and nothing waits: the mirror
is then as fresh as the events that have arrived.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from contextpilot_engine.integration import metrics as integration_metrics
from contextpilot_engine.integration.mirror import PageMirror
from contextpilot_engine.integration.options import PluginOptions
from contextpilot_engine.integration.state import EngineState

from . import metrics
from contextpilot_engine.integration.kv_wire import BatchEffect, EventBatch, apply_batch
from .page_hits import CachedPages

__all__ = ["CacheView", "SettlePolicy"]

log = logging.getLogger("contextpilot.proxy")


@dataclass(frozen=True)
class SettlePolicy:
    """How long planning waits for the events of the previous request (see the module docstring)."""

    #: the stream counts as settled after this long without a batch since the last response
    quiet_s: float = 0.01
    #: never wait longer than this after the last response
    max_wait_s: float = 0.1


def _state(name: str, options: PluginOptions, page_size: int | None) -> EngineState:
    state = EngineState(name, options, page_size)
    state.engine_local = True  # no cross-process channel: the proxy feeds the index itself
    return state


class CacheView:
    """The two states, which one plans, the event sink, and the settling of the stream."""

    def __init__(self, options: PluginOptions, page_size: int | None, events: bool,
                 settle: SettlePolicy = SettlePolicy(), source_name: str = ""):
        self.options = options
        self.page_size = page_size
        self.settle_policy = settle
        self.source_name = source_name
        self.modelled = _state("proxy-modelled", options, None)
        self.mirrored: EngineState | None = None
        self.mirror: PageMirror | None = None
        #: the canonical keys of every page the engine holds (the mirror's publisher)
        self.cached_pages = CachedPages()
        if events:
            if not page_size:
                raise ValueError("a mirror of KV events needs the engine's page size")
            self.mirrored = _state("proxy-mirrored", options, page_size)
            self.mirror = PageMirror(self.mirrored.index, page_size, publisher=self.cached_pages)
            self.mirrored.mirror = self.mirror
        self._linked = False
        #: the backend was unreachable since the last resync: the mirror may describe a cache that is gone
        self._suspect = False
        #: asks the event subscriber for a resync (set by the proxy once the subscriber runs)
        self.request_resync: Callable[[str], None] | None = None
        self._lock = threading.Lock()
        self.in_flight = 0
        self.last_done = 0.0
        self.last_batch_at = 0.0
        self.effects = BatchEffect()
        self.mode_changes = 0
        self.settle_waits = 0
        self.settle_seconds = 0.0
        #: batches that arrived after a response while nothing was in flight (within the settle window)
        self.late_batches = 0
        self._wrong_size_reported = False
        #: modelled capacity changes from the engine's reports: (shrunk, grown)
        self.calibrations = [0, 0]
        metrics.set_mode(self.mode)

    # ---------------------------------------------------------------- modes
    @property
    def mode(self) -> str:
        return "events" if self._trusted() else "modelled"

    def _trusted(self) -> bool:
        return self._linked and not self._suspect and self.mirrored is not None

    def active(self) -> EngineState:
        """The state the next request is planned against."""
        mirrored = self.mirrored
        return mirrored if mirrored is not None and self._trusted() else self.modelled

    def backend_lost(self, reason: str) -> None:
        """The backend could not be reached: it may come back restarted, so stop trusting the mirror."""
        if self.mirrored is None or self._suspect:
            return
        self._suspect = True
        self.mode_changes += 1
        metrics.set_mode(self.mode)
        log.warning("contextpilot proxy: %s; planning against a modelled cache until the backend answers and its KV "
                    "events are resynced", reason)

    def backend_back(self) -> None:
        """The backend answered again after :meth:`backend_lost`: rebuild the mirror, then trust it."""
        if self._suspect and self.request_resync is not None:
            self.request_resync("the backend answers again after being unreachable")

    def states(self) -> list[EngineState]:
        return [s for s in (self.mirrored, self.modelled) if s is not None]

    # ------------------------------------------------------------ the sink
    def apply(self, seq: int, batch: EventBatch) -> None:
        mirror = self.mirror
        if mirror is None:
            return
        effect = apply_batch(mirror, batch)
        for name in ("stored", "removed", "cleared", "skipped", "wrong_size"):
            setattr(self.effects, name, getattr(self.effects, name) + getattr(effect, name))
        if effect.wrong_size and not self._wrong_size_reported:
            self._wrong_size_reported = True
            log.error("contextpilot proxy: the engine publishes pages of another size than the proxy's page size "
                      "(%d tokens); its pages are left out: start the proxy with the engine's --block-size",
                      self.page_size)
        lag = max(0.0, time.time() - batch.ts)
        integration_metrics.observe_lag(lag)
        assert self.mirrored is not None
        self.mirrored.lag.add(lag, effect.stored + effect.removed + effect.cleared, effect.removed + effect.cleared)
        metrics.count_batch()
        now = time.monotonic()
        if not self.in_flight and self.last_done and now - self.last_done < self.settle_policy.max_wait_s:
            self.late_batches += 1  # arrived after the last response, with nothing in flight: what settling is for
        self.last_batch_at = now

    def clear(self, reason: str) -> None:
        if self.mirror is not None:
            self.mirror.cleared()
        metrics.count_resync(reason.split(" ")[0] if reason else "")

    def link_up(self) -> None:
        if not self._trusted():
            self._linked = True
            self._suspect = False
            self.mode_changes += 1
            log.info("contextpilot proxy: KV event stream %s linked and resynced; planning against the engine's "
                     "cache", self.source_name)
        metrics.set_mode(self.mode)

    def link_down(self, reason: str) -> None:
        was = self._linked
        self._linked = False
        if was:
            self.mode_changes += 1
        log.warning("contextpilot proxy: %s; planning against a modelled cache (approximate: capacity and LRU, "
                    "expected_cached_tokens is an estimate) until the stream is back", reason)
        metrics.set_mode(self.mode)

    # ------------------------------------------------------------- settling
    def request_started(self) -> None:
        with self._lock:
            self.in_flight += 1

    def request_done(self) -> None:
        with self._lock:
            self.in_flight = max(0, self.in_flight - 1)
            self.last_done = time.monotonic()

    async def settle(self) -> float:
        """Wait (bounded) for the events of the requests that just finished; returns the seconds waited."""
        if self.mode != "events" or self.in_flight:
            return 0.0
        policy = self.settle_policy
        start = time.monotonic()
        deadline = self.last_done + policy.max_wait_s
        waited = False
        while True:
            now = time.monotonic()
            quiet_since = max(self.last_done, self.last_batch_at)
            left = min(quiet_since + policy.quiet_s, deadline) - now
            if left <= 0 or self.in_flight:
                break
            waited = True
            await asyncio.sleep(left)
        seconds = time.monotonic() - start
        if waited:
            self.settle_waits += 1
            self.settle_seconds += seconds
        return seconds

    # ----------------------------------------------------------- calibration
    #: a difference below this many tokens is the model's granularity, not a sign of the engine's capacity
    CALIBRATION_SLACK = 64
    #: the modelled capacity never shrinks below this many tokens
    CALIBRATION_FLOOR = 1024

    def calibrate(self, tenant: str, expected: int, reported: int) -> None:
        """Fit the modelled capacity of ``tenant`` to the engine's report for a request planned on the model."""
        state = self.modelled.index.peek(tenant)
        if state is None:
            return
        trie = state.trie
        ceiling = self.modelled.index.limits.capacity_tokens
        if expected - reported > self.CALIBRATION_SLACK:
            # the engine no longer had what the model holds: its capacity (for us) is below the model's content
            new = max(self.CALIBRATION_FLOOR, min(trie.capacity_tokens, int(trie.cached_tokens * 0.9)))
            if new < trie.capacity_tokens:
                trie.capacity_tokens = new
                self.calibrations[0] += 1
        elif reported - expected > self.CALIBRATION_SLACK and trie.cached_tokens >= 0.9 * trie.capacity_tokens:
            # the engine kept more than the full model: let the model hold more
            new = min(ceiling, int(trie.capacity_tokens * 1.25) + self.CALIBRATION_SLACK)
            if new > trie.capacity_tokens:
                trie.capacity_tokens = new
                self.calibrations[1] += 1

    # ---------------------------------------------------------------- reset
    def reset(self) -> None:
        """Forget what was served (trees, popularity, conversations); the mirror keeps the engine's pages."""
        for state in self.states():
            for tenant in state.index.tenant_names():
                state.index.drop_tenant(tenant)
            with state.lock:
                state.pilot = None  # a fresh ContextPilot (and conversation memory) on the next request

    def stats(self) -> dict:
        out = {
            "mode": self.mode,
            "mode_changes": self.mode_changes,
            "in_flight": self.in_flight,
            "settle_waits": self.settle_waits,
            "settle_seconds_total": round(self.settle_seconds, 6),
            "late_batches": self.late_batches,
            "calibration": {"shrunk": self.calibrations[0], "grown": self.calibrations[1]},
            "page_events": dict(self.effects.__dict__),
            "engine_pages": len(self.cached_pages),
            "engine_hashes": len(self.mirror.keys) if self.mirror is not None else None,
        }
        for name, state in (("mirrored", self.mirrored), ("modelled", self.modelled)):
            if state is None:
                continue
            pilot = state.pilot
            out[name] = {
                **state.index.stats(),
                "conversations": len(pilot.conversations) if pilot is not None else 0,
                "reports_kept": len(state.reports),
            }
        if self.mirrored is not None:
            out["mirror_lag"] = self.mirrored.lag.summary()
        return out
