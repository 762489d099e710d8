"""What a request asks of contextpilot: the ``contextpilot`` object, its headers and its errors.

Every adapter and the proxy accept the same request interface:

* a ``contextpilot`` object, as a top-level field of the JSON body
  (``extra_body={"contextpilot": {...}}`` with the ``openai`` client) or as a
  key of any one chat message (the way through offline APIs whose messages
  are plain dicts);
* the headers ``X-ContextPilot-Conversation`` and ``X-ContextPilot-Tenant``,
  which supply the conversation and tenant when the object does not (and
  must agree with it when both name one: a gateway sets the header, and
  the body may not overrule it).

The object accepts ``contexts`` (a list of strings or ``{"text", "id"}``
objects), ``conversation_id``, ``tenant``, ``enabled`` (false: send the
contexts as given, in the given order, without reordering, deduplication or
notes) and ``debug`` (true: the response's report also carries the rewritten
messages).  Anything else, or a value of the wrong type, is a
:class:`ContextPilotRequestError` naming the field; adapters answer it as a
client error (HTTP 400).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from contextpilot_engine.blocks import estimate_tokens
from contextpilot_engine.validation import check_name, parse_context

__all__ = [
    "ContextPilotRequestError",
    "RequestSpec",
    "SPEC_FIELDS",
    "HEADER_CONVERSATION",
    "HEADER_TENANT",
    "parse_spec",
    "spec_from_http",
]

HEADER_CONVERSATION = "x-contextpilot-conversation"
HEADER_TENANT = "x-contextpilot-tenant"
SPEC_FIELDS = ("contexts", "conversation_id", "tenant", "enabled", "debug")


class ContextPilotRequestError(ValueError):
    """The request's ``contextpilot`` data is malformed (a client error: HTTP 400)."""


@dataclass(frozen=True)
class RequestSpec:
    """What a request asked of contextpilot."""

    contexts: list | None = None
    conversation_id: str | None = None
    tenant: str | None = None
    enabled: bool = True
    debug: bool = False
    #: how the client passed it, for error messages (``contextpilot``, ``messages[2].contextpilot``)
    where: str = "contextpilot"


def _name(value: Any, where: str) -> str | None:
    try:
        return check_name(value, where, allow_none=True)
    except (TypeError, ValueError) as exc:
        raise ContextPilotRequestError(str(exc)) from None


def _flag(value: Any, where: str, default: bool) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ContextPilotRequestError(f"{where}: expected true or false, got {value!r:.80}")
    return value


def parse_spec(value: Any, where: str = "contextpilot", max_blocks: int = 4096) -> RequestSpec:
    """Validate a ``contextpilot`` object (from the body or a message)."""
    if not isinstance(value, dict):
        raise ContextPilotRequestError(
            f"{where}: expected an object with any of {list(SPEC_FIELDS)}, got {type(value).__name__}"
        )
    unknown = sorted(str(k) for k in value if k not in SPEC_FIELDS)
    if unknown:
        raise ContextPilotRequestError(f"{where}: unknown field(s) {unknown}; allowed: {list(SPEC_FIELDS)}")
    contexts = value.get("contexts")
    if contexts is not None:
        # Shape checks only (cheap, before any tokenizer runs); the library re-checks with real counts.
        try:
            parse_context(contexts, f"{where}.contexts", estimate_tokens, max_blocks)
        except (TypeError, ValueError) as exc:
            raise ContextPilotRequestError(str(exc)) from None
        contexts = list(contexts)
    return RequestSpec(
        contexts=contexts,
        conversation_id=_name(value.get("conversation_id"), f"{where}.conversation_id"),
        tenant=_name(value.get("tenant"), f"{where}.tenant"),
        enabled=_flag(value.get("enabled"), f"{where}.enabled", True),
        debug=_flag(value.get("debug"), f"{where}.debug", False),
        where=where,
    )


def _header(headers: Any, name: str) -> str | None:
    if headers is None:
        return None
    value = headers.get(name)
    if value is None and isinstance(headers, Mapping):  # a plain dict: look case-insensitively
        for key, v in headers.items():
            if isinstance(key, str) and key.lower() == name:
                return v
    return value


def spec_from_http(body_field: Any, headers: Any, max_blocks: int = 4096) -> RequestSpec | None:
    """The spec of an HTTP request from its body's ``contextpilot`` field and its headers.

    None when the request says nothing to contextpilot (a message may still
    carry a ``contextpilot`` key, or the system message ``<document>``
    elements).  Raises :class:`ContextPilotRequestError`.
    """
    conv = _header(headers, HEADER_CONVERSATION)
    tenant = _header(headers, HEADER_TENANT)
    if body_field is None and conv is None and tenant is None:
        return None
    spec = parse_spec({} if body_field is None else body_field, "contextpilot", max_blocks)
    for field_name, header, value in (("conversation_id", HEADER_CONVERSATION, conv), ("tenant", HEADER_TENANT, tenant)):
        if value is None:
            continue
        named = _name(value, f"header {header}")
        given = getattr(spec, field_name)
        if given is None:
            spec = dataclasses.replace(spec, **{field_name: named})
        elif given != named:  # a gateway sets the header: a body field must not overrule it
            raise ContextPilotRequestError(
                f"contextpilot.{field_name} {given!r:.80} disagrees with header {header} {named!r:.80}"
            )
    return spec
