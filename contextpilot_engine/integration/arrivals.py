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

**The window.**  A request that arrives when no other arrived in the last
``arrival_window_ms`` and no group is open or being planned goes through at
once: a lone request is never held.  One that arrives within the window of
the previous arrival opens a group, or joins the open one.  The group closes
when the window passes with no new arrival, when it has been open
``arrival_max_wait_ms``, or when it holds ``arrival_max_group`` requests; it
is then planned on a worker thread (the event loop keeps accepting requests,
which form the next group), and its requests are released in admission
order.

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
from dataclasses import dataclass, field
from typing import Any, Sequence

from .failopen import report_failure
from .requests import ContextPilotRequestError, RequestSpec
from .rewriting import Arrival, Prepared, prepare, prepare_group
from .state import EngineState

__all__ = ["ArrivalWindow", "Ticket", "window_for"]


@dataclass
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


@dataclass
class _Group:
    state: EngineState
    tokenizer: Any
    opened: float
    entries: list[tuple[Arrival, asyncio.Future]] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None


class ArrivalWindow:
    """The arrival groups of one engine state on one event loop (see the module docstring)."""

    def __init__(self, window_s: float, max_wait_s: float, max_group: int):
        self.window_s = window_s
        self.max_wait_s = max_wait_s
        self.max_group = max_group
        self._last_arrival = float("-inf")
        self._open: _Group | None = None
        self._planning = 0
        #: requests planned in a group of more than one, and groups planned (for reports and tests)
        self.grouped_requests = 0
        self.groups = 0

    async def arrive(
        self,
        state: EngineState,
        conversations: Sequence[Any],
        spec: RequestSpec | None,
        tokenizer: Any,
        sink: list | None = None,
    ) -> Ticket:
        """The request's plan and its admission ticket; raises :class:`ContextPilotRequestError` for bad client data."""
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        last, self._last_arrival = self._last_arrival, now
        group = self._open
        if group is not None and group.tokenizer is not tokenizer:
            group = None  # another renderer's requests: never mixed
        lone = group is None and self._open is None and not self._planning and now - last > self.window_s
        if self.window_s <= 0 or lone or group is None and self._open is not None:
            try:
                return Ticket(prepare(state, conversations, spec, tokenizer, sink))
            finally:
                # a request that arrived while this one was planned is concurrent with it
                self._last_arrival = time.monotonic()
        if group is None:
            group = self._open = _Group(state, tokenizer, now)
        future: asyncio.Future = loop.create_future()
        group.entries.append((Arrival(conversations, spec, sink), future))
        if group.timer is not None:
            group.timer.cancel()
        if len(group.entries) >= self.max_group:
            self._close(group)
        else:
            delay = min(self.window_s, group.opened + self.max_wait_s - now)
            group.timer = loop.call_later(max(0.0, delay), self._close, group)
        return await future

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
        except Exception as exc:  # prepare_group fails open itself; this is a bug in the window
            report_failure("arrival_error", exc)
            results = [_safely_prepare(group, a) for a, _ in entries]
            order = list(range(len(entries)))
        finally:
            self._planning -= 1
        if len(entries) > 1:
            _note_group(results, len(entries))
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
                future.set_result(Ticket(result, previous, done, self.max_wait_s, len(entries)))
            previous = done


def _note_group(results: list, size: int) -> None:
    """Say in each report how many other requests were planned with it."""
    for result in results:
        if isinstance(result, Prepared):
            for plan in result.plans:
                if plan is not None and plan.report.get("applied"):
                    plan.report["planned_with"] = size - 1


def _safely_prepare(group: _Group, arrival: Arrival) -> Prepared | None | ContextPilotRequestError:
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
            options.arrival_window_ms / 1000.0, options.arrival_max_wait_ms / 1000.0, options.arrival_max_group
        )
        windows.clear()  # one loop serves an engine's frontend; a new loop replaces the old one's window
        windows[id(loop)] = window
    return window
