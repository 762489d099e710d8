"""Request side, engine-independent part: which blocks a chat request carries, and the rewrite.

How a request names its context blocks (first match wins):

1. **Request field** (OpenAI server): ``extra_body={"contextpilot": {...}}``,
   i.e. a top-level ``contextpilot`` object in the JSON body.
2. **Message field** (offline ``LLM.chat``, or any client that can add a key
   to a message): a ``"contextpilot": {...}`` key on any one message.  The
   key is always removed before vLLM sees the messages.
3. **Implicit documents** (option ``implicit_documents``, on by default):
   ``<document>...</document>`` elements (optionally ``<document id="x">``)
   in the first system message.

The object accepts ``contexts`` (a list of strings or ``{"text", "id"}``
objects), ``conversation_id``, ``tenant`` and ``enabled`` (false: leave this
request alone).  Anything else, or a value of the wrong type, is a
:class:`ContextPilotRequestError` naming the field; the server answers it
with HTTP 400.

The rewrite uses the library's prompt layout (:mod:`contextpilot_engine.prompts`):
the system message becomes *caller's system text, fixed instruction,
``<documents>``, the blocks in cache-friendly order, ``</documents>``,
dedup hints, importance ranking*; the other messages are kept as they are.
Implicit documents are lifted out of the system text into the same layout,
so explicit and implicit requests with the same documents share a prefix.

After vLLM has tokenized the rewritten prompt, :func:`bind_served_prompt`
ties the prompt's block boundaries (as token offsets) and canonical page keys
to the Context Index, so later requests see which of these blocks the engine
still holds, page by page.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from contextpilot_engine.pages import chain_page_keys
from contextpilot_engine.prompts import block_char_ends

__all__ = [
    "ContextPilotRequestError",
    "RequestSpec",
    "Plan",
    "parse_spec",
    "plan_conversation",
    "bind_served_prompt",
    "fallback_conversation",
    "token_ends_from_offsets",
    "DOCUMENT_PATTERN",
]

#: implicit documents: ``<document>text</document>`` or ``<document id="x">text</document>``
DOCUMENT_PATTERN = re.compile(r"<document(?:\s+id\s*=\s*\"([^\"]*)\")?\s*>(.*?)</document>", re.S)

_FIELDS = ("contexts", "conversation_id", "tenant", "enabled")


class ContextPilotRequestError(ValueError):
    """The request's ``contextpilot`` data is malformed (a client error: HTTP 400)."""


@dataclass(frozen=True)
class RequestSpec:
    """What a request asked of the plugin."""

    contexts: list | None = None
    conversation_id: str | None = None
    tenant: str | None = None
    enabled: bool = True
    where: str = "contextpilot"


def _name(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > 256:
        raise ContextPilotRequestError(
            f"{where}: expected a non-empty string of at most 256 characters, got {value!r:.80}"
        )
    return value


def parse_spec(value: Any, where: str = "contextpilot", max_blocks: int = 4096) -> RequestSpec:
    """Validate a ``contextpilot`` object (from the body, a header set or a message)."""
    if not isinstance(value, dict):
        raise ContextPilotRequestError(
            f"{where}: expected an object with any of {list(_FIELDS)}, got {type(value).__name__}"
        )
    unknown = sorted(str(k) for k in value if k not in _FIELDS)
    if unknown:
        raise ContextPilotRequestError(f"{where}: unknown field(s) {unknown}; allowed: {list(_FIELDS)}")
    enabled = value.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ContextPilotRequestError(f"{where}.enabled: expected true or false, got {enabled!r:.80}")
    contexts = value.get("contexts")
    if contexts is not None:
        # Shape checks here (cheap, before any tokenizer runs); the library re-checks with real counts.
        from contextpilot_engine.blocks import estimate_tokens
        from contextpilot_engine.validation import parse_context

        try:
            parse_context(contexts, f"{where}.contexts", estimate_tokens, max_blocks)
        except (TypeError, ValueError) as exc:
            raise ContextPilotRequestError(str(exc)) from None
        contexts = list(contexts)
    return RequestSpec(
        contexts=contexts,
        conversation_id=_name(value.get("conversation_id"), f"{where}.conversation_id"),
        tenant=_name(value.get("tenant"), f"{where}.tenant"),
        enabled=enabled,
        where=where,
    )


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
    preamble: Any = None
    ordered: list = field(default_factory=list)
    system_content: str = ""
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
    blocks = []
    for m in DOCUMENT_PATTERN.finditer(system_text):
        doc_id, body = m.group(1), m.group(2).strip()
        if not body:
            return None  # an empty document: leave the request as the client wrote it
        blocks.append({"text": body, "id": doc_id} if doc_id else body)
    if not blocks:
        return None
    rest = DOCUMENT_PATTERN.sub("", system_text)
    rest = re.sub(r"\n{3,}", "\n\n", rest).strip()
    return blocks, rest


def plan_conversation(
    pilot: Any,
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
    clean, found = strip_message_specs(messages)
    if spec is None and found:
        if len(found) > 1:
            raise ContextPilotRequestError(
                f"messages: only one message may carry a 'contextpilot' field, found {len(found)} "
                f"(messages {[i for i, _ in found]})"
            )
        i, value = found[0]
        spec = parse_spec(value, f"messages[{i}].contextpilot", pilot.config.max_blocks_per_context)
    if spec is not None and not spec.enabled:
        return Plan(clean, {"applied": False, "reason": "disabled by the request"}) if found else None

    first = clean[0] if clean and isinstance(clean[0], dict) else None
    has_system = first is not None and first.get("role") == "system"
    system_text = text_of(first.get("content")) if has_system else None
    source = None
    if spec is not None and spec.contexts is not None:
        if has_system and system_text is None:
            return Plan(clean, {"applied": False, "reason": "the system message is not plain text"})
        docs, instruction, source = spec.contexts, system_text, "explicit"
        where = f"{spec.where}.contexts"
    elif implicit_documents and system_text:
        found_docs = _implicit_blocks(system_text)
        if found_docs is None:
            return Plan(clean, {}) if found else None
        docs, instruction = found_docs
        source, where = "implicit", "system message <document> elements"
    else:
        return Plan(clean, {}) if found else None

    rest = clean[1:] if has_system else clean
    query = ""
    for msg in reversed(rest):
        if isinstance(msg, dict) and msg.get("role") == "user":
            query = text_of(msg.get("content")) or ""
            break

    try:
        blocks = pilot.parse_docs(docs, where)
    except (TypeError, ValueError) as exc:
        if source == "implicit":
            return Plan(clean, {}) if found else None
        raise ContextPilotRequestError(str(exc)) from None

    cid = spec.conversation_id if spec else None
    served = pilot.serve(
        blocks,
        query or "-",
        conversation_id=cid,
        system_instruction=instruction or None,
        tenant=spec.tenant if spec else None,
    )
    system = served.messages[0]
    report = {
        "applied": True,
        "source": source,
        "tenant": served.tenant,
        "conversation_id": cid,
        "turn": served.turn,
        **served.report,
    }
    return Plan(
        [dict(system)] + list(rest),
        report,
        tenant=served.tenant,
        preamble=served.preamble,
        ordered=served.ordered,
        system_content=system["content"],
    )


def fallback_conversation(messages: Sequence[Any], spec: RequestSpec | None) -> list:
    """The conversation as the client meant it, without any of the plugin's processing.

    Used when our own code failed.  Implicit documents are already in the
    messages, so those are returned as sent (minus ``contextpilot`` keys).
    Explicit contexts exist only in the ``contextpilot`` field, so dropping
    them would silently lose the client's documents: they are placed, in the
    order given and without reordering, dedup or notes, as ``<document>``
    elements at the end of the system message (one is added if needed).
    """
    clean, found = strip_message_specs(messages)
    contexts = spec.contexts if spec is not None else None
    if contexts is None and len(found) == 1 and isinstance(found[0][1], dict):
        contexts = found[0][1].get("contexts")
        if found[0][1].get("enabled") is False:
            contexts = None
    if not isinstance(contexts, list) or not contexts:
        return clean
    texts = [c if isinstance(c, str) else c.get("text", "") if isinstance(c, dict) else str(c) for c in contexts]
    docs = "".join(f"<document>{t}</document>\n" for t in texts)
    first = clean[0] if clean and isinstance(clean[0], dict) else None
    if first is not None and first.get("role") == "system" and isinstance(first.get("content"), str):
        return [dict(first, content=first["content"] + "\n\n" + docs)] + clean[1:]
    return [{"role": "system", "content": docs}] + clean


def token_ends_from_offsets(char_ends: Sequence[int], offsets: Sequence[tuple[int, int]]) -> list[int]:
    """For each character boundary, how many tokens start before it."""
    out = []
    j = 0
    n = len(offsets)
    for end in char_ends:
        while j < n and offsets[j][0] < end:
            j += 1
        out.append(j)
    return out


def bind_served_prompt(
    index: Any,
    plan: Plan,
    prompt_text: str,
    token_ids: Sequence[int],
    offsets: Sequence[tuple[int, int]] | None,
    retokenize: Callable[[str], tuple[list[int], list[tuple[int, int]]]] | None = None,
) -> bool:
    """Bind a served prompt's blocks to its canonical pages; False when it cannot be done exactly."""
    page = index.page_size
    if page is None or plan.preamble is None or not plan.ordered:
        return False
    content = plan.system_content
    if not content.startswith(plan.preamble.text):
        return False
    rel = block_char_ends(plan.preamble.text, plan.ordered)
    if rel[-1] > len(content) or content[rel[-1] - 1] != "\n":
        return False  # the layout is not the one this code expects
    base = prompt_text.find(content)
    if base < 0:
        return False  # the chat template changed the content; cannot locate the blocks
    if offsets is None or len(offsets) != len(token_ids):
        if retokenize is None:
            return False
        ids, offsets = retokenize(prompt_text)
        if list(ids) != list(token_ids):
            return False
    token_ends = token_ends_from_offsets([base + r for r in rel], offsets)
    keys = chain_page_keys(token_ids[: token_ends[-1]], page, salt=plan.salt)
    index.bind(
        plan.tenant,
        plan.preamble.key,
        plan.preamble.tokens,
        [(b.key, b.tokens) for b in plan.ordered],
        token_ends,
        keys,
    )
    return True
