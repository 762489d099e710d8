"""Per-engine state, found by the engine's identity, in each process of the engine.

Engines split over processes: the request path (API server, renderer,
tokenizer) and the cache (vLLM's engine core, SGLang's scheduler) usually run
in different processes, and in one process only for in-process engines (an
offline vLLM ``LLM`` with ``VLLM_ENABLE_V1_MULTIPROCESSING=0``).  Both halves
know the engine by the same identity (the adapter derives it from the
engine's configuration), so that id keys everything kept per engine:

* in one process, both halves find the same :class:`EngineState` and share
  one :class:`~contextpilot_engine.index.ContextIndex`: the request path reads
  the very object the cache hooks update, so the mirror has no lag;
* in two processes, each half has its own state; the cache side publishes
  page events on a Unix socket whose path is derived from the same id
  (:func:`socket_path`) and the request side applies them (:mod:`.channel`).

A state remembers the process that made it: after a ``fork`` the child sees
the parent's registry, and must not mistake the parent's state for its own.
The registry keeps the most recent engines only, so a long-lived process that
builds many engines does not grow without bound.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict, deque
from typing import TYPE_CHECKING, Any

from contextpilot_engine.index import ContextIndex

from .binder import Binder
from .binding import TokenByteTable
from .options import PluginOptions

if TYPE_CHECKING:
    from contextpilot_engine.pilot import ContextPilot

    from .channel import ChannelServer, ChannelSubscriber
    from .mirror import PageMirror

__all__ = ["EngineState", "get_state", "find_state", "socket_path", "LagStats"]

_MAX_STATES = 64
_registry: "OrderedDict[str, EngineState]" = OrderedDict()
_registry_lock = threading.Lock()


def _reset_after_fork() -> None:
    global _registry_lock
    _registry_lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_after_fork)


def socket_path(key: str, dp_rank: int = 0) -> str:
    """The name the cache side of engine ``key`` publishes its page events on.

    An abstract-namespace Unix socket (the name starts with a NUL byte): it
    has no file, so nothing is left behind when an engine process is killed,
    and the name is unique per user and engine identity.
    """
    name = f"contextpilot-{os.getuid()}-{key}-dp{dp_rank}"
    if len(name) > 100:  # the socket name limit is 107 bytes
        name = "contextpilot-" + hashlib.sha1(name.encode()).hexdigest()
    return "\0" + name


class LagStats:
    """Mirror lag as seen by the request path: time from a cache change to its index update."""

    def __init__(self, keep: int = 100_000):
        self._lock = threading.Lock()
        self.samples: deque[float] = deque(maxlen=keep)
        #: the same, for batches that carried at least one removal (an eviction or a reset)
        self.removal_samples: deque[float] = deque(maxlen=keep)
        self.events = 0
        self.batches = 0

    def add(self, seconds: float, events: int, removals: int = 0) -> None:
        with self._lock:
            self.samples.append(seconds)
            if removals:
                self.removal_samples.append(seconds)
            self.events += events
            self.batches += 1

    @staticmethod
    def _stats(samples) -> dict:
        data = sorted(samples)
        if not data:
            return {"n": 0}

        def pct(p: float) -> float:
            return data[min(len(data) - 1, int(p * len(data)))]

        return {"n": len(data), "mean_s": sum(data) / len(data), "p50_s": pct(0.50), "p99_s": pct(0.99),
                "max_s": data[-1]}

    def summary(self) -> dict:
        """``{"batches", "events", "all": stats, "removals": stats}`` (stats: n, mean/p50/p99/max seconds)."""
        with self._lock:
            return {
                "batches": self.batches,
                "events": self.events,
                "all": self._stats(self.samples),
                "removals": self._stats(self.removal_samples),
            }


class EngineState:
    """What contextpilot keeps for one engine in one process."""

    def __init__(self, key: str, options: PluginOptions, page_size: int | None):
        self.key = key
        self.options = options
        self.pid = os.getpid()
        self.index = ContextIndex(options.pilot.index_limits)
        if page_size:
            self.index.attach_engine(page_size)
        self.lock = threading.RLock()
        #: the engine's cache is mirrored into ``index`` by hooks in this very process
        self.engine_local = False
        #: cache side: the mirror attached to the engine's cache
        self.mirror: PageMirror | None = None
        #: cache side in another process than the request path: the publisher
        self.server: ChannelServer | None = None
        #: request side: the subscriber thread when the cache is in another process
        self.subscriber: ChannelSubscriber | None = None
        #: request side: the ContextPilot doing reorder and dedup against ``index``
        self.pilot: ContextPilot | None = None
        #: request side: byte lengths of the tokenizer's vocabulary, to bind prompts from token ids alone
        #: (None: not a byte-level vocabulary, prompts are bound from the tokenizer's offsets)
        self.token_table: TokenByteTable | None = None
        #: the table located the tokens of one served prompt exactly as the tokenizer's offsets did
        self.token_table_verified = False
        #: request side: the last reports (what was done per request), newest last
        self.reports: deque[dict] = deque(maxlen=1000)
        #: request side: mirror lag of the cross-process channel
        self.lag = LagStats()
        #: request side: seconds each request spent in contextpilot before the engine got its tokens
        self.overhead: deque[float] = deque(maxlen=100_000)
        self._binder: Binder | None = None
        #: request side: the arrival window (:mod:`.arrivals`) per event loop
        self.arrival_windows: dict = {}

    @property
    def binder(self) -> Binder:
        """The request side's binder (its thread starts on first use, in the process that uses it)."""
        if self._binder is None:
            with self.lock:
                if self._binder is None:
                    self._binder = Binder(f"contextpilot-binder-{self.key}")
        return self._binder

    def page_size(self) -> int | None:
        return self.index.page_size

    def pilot_for(self, tokenizer: Any) -> "ContextPilot":
        """The request side's ContextPilot, made on first use with the engine's tokenizer.

        Its token counts come from the prompts the engine tokenizes anyway: a
        block never seen is weighed by a character estimate until its first
        served prompt teaches the exact count (see :func:`.rewriting.finish`).
        """
        pilot = self.pilot
        if pilot is None:
            with self.lock:
                if self.pilot is None:
                    from contextpilot_engine.pilot import ContextPilot
                    from contextpilot_engine.token_counts import CachedTokenCounter

                    counter = None
                    if tokenizer is not None:
                        counter = CachedTokenCounter(tokenizer, estimate_unseen=True)
                        self.token_table = TokenByteTable.shared(tokenizer)
                    self.pilot = ContextPilot(config=self.options.pilot, index=self.index, tokenizer=counter)
                pilot = self.pilot
        return pilot

    def ensure_channel(self) -> None:
        """Start mirroring a cache that lives in another process (once; again if the thread ended)."""
        if self.engine_local or self.options.channel != "auto":
            return
        sub = self.subscriber
        if sub is not None and sub.alive:
            return
        with self.lock:
            if self.subscriber is not None and self.subscriber.alive:
                return
            from .channel import ChannelSubscriber

            self.subscriber = ChannelSubscriber(socket_path(self.key, 0), self.index, self.lag).start()

    def close(self) -> None:
        """Stop this state's channel threads and remove its socket (best effort)."""
        for part in (self.subscriber, self.server):
            if part is None:
                continue
            try:
                part.close()
            except Exception:  # closing is best effort
                pass


def find_state(key: str) -> EngineState | None:
    """The state this process made for engine ``key`` (None if none, or only a forked parent's)."""
    with _registry_lock:
        state = _registry.get(key)
        if state is not None and state.pid != os.getpid():
            return None
        return state


def get_state(key: str, options: PluginOptions, page_size: int | None = None) -> EngineState:
    """This process's state for engine ``key``, made on first use."""
    with _registry_lock:
        state = _registry.get(key)
        if state is None or state.pid != os.getpid():
            state = EngineState(key, options, page_size)
            _registry[key] = state
            while len(_registry) > _MAX_STATES:
                _, old = _registry.popitem(last=False)
                old.close()
        else:
            _registry.move_to_end(key)
        return state
