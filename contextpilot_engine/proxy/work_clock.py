"""The proxy's own time per request: what it adds to a request, and how long it holds the event loop.

A request's wall time in the proxy is mostly waiting: for its body, for the
KV events to settle, for the backend, for other requests' turns on the
event loop.  None of that is the proxy's cost.  The work it does itself
(parsing, planning, tokenizing, serialising) runs in short synchronous
stretches; :class:`WorkClock` sums exactly those, so the ``overhead``
figures (``/stats``, ``contextpilot:proxy_overhead_seconds``) are the
proxy's cost per request and, since nothing else runs on the loop meanwhile,
also the longest it holds the loop for that request.

Both the wall time of those stretches (:attr:`WorkClock.seconds`) and the
CPU time the event-loop thread spent in them (:attr:`WorkClock.cpu_seconds`)
are summed: on a machine whose cores are shared, the wall time also holds
the moments the operating system ran another process instead; the CPU time
is the work itself.
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["WorkClock"]


class WorkClock:
    """Sums the time spent inside ``with clock:`` blocks: the proxy's own work on the event loop.

    Waiting (for the request body, the settling, the backend, other requests' turns on the loop) is
    outside every block, so the sum is what this request itself costs, and how long it holds the loop.
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self.cpu_seconds = 0.0
        self._depth = 0
        self._start = 0.0
        self._cpu_start = 0.0

    def __enter__(self) -> "WorkClock":
        if self._depth == 0:
            self._start = time.perf_counter()
            self._cpu_start = time.thread_time()
        self._depth += 1
        return self

    def __exit__(self, *exc: Any) -> None:
        self._depth -= 1
        if self._depth == 0:
            self.seconds += time.perf_counter() - self._start
            self.cpu_seconds += time.thread_time() - self._cpu_start

    def paused(self) -> "_Paused":
        return _Paused(self)


class _Paused:
    """Inside a clock's block, a stretch that is not the proxy's work (a round trip)."""

    def __init__(self, clock: WorkClock):
        self.clock = clock

    def __enter__(self) -> None:
        c = self.clock
        self.depth = c._depth
        if c._depth:
            c.seconds += time.perf_counter() - c._start
            c.cpu_seconds += time.thread_time() - c._cpu_start
            c._depth = 0

    def __exit__(self, *exc: Any) -> None:
        c = self.clock
        if self.depth:
            c._depth = self.depth
            c._start = time.perf_counter()
            c._cpu_start = time.thread_time()
