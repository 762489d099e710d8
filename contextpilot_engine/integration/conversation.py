"""The chat rewrite: which blocks a conversation carries, and the conversation rewritten around them.

How a chat request names its context blocks:

1. **Request field**: the request-level :class:`~.requests.RequestSpec`
   (body field and headers, parsed by the adapter).
2. **Message field**: a ``"contextpilot": {...}`` key on any one message.
   The key is always removed before the engine sees the messages.  Its
   fields are merged with the request's (:func:`with_message_spec`): a
   header naming the tenant never hides a message's blocks, and a field
   given in both places with different values is a client error.
3. **Implicit documents** (option ``implicit_documents``, on by default):
   ``<document>...</document>`` elements (optionally ``<document id="x">``)
   in the first system message, when neither field gives ``contexts``.

The rewrite uses the library's prompt layout (:mod:`contextpilot_engine.prompts`):
the system message becomes *caller's system text, fixed instruction,
``<documents>``, the blocks in cache-friendly order, ``</documents>``,
dedup hints, importance ranking*; the other messages are kept as they are.
Implicit documents are lifted out of the system text into the same layout,
so explicit and implicit requests with the same documents share a prefix.

Deduplication (with a conversation id) only ever points at the other
messages of the same request: a block is replaced by a hint only where its
text is present there, for example a tool output that the client resent with
the conversation's history.  Nothing here knows an engine: the adapters hand
in plain chat messages.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from contextpilot_engine.blocks import Block
from contextpilot_engine.prompt_copies import PromptCopies
from contextpilot_engine.prompts import Preamble, as_given_system
from contextpilot_engine.request_pipeline import PendingRequest, ServedPrompt

from .reports import make_report
from .requests import ContextPilotRequestError, RequestSpec, parse_spec

if TYPE_CHECKING:
    from contextpilot_engine.config import PilotConfig
    from contextpilot_engine.pilot import ContextPilot

__all__ = ["Plan", "RequestContext", "find_context", "may_carry_blocks", "plan_conversation", "plan_conversations",
           "pending_conversation", "plan_from_served", "fallback_conversation",
           "strip_message_specs", "text_of", "DOCUMENT_PATTERN"]

#: implicit documents: ``<document>text</document>`` or ``<document id="x">text</document>``
DOCUMENT_PATTERN = re.compile(r"<document(?:\s+id\s*=\s*\"([^\"]*)\")?\s*>(.*?)</document>", re.S)


def text_of(content: Any) -> str | None:
    """The text of a message's content (a string, or text-only parts); None if it has other parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                return None
        return "".join(texts)
    return None


@dataclass
class Plan:
    """One rewritten conversation, and what is needed to bind it after tokenization."""

    messages: list
    report: dict
    tenant: str = ""
    preamble: Preamble | None = None
    ordered: list[Block] = field(default_factory=list)
    system_content: str = ""
    #: the namespace of the served prompt's pages (see :func:`.engine_keys.page_salt`), set by the adapter
    salt: Any = None


def strip_message_specs(messages: Sequence[Any]) -> tuple[list, list[tuple[int, Any]]]:
    """Copies of ``messages`` without ``contextpilot`` keys, and the removed values by message index."""
    found = []
    out = []
    for i, msg in enumerate(messages):
        if isinstance(msg, dict) and "contextpilot" in msg:
            found.append((i, msg["contextpilot"]))
            msg = {k: v for k, v in msg.items() if k != "contextpilot"}
        out.append(msg)
    return out, found


def _implicit_blocks(system_text: str) -> tuple[list, str] | None:
    """The ``<document>`` elements of a system text, and the text without them.

    A plain scan with ``str.find`` (a non-greedy regular expression over a
    long system message costs more than the rest of the rewrite).
    """
    blocks = []
    rest: list[str] = []
    pos = 0
    while True:
        start = system_text.find("<document", pos)
        if start < 0:
            break
        m = _DOCUMENT_OPEN.match(system_text, start)
        close = system_text.find("</document>", m.end()) if m else -1
        if m is None or close < 0:
            rest.append(system_text[pos : start + 9])  # not an element: keep the text as it is
            pos = start + 9
            continue
        body = system_text[m.end() : close].strip()
        if not body:
            return None  # an empty document: leave the request as the client wrote it
        doc_id = m.group(1)
        blocks.append({"text": body, "id": doc_id} if doc_id else body)
        rest.append(system_text[pos:start])
        pos = close + len("</document>")
    if not blocks:
        return None
    rest.append(system_text[pos:])
    text = "".join(rest)
    if "\n\n\n" in text:
        text = _BLANK_LINES.sub("\n\n", text)
    return blocks, text.strip()


#: the opening tag of an implicit document, ``<document>`` or ``<document id="x">``
_DOCUMENT_OPEN = re.compile(r"<document(?:\s+id\s*=\s*\"([^\"]*)\")?\s*>")
_BLANK_LINES = re.compile(r"\n{3,}")


@dataclass(frozen=True)
class RequestContext:
    """The context blocks one conversation carries, found but not yet planned.

    What :func:`plan_conversation` rewrites, and what a router needs to ask
    each replica's index how much of the request it caches (under any order
    of the blocks) before choosing one: finding the blocks reads no index and
    changes no state.
    """

    #: the messages without ``contextpilot`` keys
    clean: list
    #: ``contextpilot`` values removed from messages, by message index
    message_specs: list
    #: the effective spec (the request's merged with the one a message carried)
    spec: RequestSpec | None
    #: the blocks as the client gave them (strings or ``{"text", "id"}`` objects)
    docs: list
    #: the caller's system text (for implicit documents, without the ``<document>`` elements)
    instruction: str | None
    #: ``explicit`` or ``implicit``
    source: str
    #: how the blocks were named, for error messages
    where: str
    #: the messages after the system message
    rest: list
    #: the last user message's text
    query: str


def may_carry_blocks(messages: Sequence[Any], spec: RequestSpec | None, implicit_documents: bool) -> bool:
    """Whether the conversation could carry context blocks; False only where it certainly carries none.

    A cheap look, without parsing anything (:func:`find_context` does that
    when the request is planned): the arrival window uses it so that a plain
    chat request is never held back to be planned with a burst it cannot
    share anything with.
    """
    if spec is not None:
        if not spec.enabled:
            return False
        if spec.contexts is not None:
            return True
    if any(isinstance(msg, dict) and "contextpilot" in msg for msg in messages):
        return True
    first = messages[0] if messages else None
    if not implicit_documents or not isinstance(first, dict) or first.get("role") != "system":
        return False
    text = text_of(first.get("content"))
    return text is not None and "<document" in text


def with_message_spec(spec: RequestSpec | None, found: list[tuple[int, Any]], max_blocks: int) -> RequestSpec | None:
    """The request's spec with a message's ``contextpilot`` field folded in.

    A request-level spec (the body field or an ``X-ContextPilot-*`` header)
    often only names who asks, while the blocks come in a message's field:
    both are read, so a header never makes a message's documents vanish.
    A field given in both places with different values is an error naming
    both, never one silently winning (a gateway that sets the tenant header
    is not overruled by a client's message).
    """
    if not found:
        return spec
    if len(found) > 1:
        raise ContextPilotRequestError(
            f"messages: only one message may carry a 'contextpilot' field, found {len(found)} "
            f"(messages {[i for i, _ in found]})"
        )
    i, value = found[0]
    message = parse_spec(value, f"messages[{i}].contextpilot", max_blocks)
    if spec is None:
        return message
    merged: dict[str, Any] = {}
    for name in ("contexts", "conversation_id", "tenant"):
        ours, theirs = getattr(spec, name), getattr(message, name)
        if ours is not None and theirs is not None and ours != theirs:
            what = "context blocks" if name == "contexts" else f"{theirs!r:.80} against {ours!r:.80}"
            raise ContextPilotRequestError(
                f"{message.where}.{name}: the request already gives {name} (its 'contextpilot' field or "
                f"X-ContextPilot-* header); give them in one place ({what})"
            )
        merged[name] = ours if ours is not None else theirs
    where = message.where if spec.contexts is None and message.contexts is not None else spec.where
    return RequestSpec(enabled=spec.enabled and message.enabled, debug=spec.debug or message.debug, where=where,
                       **merged)


def conversation_tenant(messages: Sequence[Any], spec: RequestSpec | None) -> str | None:
    """The tenant a conversation names, without planning it (for the paths that serve it unplanned).

    The request's spec first, else a message's ``contextpilot`` field; a
    malformed field names none (planning reports that error).
    """
    if spec is not None and spec.tenant is not None:
        return spec.tenant
    try:
        merged = with_message_spec(spec, strip_message_specs(messages)[1], 1 << 30)
    except ContextPilotRequestError:
        return None
    return merged.tenant if merged is not None else None


def find_context(
    config: "PilotConfig", messages: Sequence[Any], spec: RequestSpec | None, implicit_documents: bool
) -> "RequestContext | Plan | None":
    """The blocks a conversation carries (see the module docstring), without planning anything.

    Returns a :class:`RequestContext`; or a finished :class:`Plan` when the
    conversation is to be served without a rewrite but not exactly as sent
    (the request opted out, its system message is not text, or only a
    message field is to be dropped); or None (no blocks: serve it unchanged).
    Raises :class:`ContextPilotRequestError` for malformed client data.
    """
    clean, found = strip_message_specs(messages)
    if not clean:
        return None  # nothing to serve: the engine answers the request as it would without us
    spec = with_message_spec(spec, found, config.max_blocks_per_context)
    if spec is not None and not spec.enabled:
        as_given = fallback_conversation(clean, spec, config.instruction)
        report = make_report(reason="disabled_by_request", tenant=spec.tenant, conversation_id=spec.conversation_id)
        return Plan(as_given, report, tenant=spec.tenant or "")

    first = clean[0] if isinstance(clean[0], dict) else None
    has_system = first is not None and first.get("role") == "system"
    system_text = text_of(first.get("content")) if has_system else None
    if spec is not None and spec.contexts is not None:
        if has_system and system_text is None:
            return Plan(fallback_conversation(clean, spec, config.instruction),
                        make_report(reason="system_not_text", source="explicit", tenant=spec.tenant,
                                    conversation_id=spec.conversation_id),
                        tenant=spec.tenant or "")
        docs, instruction, source = spec.contexts, system_text, "explicit"
        where = f"{spec.where}.contexts"
    elif implicit_documents and system_text:
        found_docs = _implicit_blocks(system_text)
        if found_docs is None:
            return _untouched(clean, found, spec)
        docs, instruction = found_docs
        source, where = "implicit", "system message <document> elements"
    else:
        return _untouched(clean, found, spec)

    rest = clean[1:] if has_system else clean
    query = ""
    for msg in reversed(rest):
        if isinstance(msg, dict) and msg.get("role") == "user":
            query = text_of(msg.get("content")) or ""
            break
    return RequestContext(clean, found, spec, list(docs), instruction, source, where, list(rest), query)


def plan_conversation(
    pilot: "ContextPilot",
    messages: Sequence[Any],
    spec: RequestSpec | None,
    implicit_documents: bool,
) -> Plan | None:
    """Rewrite one conversation; None when it carries no context blocks (serve it unchanged).

    ``spec`` is the request-level spec (server); a message-level one is
    looked for when it is None.  Raises :class:`ContextPilotRequestError`
    for malformed client data; any other exception is a bug of ours, which
    the caller turns into a fail-open.
    """
    found = pending_conversation(pilot, messages, spec, implicit_documents)
    if not isinstance(found, tuple):
        return found
    context, request = found
    return plan_from_served(context, pilot.serve(
        request.blocks, request.query, conversation_id=request.conversation_id,
        system_instruction=request.system_instruction, tenant=request.tenant, copies=request.copies,
    ))


def plan_conversations(
    pilot: "ContextPilot",
    items: Sequence[tuple[Sequence[Any], RequestSpec | None]],
    implicit_documents: bool,
) -> tuple[list, list[int]]:
    """Rewrite conversations that arrived together, planned jointly (:meth:`ContextPilot.serve_group`).

    ``items`` are ``(messages, request-level spec)`` pairs.  Returns, in input
    order, what :func:`plan_conversation` would return for each (a
    :class:`Plan` or None), or the :class:`ContextPilotRequestError` that
    item's client data raised (the other items are still planned); and the
    admission order (input indices), which runs the conversations whose
    prompts share a prefix back to back.  Any other exception is ours.
    """
    results: list = [None] * len(items)
    pending: list[tuple[int, RequestContext, PendingRequest]] = []
    for n, (messages, spec) in enumerate(items):
        try:
            found = pending_conversation(pilot, messages, spec, implicit_documents)
        except ContextPilotRequestError as exc:
            results[n] = exc
            continue
        if isinstance(found, tuple):
            pending.append((n, found[0], found[1]))
        else:
            results[n] = found
    served, admission = pilot.serve_group([request for _, _, request in pending])
    for (n, context, _), one in zip(pending, served):
        results[n] = plan_from_served(context, one)
    order = [pending[a][0] for a in admission]
    planned = set(order)
    return results, order + [n for n in range(len(items)) if n not in planned]


def pending_conversation(
    pilot: "ContextPilot", messages: Sequence[Any], spec: RequestSpec | None, implicit_documents: bool
) -> "tuple[RequestContext, PendingRequest] | Plan | None":
    """The conversation's blocks parsed into a request to serve, or what to do instead (see :func:`find_context`)."""
    found = find_context(pilot.config, messages, spec, implicit_documents)
    if not isinstance(found, RequestContext):
        return found
    spec = found.spec
    try:
        blocks = pilot.parse_docs(found.docs, found.where)
    except (TypeError, ValueError) as exc:
        if found.source == "implicit":
            return _untouched(found.clean, found.message_specs, spec)
        raise ContextPilotRequestError(str(exc)) from None
    cid = spec.conversation_id if spec else None
    request = PendingRequest(
        blocks,
        found.query or "-",
        conversation_id=cid,
        system_instruction=found.instruction or None,
        tenant=spec.tenant if spec else None,
        # the served prompt is [system, *rest]: message numbers start at 2
        copies=PromptCopies.from_messages(found.rest, first_number=2) if cid else None,
    )
    return found, request


def plan_from_served(context: RequestContext, served: ServedPrompt) -> Plan:
    """The rewritten conversation around one served prompt, with its report."""
    spec = context.spec
    system = served.messages[0]
    new_messages = [dict(system)] + list(context.rest)
    report = make_report(
        applied=True,
        source=context.source,
        tenant=served.tenant,
        conversation_id=spec.conversation_id if spec else None,
        turn=served.turn,
        **served.report,
    )
    if spec is not None and spec.debug:
        report["prompt_messages"] = new_messages
    return Plan(
        new_messages,
        report,
        tenant=served.tenant,
        preamble=served.preamble,
        ordered=served.ordered,
        system_content=system["content"],
    )


def _untouched(clean: list, found: list, spec: RequestSpec | None) -> Plan | None:
    """No blocks to rewrite: a plan only to drop the message field (and keep its tenant), else None."""
    if not found:
        return None
    return Plan(clean, {}, tenant=(spec.tenant if spec is not None else None) or "")


def fallback_conversation(messages: Sequence[Any], spec: RequestSpec | None, instruction: str) -> list:
    """The conversation as the client meant it, without reordering, deduplication or notes.

    Used when the request opted out and when our own code failed.  Implicit
    documents are already in the messages, so those are returned as sent
    (minus ``contextpilot`` keys).  Explicit contexts exist only in the
    ``contextpilot`` field, so dropping them would silently lose the client's
    documents: they are placed, in the order given, in the documented layout
    (:func:`contextpilot_engine.prompts.as_given_system`) as the system
    message, after the client's own system text.
    """
    clean, found = strip_message_specs(messages)
    contexts = spec.contexts if spec is not None else None
    if contexts is None and len(found) == 1 and isinstance(found[0][1], dict):
        contexts = found[0][1].get("contexts")
    if not isinstance(contexts, list) or not contexts:
        return clean
    texts = [c if isinstance(c, str) else c.get("text", "") if isinstance(c, dict) else str(c) for c in contexts]
    first = clean[0] if clean and isinstance(clean[0], dict) else None
    if first is not None and first.get("role") == "system" and isinstance(first.get("content"), str):
        return [dict(first, content=as_given_system(instruction, first["content"] or None, texts))] + clean[1:]
    return [{"role": "system", "content": as_given_system(instruction, None, texts)}] + clean
