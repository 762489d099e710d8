"""Requests that reach the server together are planned together, and admitted in the planned order.

A client that sends a batch at once (``asyncio.gather`` over many chat
requests, the way an offline batch is served through an OpenAI server) puts
many requests in front of the renderer at the same moment.  Planned one by
one, each gets the best order against the cache as it is, but not against
the others: requests that share blocks nobody has cached yet each spell them
in the order their own evidence suggests, and reuse little of each other.
Planned jointly (:func:`.rewriting.prepare_group`, the batch planner of
``optimize_batch``), they share prefixes; admitted back to back, each reuses
the KV of the one before.

**The window.**  A request that carries no context blocks (a plain chat turn)
goes through at once and opens no group.  A request that arrives when no
other arrived in the last ``arrival_window_ms`` and no group is open or
being planned goes through at once: a lone request is never held.  One that
arrives within the window of the previous arrival opens a group, or joins
the open one.  The group closes when the window passes with no new arrival,
when it has been open ``arrival_max_wait_ms``, or when it holds
``arrival_max_group`` requests; it is then planned on a worker thread (the
event loop keeps accepting requests, which form the next group), and its
requests are released in admission order.

**A late timer is no quiet gap.**  When the timer that would close a group
fires later than it was due by more than ``arrival_window_ms``, the event
loop or the process was held up (another request's work, the machine's other
processes), and requests may be waiting unread in the server's sockets: the
group gets one more gap instead of closing.

**While the engine is busy** (a request this window planned earlier is still
rendering, queued or running, or a group is being planned) and the group is
a burst (most of its requests came within ``arrival_window_ms`` of the one
before) the quiet gap that closes a group is ``arrival_busy_window_ms``
instead.  A client's burst does not reach the server evenly: on a loaded
machine the server's own work (another request's rendering, the engine
client's steps) pauses the stream of arrivals, and a group cut at such a
pause is planned without the requests behind it, which then share little
with it (BENCHMARKS.md, the real-corpus trace through the vLLM server).
Holding the group a little longer costs its requests little then: they would
wait behind the requests already running.  Steady traffic on a busy engine is
no burst: its requests come a few ms apart, and the longer gap would hold
nearly every one of them for up to ``arrival_max_wait_ms``.  The adapter says
when a request's response is complete (:meth:`Ticket.completed`); a ticket
nobody holds any more counts as complete, so a lost call never leaves the
window believing the engine busy.

**Admission order.**  Each released request renders (templating and
tokenization run concurrently, as vLLM runs them) but returns from rendering
only after the request admitted before it has (:meth:`Ticket.finish`), so
the requests reach the engine's queue in the planned order.  A request that
fails or is cancelled still lets its successor go, and no request waits on
its predecessor longer than ``arrival_max_wait_ms``.

Everything here runs on the adapter's event loop; the only work that grows
with a group (planning it) runs off the loop.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Sequence

from .conversation import may_carry_blocks
from .requests import ContextPilotRequestError, RequestSpec
from .rewriting import Arrival, Prepared, failed_open, prepare, prepare_group
from .state import EngineState

__all__ = ["ArrivalWindow", "Ticket", "window_for", "completed_with"]


@dataclass(eq=False)
class Ticket:
    """One request's place in its group: what to render, and its turn to reach the engine."""

    #: what :func:`.rewriting.prepare` returns for it (None: render it unchanged)
    prepared: Prepared | None
    #: set when the request admitted before this one has finished rendering (None: no predecessor)
    _after: asyncio.Event | None = None
    #: set when this request has finished rendering (None: nobody waits on it)
    _done: asyncio.Event | None = None
    _max_wait_s: float = 0.0
    #: how many requests were planned together with this one (1: alone)
    group_size: int = 1
    #: the window that issued it: it counts the request as being served from its plan to its completion
    _window: "ArrivalWindow | None" = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self._window is not None:
            self._window._serving.add(self)  # planned: from now until completed() the engine has work

    async def finish(self) -> None:
        """Wait for the predecessor's turn (bounded), then let the successor go; call once, in ``finally``."""
        try:
            if self._after is not None and not self._after.is_set():
                try:
                    await asyncio.wait_for(self._after.wait(), self._max_wait_s)
                except asyncio.TimeoutError:
                    pass
        finally:
            if self._done is not None:
                self._done.set()

    def release(self) -> None:
        """The request will not be rendered (cancelled after its plan): let the successor go, and count it done."""
        if self._done is not None:
            self._done.set()
        self.completed()

    def completed(self) -> None:
        """The request's response is complete (or failed): the engine no longer works on it.  Idempotent."""
        window, self._window = self._window, None
        if window is not None:
            window._serving.discard(self)


@dataclass
class _Group:
    state: EngineState
    tokenizer: Any
    opened: float
    entries: list[tuple[Arrival, asyncio.Future]] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None
    #: when the last request joined, and how many of the gaps between joins were within the idle
    #: window (the first request joined within it of the arrival before, or it would have gone alone)
    last: float = 0.0
    short_gaps: int = 1

    def join(self, now: float, window_s: float) -> None:
        if self.entries:
            self.short_gaps += now - self.last <= window_s
        self.last = now

    def is_burst(self) -> bool:
        """Most of the group's requests came within the idle window of the one before."""
        return 2 * self.short_gaps > len(self.entries)


class ArrivalWindow:
    """The arrival groups of one engine state on one event loop (see the module docstring)."""

    def __init__(self, window_s: float, max_wait_s: float, max_group: int, busy_window_s: float):
        self.window_s = window_s
        self.max_wait_s = max_wait_s
        self.max_group = max_group
        #: the quiet gap that closes a group while the engine is busy (never shorter than ``window_s``)
        self.busy_window_s = max(window_s, busy_window_s)
        #: tickets planned and not completed: requests rendering, queued or running in the engine
        self._serving: "weakref.WeakSet[Ticket]" = weakref.WeakSet()
        self._last_arrival = float("-inf")
        self._open: _Group | None = None
        self._planning = 0
        #: requests planned in a group of more than one, and groups planned (for reports and tests)
        self.grouped_requests = 0
        self.groups = 0
        #: quiet gaps given again because the loop was held up past them (for reports and tests)
        self.rearmed = 0

    @property
    def serving(self) -> int:
        """Requests this window has planned whose responses are not complete yet."""
        return len(self._serving)

    async def arrive(
        self,
        state: EngineState,
        conversations: Sequence[Any],
        spec: RequestSpec | None,
        tokenizer: Any,
        sink: list | None = None,
    ) -> Ticket:
        """The request's plan and its admission ticket; raises :class:`ContextPilotRequestError` for bad client data."""
        if not any(may_carry_blocks(c, spec, state.options.implicit_documents) for c in conversations):
            # nothing to plan with others: never held, and no group opened for the requests after it
            return Ticket(prepare(state, conversations, spec, tokenizer, sink), _window=self)
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        last, self._last_arrival = self._last_arrival, now
        group = self._open
        if group is not None and group.tokenizer is not tokenizer:
            group = None  # another renderer's requests: never mixed
        lone = group is None and self._open is None and not self._planning and now - last > self.window_s
        if self.window_s <= 0 or lone or group is None and self._open is not None:
            try:
                return Ticket(prepare(state, conversations, spec, tokenizer, sink), _window=self)
            finally:
                # a request that arrived while this one was planned is concurrent with it
                self._last_arrival = time.monotonic()
        if group is None:
            group = self._open = _Group(state, tokenizer, now)
        future: asyncio.Future = loop.create_future()
        group.join(now, self.window_s)
        group.entries.append((Arrival(conversations, spec, sink), future))
        if group.timer is not None:
            group.timer.cancel()
        if len(group.entries) >= self.max_group:
            self._close(group)
        else:
            self._arm(loop, group, now)
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and future.exception() is None:
                future.result().release()  # planned, then cancelled before it resumed: its turn passes on
            raise

    def _arm(self, loop: asyncio.AbstractEventLoop, group: _Group, now: float) -> None:
        """Close ``group`` after a quiet gap from ``now`` (busy or idle), or when it has waited its longest."""
        busy = (self._serving or self._planning) and group.is_burst()
        quiet = self.busy_window_s if busy else self.window_s
        delay = max(0.0, min(quiet, group.opened + self.max_wait_s - now))
        group.timer = loop.call_later(delay, self._quiet, group, now + delay)

    def _quiet(self, group: _Group, due: float) -> None:
        """The quiet gap passed: close the group, unless the loop itself was held up past the gap.

        A timer that fires late means the event loop (or the whole process)
        was busy elsewhere: requests that arrived meanwhile wait in the
        server's sockets, unseen, and the gap was not quiet.  The group then
        gets one more gap, from now, to take them (never past its longest wait).
        """
        now = time.monotonic()
        if now - due > self.window_s and now < group.opened + self.max_wait_s:
            self.rearmed += 1
            self._arm(asyncio.get_running_loop(), group, now)
            return
        self._close(group)

    def _close(self, group: _Group) -> None:
        if self._open is group:
            self._open = None
        if group.timer is not None:
            group.timer.cancel()
            group.timer = None
        self._planning += 1
        asyncio.ensure_future(self._plan(group))

    async def _plan(self, group: _Group) -> None:
        entries = group.entries
        try:
            if len(entries) == 1:
                arrival, future = entries[0]
                results, order = [_safely_prepare(group, arrival)], [0]
            else:
                loop = asyncio.get_running_loop()
                results, order = await loop.run_in_executor(
                    None, prepare_group, group.state, [a for a, _ in entries], group.tokenizer
                )
                self.groups += 1
                self.grouped_requests += len(entries)
            if len(entries) > 1:
                _note_group(results, len(entries))
        except Exception as exc:  # prepare_group fails open itself; this is a bug in the window
            results = failed_open(group.state, [a for a, _ in entries], exc, reason="arrival_error")
            order = list(range(len(entries)))
        finally:
            self._planning -= 1
        previous: asyncio.Event | None = None
        for n in order:
            _, future = entries[n]
            done = asyncio.Event()
            result = results[n]
            if future.done():  # the request was cancelled while it waited
                done.set()
            elif isinstance(result, BaseException):
                done.set()
                future.set_exception(result)
            else:
                future.set_result(Ticket(result, previous, done, self.max_wait_s, len(entries), self))
            previous = done


def _note_group(results: list, size: int) -> None:
    """Say in each report how many other requests were planned with it."""
    for result in results:
        if isinstance(result, Prepared):
            for plan in result.plans:
                if plan is not None and plan.report.get("applied"):
                    plan.report["planned_with"] = size - 1


def _safely_prepare(group: _Group, arrival: Arrival) -> Prepared | None | ContextPilotRequestError:
    """:func:`.rewriting.prepare` for a request planned alone; the client's error is its result, not raised."""
    try:
        return prepare(group.state, arrival.conversations, arrival.spec, group.tokenizer, arrival.sink)
    except ContextPilotRequestError as exc:
        return exc


def window_for(state: EngineState) -> ArrivalWindow:
    """The state's arrival window for the running event loop (created on first use)."""
    loop = asyncio.get_running_loop()
    windows = state.arrival_windows
    window = windows.get(id(loop))
    if window is None:
        options = state.options
        window = ArrivalWindow(
            options.arrival_window_ms / 1000.0, options.arrival_max_wait_ms / 1000.0, options.arrival_max_group,
            options.arrival_busy_window_ms / 1000.0,
        )
        windows.clear()  # one loop serves an engine's frontend; a new loop replaces the old one's window
        windows[id(loop)] = window
    return window


async def completed_with(stream: AsyncIterator[Any], done: Callable[[], None]) -> AsyncIterator[Any]:
    """Pass a streamed response through and call ``done`` once it ends, fails or is closed by the client."""
    try:
        async for chunk in stream:
            yield chunk
    finally:
        done()
