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
* ``planned_with``: how many other requests that arrived together with
  this one were planned jointly with it (0: planned alone);
* ``bound``: the served prompt was tied to the index (false: it cannot help
  later requests).
"""

from __future__ import annotations

import json
from typing import Any, AsyncIterator

__all__ = ["REPORT_KEYS", "make_report", "merge_reports", "with_report_in_first_chunk"]

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
    "planned_with": 0,
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


def merge_reports(reports: list[dict]) -> dict:
    """The response field of a request that rendered one or several prompts."""
    if len(reports) == 1:
        return reports[0]
    return {"applied": any(r.get("applied") for r in reports), "prompts": reports}


async def with_report_in_first_chunk(stream: AsyncIterator[Any], payload: dict) -> AsyncIterator[Any]:
    """Pass a server-sent-events stream through, with ``payload`` as the ``contextpilot`` field of its first chunk."""
    first = True
    async for chunk in stream:
        if first and isinstance(chunk, str) and chunk.startswith("data: ") and not chunk.startswith("data: [DONE]"):
            first = False
            try:
                obj = json.loads(chunk[len("data: ") :])
                if isinstance(obj, dict):
                    obj["contextpilot"] = payload
                    chunk = "data: " + json.dumps(obj) + "\n\n"
            except ValueError:
                pass
        yield chunk
