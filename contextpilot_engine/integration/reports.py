"""The response field: what contextpilot did to a request, with the same keys every time.

Adapters add it to chat completion responses as ``contextpilot`` (the first
chunk when streaming); a client tells from it whether contextpilot was
active at all: a response without the field was not touched.  Clients parse
it without special cases, so every report has exactly :data:`REPORT_KEYS`
(plus ``prompt_messages`` when the request asked for ``debug``):

* ``applied``: the prompt was rewritten; when false, ``reason`` says why
  (``disabled_by_request``, ``system_not_text``, or one of our failure
  reasons such as ``rewrite_error``, with ``error`` describing it) and the
  request was served as the client sent it;
* ``source``: where the blocks came from (``explicit``, ``implicit``);
* ``tenant``, ``conversation_id``, ``turn``;
* ``blocks``, ``blocks_moved``, ``blocks_deduplicated``,
  ``tokens_saved_by_dedup``, ``expected_cached_tokens``;
* ``order``: the input indices of the blocks sent, in prompt order;
* ``bound``: the served prompt was tied to the index (false: it cannot help
  later requests).
"""

from __future__ import annotations

from typing import Any

__all__ = ["REPORT_KEYS", "make_report"]

_DEFAULTS: dict[str, Any] = {
    "applied": False,
    "reason": None,
    "error": None,
    "source": None,
    "tenant": None,
    "conversation_id": None,
    "turn": None,
    "blocks": 0,
    "blocks_moved": 0,
    "blocks_deduplicated": 0,
    "tokens_saved_by_dedup": 0,
    "expected_cached_tokens": 0,
    "order": [],
    "bound": False,
}
REPORT_KEYS = tuple(_DEFAULTS)
_EXTRA = ("prompt_messages",)


def make_report(**fields: Any) -> dict:
    """A report with every key of :data:`REPORT_KEYS`; ``fields`` overrides the defaults."""
    unknown = sorted(set(fields) - set(_DEFAULTS) - set(_EXTRA))
    if unknown:
        raise KeyError(f"not report keys: {unknown}")
    out = dict(_DEFAULTS, order=[])
    out.update(fields)
    return out
