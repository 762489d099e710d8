"""Per-engine plugin state, found by the engine's identity.

vLLM splits an engine over processes: the API server (renderer, tokenizer)
and the engine core (scheduler, block pool) run in different processes unless
``VLLM_ENABLE_V1_MULTIPROCESSING=0`` puts an offline ``LLM``'s engine core in
the caller's process.  Both halves carry the same ``VllmConfig``, whose
``instance_id`` names the engine (vLLM appends ``_dp<rank>`` for data-parallel
ranks), so that id is the key of everything the plugin keeps per engine:

* in one process, both halves find the same :class:`EngineState` and share
  one :class:`~contextpilot_engine.index.ContextIndex`: the request path reads
  the very object the block-pool hooks update, so the mirror has no lag;
* in two processes, each half has its own state; the engine core publishes
  page events on a Unix socket whose path is derived from the same id
  (:func:`socket_path`) and the API server applies them (:mod:`.channel`).

A state remembers the process that made it: after a ``fork`` the child sees
the parent's registry, and must not mistake the parent's state for its own.
The registry keeps the most recent engines only, so a long-lived process that
builds many engines does not grow without bound.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections import OrderedDict, deque
from typing import Any

from .options import PluginOptions

__all__ = ["EngineState", "engine_key", "get_state", "find_state", "socket_path", "LagStats"]

_MAX_STATES = 64
_registry: "OrderedDict[str, EngineState]" = OrderedDict()
_registry_lock = threading.Lock()


def _reset_after_fork() -> None:
    global _registry_lock
    _registry_lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_after_fork)


def engine_key(vllm_config: Any) -> tuple[str, int]:
    """``(engine id, data-parallel rank)`` of a config; the id is shared by the engine's processes."""
    instance = str(getattr(vllm_config, "instance_id", "") or "")
    base, sep, rank = instance.rpartition("_dp")
    if sep and rank.isdigit():
        return base, int(rank)
    return instance, 0


def socket_path(key: str, dp_rank: int = 0) -> str:
    """Where the engine core of engine ``key`` publishes its page events.

    Unix socket paths are limited to about 107 bytes; a long ``TMPDIR`` falls back to ``/tmp``.
    """
    name = f"contextpilot-{os.getuid()}-{key}-dp{dp_rank}.sock"
    path = os.path.join(tempfile.gettempdir(), name)
    return path if len(path.encode()) <= 100 else os.path.join("/tmp", name)


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
    """What the plugin keeps for one engine in one process."""

    def __init__(self, key: str, options: PluginOptions, page_size: int | None):
        from contextpilot_engine.index import ContextIndex

        self.key = key
        self.options = options
        self.pid = os.getpid()
        self.index = ContextIndex(options.pilot.index_limits)
        if page_size:
            self.index.attach_engine(page_size)
        self.lock = threading.RLock()
        #: the engine core's block pool is mirrored into ``index`` by hooks in this very process
        self.engine_local = False
        #: engine side: the mirror attached to the block pool (see .mirror)
        self.mirror = None
        #: engine side in another process: the publisher (see .channel)
        self.server = None
        #: request side: the subscriber thread when the engine core is in another process
        self.subscriber = None
        #: request side: the ContextPilot doing reorder and dedup against ``index``
        self.pilot = None
        #: request side: the last reports (what was done per request), newest last
        self.reports: deque[dict] = deque(maxlen=1000)
        #: request side: mirror lag of the cross-process channel
        self.lag = LagStats()

    def page_size(self) -> int | None:
        return self.index.page_size


def find_state(key: str) -> EngineState | None:
    """The state this process made for engine ``key`` (None if none, or only a forked parent's)."""
    with _registry_lock:
        state = _registry.get(key)
        if state is not None and state.pid != os.getpid():
            return None
        return state


def get_state(vllm_config: Any, options: PluginOptions, page_size: int | None = None) -> EngineState:
    """This process's state for the engine of ``vllm_config``, made on first use."""
    key, _ = engine_key(vllm_config)
    with _registry_lock:
        state = _registry.get(key)
        if state is None or state.pid != os.getpid():
            if page_size is None:
                page_size = getattr(getattr(vllm_config, "cache_config", None), "block_size", None)
            state = EngineState(key, options, page_size)
            _registry[key] = state
            while len(_registry) > _MAX_STATES:
                _, old = _registry.popitem(last=False)
                _close(old)
        else:
            _registry.move_to_end(key)
        return state


def _close(state: EngineState) -> None:
    for part in (state.subscriber, state.server):
        stop = getattr(part, "close", None)
        if stop is not None:
            try:
                stop()
            except Exception:  # closing is best effort
                pass
