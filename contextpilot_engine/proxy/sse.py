"""Server-sent events passed through as they come, with contextpilot's report in the first chunk.

A backend streams a chat completion as server-sent events (``data: {...}``
then a blank line), but the bytes arrive in arbitrary pieces.
:func:`sse_events` regroups them into whole events, each forwarded as soon
as its blank line arrives, so the client sees every chunk when the backend
sent it; :func:`with_report` then runs them through the integration
layer's :func:`~contextpilot_engine.integration.reports.with_report_in_first_chunk`,
the same function the engine plugins use, so the report sits in the first
chunk exactly as it does there.
"""

from __future__ import annotations

from typing import AsyncIterator

from contextpilot_engine.integration.reports import with_report_in_first_chunk

__all__ = ["sse_events", "with_report", "find_usage"]

_SEPARATORS = ("\n\n", "\r\n\r\n", "\r\r")


def _split(buffer: str) -> tuple[str | None, str]:
    """The first complete event (with its separator) and the rest, or (None, buffer)."""
    best = -1
    width = 0
    for sep in _SEPARATORS:
        i = buffer.find(sep)
        if i >= 0 and (best < 0 or i < best):
            best, width = i, len(sep)
    if best < 0:
        return None, buffer
    return buffer[: best + width], buffer[best + width :]


async def sse_events(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """Whole events from a text stream cut anywhere (a trailing partial event is passed on at the end)."""
    buffer = ""
    async for text in chunks:
        buffer += text
        while True:
            event, buffer = _split(buffer)
            if event is None:
                break
            yield event
    if buffer:
        yield buffer


async def with_report(events: AsyncIterator[str], report: dict | None) -> AsyncIterator[str]:
    """``events`` with ``report`` as the ``contextpilot`` field of the first data chunk (unchanged when None)."""
    if report is None:
        async for event in events:
            yield event
        return
    async for event in with_report_in_first_chunk(events, report):
        yield event


def find_usage(event: str) -> dict | None:
    """The ``usage`` object of a data chunk that has one (the last chunk with ``include_usage``)."""
    if '"usage"' not in event or "prompt_tokens" not in event or not event.startswith("data: "):
        return None
    import json

    try:
        obj = json.loads(event[len("data: "):])
    except ValueError:
        return None
    usage = obj.get("usage") if isinstance(obj, dict) else None
    return usage if isinstance(usage, dict) else None
