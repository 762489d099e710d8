"""Binding served prompts to the index off the request path.

Once a prompt's blocks are located in its tokens (cheap, and what decides
the report's ``bound``), tying them to the engine's pages (hashing every
page, updating the prefix tree) only matters to *later* requests: the engine
needs the token ids now, the index needs the binding before the next request
is planned.  So the request path hands that work to a :class:`Binder`, whose
thread does it while the engine prefills, and the next request's planning
first :meth:`Binder.drain`\\ s whatever is still queued, in order, so no
request is ever planned against an index that misses an earlier prompt.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Callable

from .failopen import report_failure

__all__ = ["Binder"]


class Binder:
    """A queue of binding jobs, run by one daemon thread or by the next caller of :meth:`drain`."""

    def __init__(self, name: str = "contextpilot-binder"):
        self._jobs: deque[Callable[[], None]] = deque()
        self._run_lock = threading.Lock()  # jobs run one at a time, in order
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()
        self.done = 0

    def submit(self, job: Callable[[], None]) -> None:
        self._jobs.append(job)
        self._wake.set()

    def drain(self) -> None:
        """Run every job still queued (in this thread, if the binder thread has not yet)."""
        if self._jobs:
            self._run_pending()

    def pending(self) -> int:
        return len(self._jobs)

    def _run_pending(self) -> None:
        with self._run_lock:
            while self._jobs:
                job = self._jobs.popleft()
                try:
                    job()
                except Exception as exc:  # fail open: a prompt not bound only helps later requests less
                    report_failure("bind_error", exc)
                self.done += 1

    def _loop(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            self._run_pending()
