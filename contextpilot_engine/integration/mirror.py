"""Engine side: keep a Context Index equal to the engine's cached pages, in the same call.

An engine's own KV events are queued and published late (vLLM once per
engine step, SGLang after prefill batches and every few decode steps), so a
consumer is always behind.  The adapters therefore hook the few cache methods
that change the set of cached pages and report each change here before the
engine's method returns; :class:`PageMirror` translates engine hashes to
canonical page keys (:class:`.engine_keys.EngineKeyMap`) and updates the
index at once.

*Scopes*: an adapter wraps each engine call that may change many pages
(caching a request's blocks, an eviction pass, a reset) in
:meth:`PageMirror.begin` / :meth:`PageMirror.end`.  The events of the
outermost call leave for a publisher in another process (the channel) as one
batch when it returns, so a batch never shows a half-done change; a change
outside any scope is published at once.  A hash removed inside a scope and
stored again in the same scope keeps its canonical key (vLLM's
``move_block_hashes``).

If a hook fails, the adapter calls :meth:`PageMirror.disable`: the mirror
switches itself off and empties the index, so the request side stops
trusting a stale view; the engine's cache itself is never affected.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Hashable, Protocol, Sequence

from contextpilot_engine.index import ContextIndex

from . import metrics
from .channel import CLEARED, REMOVED, STORED
from .engine_keys import EngineKeyMap
from .failopen import logger, report_failure

__all__ = ["PageMirror", "PagePublisher"]


class PagePublisher(Protocol):
    """Where a mirror sends its page events besides its own index (the cross-process channel)."""

    def sink(self, op: int, key: int) -> None: ...

    def flush(self) -> None: ...


class PageMirror:
    """Canonical view of one engine cache's pages, pushed into a ContextIndex.

    ``publisher`` (optional) receives every page event through
    ``sink(op, key)`` after the index has it, and ``flush()`` when the
    outermost scope that produced events ends.  ``update_seconds`` sums the
    time spent updating the index inside the hooks: the whole cost (and lag)
    of an in-process mirror.
    """

    def __init__(self, index: ContextIndex, page_size: int, publisher: PagePublisher | None = None):
        self.index = index
        self.page_size = page_size
        self.publisher = publisher
        #: serialises mirror updates against a subscriber's snapshot (see .channel)
        self.lock = threading.Lock()
        self.keys = EngineKeyMap()
        self._scopes: list[Any] = []  # the engine calls in progress (their subject, e.g. a request, or None)
        #: hashes removed during the current scope, so a re-insert keeps its key
        self._recent: dict[Hashable, int] = {}
        self.enabled = True
        self.unattributed = 0
        self.updates = 0
        self.update_seconds = 0.0

    # -------------------------------------------------------------- scopes
    def begin(self, subject: Any = None) -> None:
        """An engine call that may change pages starts (``subject``: whose pages it caches, if any)."""
        self._scopes.append(subject)

    def end(self) -> None:
        if self._scopes:
            self._scopes.pop()
        if not self._scopes:
            self._recent.clear()
            self._flush()

    def subject(self) -> Any:
        """The innermost scope's subject that is not None (the request being cached), or None."""
        for subject in reversed(self._scopes):
            if subject is not None:
                return subject
        return None

    def _flush(self) -> None:
        publisher = self.publisher
        if publisher is not None:
            try:
                publisher.flush()
            except Exception as exc:  # the channel is best effort; the engine goes on
                report_failure("channel_error", exc)

    def known(self, engine_hash: Hashable) -> int | None:
        """The canonical key of a hash cached now or removed earlier in this scope."""
        known = self.keys.canonical(engine_hash)
        return known if known is not None else self._recent.get(engine_hash)

    # --------------------------------------------------------------- events
    def stored(self, engine_hash: Hashable, canonical: int | None, started: float | None = None) -> None:
        """One more cached copy of a page; ``canonical`` None means the adapter could not name its tokens.

        ``started`` (``time.perf_counter()``) is when the adapter began working
        out ``canonical``, so :attr:`update_seconds` includes that work.
        """
        start = time.perf_counter() if started is None else started
        if canonical is None:
            self.unattributed += 1
            if self.unattributed == 1:
                logger.warning(
                    "contextpilot: a page was cached outside any request context; the mirror cannot "
                    "name its tokens and leaves it out (reported once)"
                )
            return
        with self.lock:
            self.keys.add(engine_hash, canonical)
            self.index.pages_stored((canonical,))
            if self.publisher is not None:
                self.publisher.sink(STORED, canonical)
        self._count(start, stored=1)

    def stored_chain(
        self,
        engine_hashes: Sequence[Hashable],
        parent_engine_hash: Hashable | None,
        token_ids: Sequence[int],
        salt: object = None,
        parent_canonical: int | None = None,
    ) -> None:
        """Consecutive pages stored under a parent page (radix caches, KV events)."""
        start = time.perf_counter()
        with self.lock:
            keys = self.keys.store_chain(
                engine_hashes, parent_engine_hash, token_ids, self.page_size, salt, parent_canonical
            )
            if keys is None:
                self.unattributed += len(engine_hashes)
                return
            self.index.pages_stored(keys)
            if self.publisher is not None:
                for key in keys:
                    self.publisher.sink(STORED, key)
        self._count(start, stored=len(keys))

    def removed(self, engine_hashes: Sequence[Hashable]) -> None:
        """One cached copy fewer of each page (hashes the mirror never saw are ignored)."""
        if not engine_hashes:
            return
        start = time.perf_counter()
        with self.lock:
            if self._scopes:
                for h in engine_hashes:
                    c = self.keys.canonical(h)
                    if c is not None:
                        self._recent[h] = c
            removed = self.keys.remove(engine_hashes)
            if removed:
                self.index.pages_removed(removed)
                if self.publisher is not None:
                    for canonical in removed:
                        self.publisher.sink(REMOVED, canonical)
        self._count(start, removed=len(removed))

    def cleared(self) -> None:
        with self.lock:
            self.keys.clear()
            self._recent.clear()
            self.index.pages_cleared()
            if self.publisher is not None:
                self.publisher.sink(CLEARED, 0)
        if self.publisher is None:
            metrics.count_mirror_events(cleared=1)
        if not self._scopes:
            self._flush()

    def _count(self, start: float, stored: int = 0, removed: int = 0) -> None:
        self.updates += 1
        self.update_seconds += time.perf_counter() - start
        if self.publisher is None:  # the index updated is the request side's (a published one is counted there)
            metrics.count_mirror_events(stored=stored, removed=removed)
        if not self._scopes:  # a change outside any scope: publish it now
            self._flush()

    def disable(self, reason: BaseException) -> None:
        """Stop mirroring after a failure; the index then claims nothing is cached."""
        self.enabled = False
        try:
            self.cleared()
        except Exception:  # the index itself is broken; nothing more to do
            pass

    # ----------------------------------------------------------- inspection
    def canonical_counts(self) -> dict[int, int]:
        """Canonical key -> copies, from the mirror's own hash table (for checks)."""
        with self.lock:
            return self.keys.canonical_counts()

    def canonical_counts_unlocked(self) -> dict[int, int]:
        """:meth:`canonical_counts` for a caller that already holds :attr:`lock`."""
        return self.keys.canonical_counts()

    def engine_hash_map(self) -> dict[Hashable, int]:
        with self.lock:
            return self.keys.hash_map()
