"""What the ingress hands the router for one request: its messages, its ``contextpilot`` spec, and what to avoid.

A Ray Serve router sees a request only as the arguments of the handle call
(``PendingRequest.args``).  :class:`RouteQuery` is that argument: the chat
messages as the client sent them (the ``messages`` attribute is also what
Ray's own ``PrefixCacheAffinityRouter`` reads, so every router of the
benchmark is given the same request), the parsed
:class:`~contextpilot_engine.integration.requests.RequestSpec`, and the
replicas a retry must not use.  The router leaves its :class:`.policy.Decision`
on it for the ingress, which reports it in the response.  With
:class:`~.router.ContextPilotRouter` it never leaves the ingress's process
(the rewritten request goes to the chosen replica's engine over HTTP); with
other routers it is the argument the replica receives through Ray.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from contextpilot_engine.integration.requests import RequestSpec

from .policy import Decision

__all__ = ["RouteQuery"]


@dataclass
class RouteQuery:
    """One request as the router sees it (see the module docstring)."""

    #: the chat messages as the client sent them (None for requests without messages)
    messages: Any
    #: the whole request body, for routers whose replicas forward it themselves (through Ray)
    body: dict | None = None
    spec: RequestSpec | None = None
    #: replicas this attempt must not use (the one a first attempt failed on)
    exclude: frozenset = frozenset()
    #: 1 for the first attempt, 2 for the retry elsewhere
    attempt: int = 1
    #: set by the router: the replica chosen and why
    decision: Decision | None = None
    #: the router's balance-window entry for this query (taken back if the query is routed again)
    window_cell: list | None = field(default=None, repr=False)

    def retry_without(self, replica: str) -> "RouteQuery":
        """The query of a retry that must avoid ``replica``."""
        return dataclasses.replace(self, exclude=self.exclude | {replica}, attempt=self.attempt + 1,
                                   decision=None, window_cell=None)
