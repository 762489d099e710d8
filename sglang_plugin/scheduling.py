"""Cache-aware admission order for SGLang's waiting queue (option ``cache_aware_scheduling``).

SGLang's own cache-aware policies (``lpm``, ``hrrn``) fall back to
first-come-first-served once more than 128 requests wait, exactly when
ordering matters most, and have no bound on how long a cold request can be
passed over.  With the option on, an AROUND hook on
``SchedulePolicy.calc_priority`` lets SGLang order the queue as configured,
then reorders its first ``scheduling_window`` requests, at any queue length:

* a request passed over in ``max_overtakes`` ordering decisions goes first
  (aging bound; a request leaves the queue when it is admitted);
* the others by their cached prefix on the live radix tree, longest first,
  ties in order of arrival.

With SGLang's ``--enable-priority-scheduling`` the hook leaves the queue as
SGLang ordered it: reordering across priorities is not ours to do.

Only the window is matched against the tree, so the cost of a decision is
bounded whatever the queue length.  A failure leaves SGLang's order.
"""

from __future__ import annotations

import itertools
from typing import Any

from contextpilot_engine.integration.failopen import logger, report_failure
from contextpilot_engine.integration.options import PluginOptions

from .config import options_from_server_args, runtime_server_args

__all__ = ["around_calc_priority", "order_window"]

#: attribute of a Req counting how often younger requests were placed ahead of it
_OVERTAKEN = "_contextpilot_overtaken"
#: attribute of a Req numbering it in order of arrival
_ARRIVAL = "_contextpilot_arrival"


def order_window(window: list, prefix_len: list[int], max_overtakes: int) -> list:
    """The window's requests in admission order; counts one overtake for each request passed over.

    Arrival order is the order in which this hook first saw each request
    (SGLang appends arrivals to the queue), so it survives earlier reorders.
    """
    seq = [_arrival(r) for r in window]
    aged = sorted((i for i, r in enumerate(window) if getattr(r, _OVERTAKEN, 0) >= max_overtakes),
                  key=seq.__getitem__)
    is_aged = set(aged)
    rest = sorted((i for i in range(len(window)) if i not in is_aged), key=lambda i: (-prefix_len[i], seq[i]))
    order = aged + rest
    latest = -1
    for i in order:
        if latest > seq[i]:  # a request that came later than this one goes before it: overtaken once more
            setattr(window[i], _OVERTAKEN, getattr(window[i], _OVERTAKEN, 0) + 1)
        latest = max(latest, seq[i])
    return [window[i] for i in order]


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
        if getattr(self, "enable_priority_scheduling", False):  # the user's priorities come first: not ours to undo
            if not _warned:
                _warned.append(True)
                logger.warning("contextpilot: --enable-priority-scheduling is on; cache-aware scheduling is off "
                               "(it would reorder requests across priorities)")
            return result
        from sglang.srt.mem_cache.common import match_kv_cache

        n = min(len(waiting_queue), options.scheduling_window)
        window = waiting_queue[:n]
        lengths = [int(match_kv_cache(r, self.tree_cache).device_prefix_len) for r in window]
        waiting_queue[:n] = order_window(window, lengths, options.max_overtakes)
    except Exception as exc:  # fail open: SGLang's own order
        report_failure("scheduling_error", exc)
    return result
