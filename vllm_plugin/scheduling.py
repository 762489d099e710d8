"""Cache-aware waiting queue (option ``cache_aware_scheduling``, off by default).

vLLM admits waiting requests first come, first served.  When many requests
wait, admitting the ones whose prompt prefix is already in the KV cache first
saves prefill work *before* those cached blocks are evicted to make room for
cold requests.  :class:`CacheAwareQueue` replaces the scheduler's FCFS
``waiting`` queue with one that, at every ``peek_request``, looks at the first
``scheduling_window`` waiting requests and picks the one with the longest
cached prefix (ties: the oldest), measured on the live block pool with the
request's own block hashes.

Starvation is bounded by aging: each time a request is admitted ahead of
older ones, each of those older requests is *overtaken* once; a request that
has been overtaken ``max_overtakes`` times goes next, whatever its cache hit.
So a cold request waits for at most ``max_overtakes`` extra admissions.
A request vLLM pops and puts back in the same step (it could not be
scheduled: LoRA slots full, waiting for its grammar or remote KV; vLLM
prepends those together at the end of the step) was not admitted: the
pop's counts are undone.  A preempted running request, prepended alone,
was admitted: nothing is undone.

The queue is an :class:`vllm.v1.core.sched.request_queue.FCFSRequestQueue`
subclass, so every other use of the deque by the scheduler keeps working;
``peek_request`` and ``pop_request`` agree on the chosen request until the
queue changes.  Only the FCFS policy is replaced (the priority policy has its
own order, which the plugin respects).  A failure while choosing falls back
to plain FCFS for that decision.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Iterable

from contextpilot_engine.integration.failopen import report_failure

__all__ = ["make_cache_aware_queue"]

_MAX_SCAN_BLOCKS = 8192
#: recent pops remembered for undoing (vLLM puts back at most a step's worth)
_MAX_POPPED = 4096


def make_cache_aware_queue(pool: Any, window: int, max_overtakes: int, group_id: int = 0, items: Iterable = ()):
    """A CacheAwareQueue over ``pool`` holding ``items`` (the scheduler's current waiting requests)."""
    from vllm.v1.core.sched.request_queue import FCFSRequestQueue

    class CacheAwareQueue(FCFSRequestQueue):
        def __init__(self, initial: Iterable = ()):
            super().__init__(initial)
            self._pool = pool
            self._window = window
            self._max_overtakes = max_overtakes
            self._group = [group_id]
            self._peeked = None
            self._overtaken: dict[str, int] = {}
            #: what each recent pop changed, by request id, undone if vLLM puts the request back
            #: (it pops requests it cannot schedule this step, then prepends them): bounded
            self._popped: OrderedDict[str, tuple[int, list[str], bool, bool]] = OrderedDict()
            #: admissions that overtook at least one older request, and forced by the aging bound
            self.reordered = 0
            self.forced = 0

        # ---------------------------------------------------------- choice
        def cached_blocks(self, request: Any) -> int:
            """Leading blocks of ``request`` whose hash is in the cache right now."""
            get = self._pool.get_cached_block
            group = self._group
            n = 0
            for block_hash in request.block_hashes[:_MAX_SCAN_BLOCKS]:
                if get(block_hash, group) is None:
                    break
                n += 1
            return n

        def _choose(self) -> int:
            best_i, best = 0, -1
            overtaken = self._overtaken
            for i in range(min(len(self), self._window)):
                request = self[i]
                if overtaken.get(request.request_id, 0) >= self._max_overtakes:
                    return i  # aging bound reached: the oldest such request goes now
                score = self.cached_blocks(request)
                if score > best:
                    best_i, best = i, score
            return best_i

        def _position(self, request: Any) -> int:
            for i, r in enumerate(self):
                if r is request:
                    return i
            return -1

        def peek_request(self):
            if not self:
                raise IndexError("peek from an empty queue")
            peeked = self._peeked
            if peeked is None or self._position(peeked) < 0:
                try:
                    peeked = self[self._choose()]
                except Exception as exc:  # fail open: FCFS
                    report_failure("scheduling_error", exc)
                    peeked = self[0]
                self._peeked = peeked
            return peeked

        def pop_request(self):
            request = self.peek_request()
            i = self._position(request)
            overtaken = self._overtaken
            bumped: list[str] = []
            if i > 0:
                self.reordered += 1
                for j in range(i):
                    rid = self[j].request_id
                    overtaken[rid] = overtaken.get(rid, 0) + 1
                    bumped.append(rid)
            count = overtaken.pop(request.request_id, 0)
            forced = count >= self._max_overtakes and i >= 0
            self.forced += forced
            self._popped[request.request_id] = (count, bumped, i > 0, forced)
            while len(self._popped) > _MAX_POPPED:
                self._popped.popitem(last=False)
            del self[i]
            self._peeked = None
            return request

        def _put_back(self, request: Any) -> None:
            """vLLM returns a request it popped but could not schedule: the pop did not happen."""
            undo = self._popped.pop(request.request_id, None)
            if undo is None:
                return
            count, bumped, reordered, forced = undo
            overtaken = self._overtaken
            if count:
                overtaken[request.request_id] = count
            for rid in bumped:
                left = overtaken.get(rid, 0) - 1
                if left > 0:
                    overtaken[rid] = left
                else:
                    overtaken.pop(rid, None)
            self.reordered -= reordered
            self.forced -= forced

        # ------------------------------------- mutations invalidate the choice
        def add_request(self, request) -> None:
            self._peeked = None
            super().add_request(request)

        def prepend_request(self, request) -> None:  # a preempted running request: it was admitted, and stays so
            self._peeked = None
            super().prepend_request(request)

        def prepend_requests(self, requests) -> None:  # the requests a step popped but skipped
            self._peeked = None
            requests = list(requests)
            for r in requests:
                self._put_back(r)
            self._popped.clear()  # the step's other pops were admissions
            super().prepend_requests(requests)

        def remove_request(self, request) -> None:
            self._peeked = None
            self._overtaken.pop(request.request_id, None)
            super().remove_request(request)

        def remove_requests(self, requests) -> None:
            self._peeked = None
            requests = list(requests)
            for r in requests:
                self._overtaken.pop(r.request_id, None)
            super().remove_requests(requests)

    return CacheAwareQueue(items)


def install_cache_aware_queue(scheduler: Any, options: Any) -> bool:
    """Swap ``scheduler.waiting`` for a CacheAwareQueue; False when the policy is not FCFS."""
    from vllm.v1.core.sched.request_queue import FCFSRequestQueue, SchedulingPolicy

    if getattr(scheduler, "policy", None) != SchedulingPolicy.FCFS or not isinstance(
        scheduler.waiting, FCFSRequestQueue
    ):
        from contextpilot_engine.integration.failopen import logger

        logger.warning(
            "contextpilot: cache_aware_scheduling needs --scheduling-policy fcfs; keeping vLLM's %s queue",
            getattr(scheduler, "policy", "?"),
        )
        return False
    pool = scheduler.kv_cache_manager.block_pool
    scheduler.waiting = make_cache_aware_queue(
        pool, options.scheduling_window, options.max_overtakes, items=list(scheduler.waiting)
    )
    return True
