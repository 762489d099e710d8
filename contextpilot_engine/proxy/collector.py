"""Python's cyclic garbage collector in the proxy's process, set for short pauses on the event loop.

Every pause of the collector holds the event loop, so it lands in some
request's own work (:mod:`.work_clock`) or delays every request waiting for
its turn.  Two things make those pauses long with the default settings:

* **the start-up heap.**  Loading the tokenizer, the chat template and the
  web stack leaves hundreds of thousands of container objects that live as
  long as the process.  A full (oldest-generation) collection walks all of
  them each time, which holds the loop far longer than any request's own
  work.  :func:`tune` collects once after start-up and then moves what is
  left to the permanent generation (:func:`gc.freeze`), which no collection
  walks again; start-up objects are never garbage anyway.
* **the middle generation.**  With many concurrent requests, what survives
  a young collection is mostly those requests' live state (coroutines,
  parsed bodies, token lists) and new index entries, which no collection
  can free.  By default the middle generation is collected every ten young
  collections, a pause longer than a request's whole own work, every few
  requests.  :func:`tune` collects it every :data:`MIDDLE_EVERY` young
  collections instead: cyclic garbage is still freed, a little later.

Young collections keep their default rate: they only walk objects allocated
since the last one, so short and frequent is what keeps each pause small.

Only the proxy's own process (``contextpilot serve``) is tuned: in the
engine plugins the process is the engine's, and its collector is not ours
to set.
"""

from __future__ import annotations

import gc
import logging

__all__ = ["MIDDLE_EVERY", "tune"]

log = logging.getLogger("contextpilot.proxy")

#: young collections between two collections of the middle generation (Python's default: 10)
MIDDLE_EVERY = 100


def tune() -> None:
    """Call once the proxy has started: freeze the start-up heap and collect the middle generation rarely."""
    gc.collect()
    gc.freeze()
    young, _, oldest = gc.get_threshold()
    gc.set_threshold(young, MIDDLE_EVERY, oldest)
    log.debug("contextpilot proxy: %d start-up objects frozen; collector thresholds %s", gc.get_freeze_count(),
              gc.get_threshold())
