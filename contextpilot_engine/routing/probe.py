"""A request's blocks as every replica's index sees them, found once per routing decision.

To score replicas the router asks each replica's Context Index for the best
cached prefix of the request's blocks under any order
(:meth:`contextpilot_engine.index.ContextIndex.match`).  That question needs
the blocks' keys and token counts, the preamble's key and the tenant, all
independent of the replica, so they are found once
(:func:`probe_request`) with the integration layer's own reading of the
request (:func:`~contextpilot_engine.integration.conversation.find_context`:
the body field, a message field, or ``<document>`` elements), and then
matched against each replica read-only.  Nothing is planned or recorded
here: the chosen replica's rewrite does that.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Hashable

from contextpilot_engine.integration.conversation import RequestContext, find_context
from contextpilot_engine.integration.requests import ContextPilotRequestError

from .policy import sticky_key

if TYPE_CHECKING:
    from contextpilot_engine.index import ContextIndex
    from contextpilot_engine.pilot import ContextPilot

    from .query import RouteQuery

__all__ = ["RequestProbe", "probe_request"]


@dataclass(frozen=True)
class RequestProbe:
    """What the cached-prefix search needs of one request, and what it sticks by."""

    tenant: str
    preamble_key: int
    #: block key -> copies in the request
    wanted: dict[int, int]
    #: block key -> tokens of one copy
    tokens: dict[int, int]
    #: preamble plus blocks, in tokens (the request's prefill if nothing is cached)
    prompt_tokens: int
    sticky: Hashable | None

    def hit_tokens(self, index: "ContextIndex") -> int:
        """Tokens of the best cached prefix these blocks reach in ``index``, under any order (read-only)."""
        return index.match(self.tenant, self.preamble_key, self.wanted, self.tokens).hit_tokens


def probe_request(query: "RouteQuery", pilot: "ContextPilot", implicit_documents: bool) -> RequestProbe | None:
    """The probe of a chat request; None when it carries no blocks (or is malformed: the rewrite answers that)."""
    messages = query.messages
    if not isinstance(messages, list):
        return None
    spec = query.spec
    try:
        found: Any = find_context(pilot.config, messages, spec, implicit_documents)
        if not isinstance(found, RequestContext):
            return None
        blocks = pilot.parse_docs(found.docs, found.where)
    except (ContextPilotRequestError, TypeError, ValueError):
        return None
    spec = found.spec
    tenant = (spec.tenant if spec is not None else None) or pilot.config.tenant
    preamble = pilot.layout.preamble(found.instruction or None, pilot.count_tokens)
    wanted = Counter(b.key for b in blocks)
    tokens = {b.key: b.tokens for b in blocks}
    prompt = preamble.tokens + sum(b.tokens for b in blocks)
    conversation = spec.conversation_id if spec is not None else None
    named = spec.tenant if spec is not None else None
    return RequestProbe(tenant, preamble.key, dict(wanted), tokens, prompt,
                        sticky_key(conversation, named, pilot.config.tenant))
