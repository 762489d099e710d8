"""Cache-aware admission order for SGLang's waiting queue (option ``cache_aware_scheduling``).

SGLang's own cache-aware policies (``lpm``, ``hrrn``) fall back to
first-come-first-served once more than 128 requests wait, exactly when
ordering matters most, and have no bound on how long a cold request can be
passed over.  With the option on, an AROUND hook on
``SchedulePolicy.calc_priority`` lets SGLang order the queue as configured,
then reorders its first ``scheduling_window`` requests, at any queue length:

* by their cached prefix on the live radix tree, longest first, ties in
  order of arrival;
* but no request is placed behind more younger requests than its aging
  bound has left (``max_overtakes`` less the younger requests already
  admitted ahead of it, counted at each decision from the requests that
  left the queue since the previous one, see :func:`count_overtakes`).

It needs SGLang's ``fcfs`` policy without ``--enable-priority-scheduling``
and otherwise leaves the queue as SGLang ordered it: other policies sort
the whole queue first, so an old request can sit past the window where the
aging bound cannot reach it, and reordering across priorities is not ours
to do.

Only the window is matched against the tree, so the cost of a decision is
bounded whatever the queue length.  A failure leaves SGLang's order.
"""

from __future__ import annotations

import bisect
import itertools
from typing import Any, Sequence

from contextpilot_engine.integration.failopen import logger, report_failure
from contextpilot_engine.integration.options import PluginOptions

from .config import options_from_server_args, runtime_server_args

__all__ = ["around_calc_priority", "order_window", "count_overtakes"]

#: attribute of a Req counting how often younger requests were placed ahead of it
_OVERTAKEN = "_contextpilot_overtaken"
#: attribute of a Req numbering it in order of arrival
_ARRIVAL = "_contextpilot_arrival"
#: attribute of a SchedulePolicy: its last decision's window, in the order it set (as :func:`_key` s)
_LAST_ORDER = "_contextpilot_last_order"
#: attribute of a Req: the retraction count its overtakes were counted under
_RETRACTIONS = "_contextpilot_retractions"


def order_window(window: list, prefix_len: list[int], max_overtakes: int) -> list:
    """The window's requests in admission order: by cached prefix, never past a request's aging bound.

    Longest cached prefix first (ties in order of arrival), except that no
    request gets more younger requests ahead of it than its bound has left
    (``max_overtakes`` less the overtakes already counted): once one would,
    the oldest such request is placed next.  SGLang admits the first requests
    of the order as a batch, so the bound holds however many it admits.
    Arrival order is the order in which this hook first saw each request
    (SGLang appends arrivals to the queue), so it survives earlier reorders.
    """
    n = len(window)
    seq = [_arrival(r) for r in window]
    left = [max_overtakes - getattr(r, _OVERTAKEN, 0) for r in window]
    preferred = sorted(range(n), key=lambda i: (-prefix_len[i], seq[i]))
    placed = [False] * n
    order: list[int] = []
    cursor = 0
    for _ in range(n):
        while placed[preferred[cursor]]:
            cursor += 1
        pick = preferred[cursor]
        due = [i for i in range(n) if not placed[i] and seq[i] < seq[pick] and left[i] <= 0]
        if due:
            pick = min(due, key=seq.__getitem__)
        placed[pick] = True
        order.append(pick)
        for i in range(n):
            if not placed[i] and seq[i] < seq[pick]:
                left[i] -= 1
    return [window[i] for i in order]


def count_overtakes(previous: Sequence[tuple[int, int]], waiting: Sequence[Any]) -> None:
    """Count the overtakes since the previous decision: younger requests admitted ahead of each one still waiting.

    A decision only orders the queue; SGLang then admits as many of its
    first requests as fit.  Those that left the queue since (admitted, or
    aborted) and stood ahead of an older request that is still waiting
    passed it, once each, which is what the aging bound counts.
    ``previous`` is the last decision's window as :func:`_key` s.  A
    request that was admitted and then retracted (put back) counts as having
    left, and starts again with no overtakes.
    """
    by_key = {}
    for r in waiting:
        key = _key(r)
        by_key[key] = r
        if getattr(r, _RETRACTIONS, 0) != key[1]:  # back in the queue after it was admitted: a new wait
            setattr(r, _RETRACTIONS, key[1])
            setattr(r, _OVERTAKEN, 0)
    left: list[int] = []  # arrival numbers of the requests ahead that left, sorted
    for key in previous:
        r = by_key.get(key)
        if r is None:
            bisect.insort(left, key[0])
            continue
        passed = len(left) - bisect.bisect_right(left, key[0])
        if passed:
            setattr(r, _OVERTAKEN, getattr(r, _OVERTAKEN, 0) + passed)


def _key(request: Any) -> tuple[int, int]:
    """A request's place in the queue's history: its arrival number and how often it was retracted."""
    return _arrival(request), int(getattr(request, "retraction_count", 0) or 0)


_counter = itertools.count()


def _arrival(request: Any) -> int:
    seq = getattr(request, _ARRIVAL, None)
    if seq is None:
        seq = next(_counter)
        setattr(request, _ARRIVAL, seq)
    return seq


_last: list = [None, None]  # (the server arguments object, its options)
_warned: list = []


def _options() -> PluginOptions | None:
    """This scheduler's options, parsed again only when its published server arguments change."""
    args = runtime_server_args()
    if _last[0] is not args:
        _last[:] = [args, options_from_server_args(args)]
    return _last[1]


def around_calc_priority(original: Any, self: Any, waiting_queue: list, *args: Any, **kwargs: Any) -> Any:
    result = original(self, waiting_queue, *args, **kwargs)
    try:
        options = _options()
        if options is None or not options.cache_aware_scheduling or len(waiting_queue) < 2:
            return result
        policy = getattr(getattr(self, "policy", None), "name", None)
        if policy != "FCFS" or getattr(self, "enable_priority_scheduling", False):
            # another policy sorts the whole queue first (so an old request may sit past the window, where the
            # aging bound cannot reach it), and the user's priorities are not ours to undo
            why = "--enable-priority-scheduling is on" if policy == "FCFS" else f"--schedule-policy is {policy}"
            if why not in _warned:
                _warned.append(why)
                logger.warning("contextpilot: %s; cache-aware scheduling needs fcfs without priorities and is off",
                               why)
            return result
        from sglang.srt.mem_cache.common import match_kv_cache

        count_overtakes(self.__dict__.get(_LAST_ORDER, ()), waiting_queue)
        n = min(len(waiting_queue), options.scheduling_window)
        window = waiting_queue[:n]
        lengths = [int(match_kv_cache(r, self.tree_cache).device_prefix_len) for r in window]
        waiting_queue[:n] = ordered = order_window(window, lengths, options.max_overtakes)
        self.__dict__[_LAST_ORDER] = [_key(r) for r in ordered]  # numbers only: no finished request kept alive
    except Exception as exc:  # fail open: SGLang's own order
        report_failure("scheduling_error", exc)
    return result
