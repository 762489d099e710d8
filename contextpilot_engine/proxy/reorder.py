"""``POST /reorder``: the reference proxy's stateless reorder, one context or a batch.

The request is the reference's ``{"contexts": [[...], ...]}`` (its other
fields, which tune its clustering, are accepted and ignored); a flat list
of blocks is a batch of one.  Blocks are strings, ``{"text", "id"}``
objects, or integer document ids (reordered by identity; the reference's
integer input).  The answer is the reference's stateless shape:
``reordered_contexts[i]`` is ``contexts[original_indices[i]]`` with its
blocks reordered, listed in the order to send them.

Each call uses a fresh :class:`~contextpilot_engine.pilot.ContextPilot`, so
it neither reads nor changes the proxy's index: it is the library's
offline ``reorder`` over the given batch.  It runs in a worker thread,
since a large batch takes longer than the event loop may be held.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from contextpilot_engine.config import PilotConfig

__all__ = ["reorder_endpoint", "reorder_contexts"]


def _as_blocks(contexts: list) -> tuple[list, dict[int, Any]]:
    """Integer ids become id-named blocks (the originals are restored after), other blocks stay."""
    originals: dict[int, Any] = {}
    out = []
    for ctx in contexts:
        if not isinstance(ctx, list):
            out.append(ctx)
            continue
        row = []
        for item in ctx:
            if isinstance(item, int) and not isinstance(item, bool):
                block = {"text": f"document id {item}", "id": str(item)}
                originals[id(block)] = item
                row.append(block)
            else:
                row.append(item)
        out.append(row)
    return out, originals


def _input_type(contexts: list) -> str:
    items = [x for c in contexts if isinstance(c, list) for x in c]
    if items and all(isinstance(x, int) and not isinstance(x, bool) for x in items):
        return "integer"
    if items and all(isinstance(x, str) for x in items):
        return "string"
    return "mixed"


def reorder_contexts(contexts: Any, config: PilotConfig, tokenizer: Any = None) -> dict:
    """The reference's stateless answer for ``contexts``; raises ``TypeError``/``ValueError`` naming the field."""
    from contextpilot_engine.pilot import ContextPilot

    if not isinstance(contexts, list) or not contexts:
        raise ValueError("contexts: expected a non-empty list of contexts (lists of blocks), or one list of blocks")
    single = not isinstance(contexts[0], list)
    batch = [contexts] if single else contexts
    blocks, originals = _as_blocks(batch)
    pilot = ContextPilot(config=config, tokenizer=tokenizer)
    reordered, order = pilot.reorder(blocks[0] if single else blocks)  # the library names bad input by index
    restored = [[originals.get(id(b), b) for b in ctx] for ctx in reordered]
    return {
        "status": "success",
        "message": "Contexts reordered successfully (stateless mode)",
        "mode": "stateless",
        "input_type": _input_type(batch),
        "num_contexts": len(batch),
        "reordered_contexts": restored,
        "original_indices": order,
    }


async def reorder_endpoint(request: Request, config: PilotConfig, tokenizer: Any = None) -> Response:
    try:
        body = await request.json()
    except ValueError as exc:
        return JSONResponse({"detail": f"the request body is not JSON: {exc}"}, status_code=400)
    if not isinstance(body, dict) or "contexts" not in body:
        return JSONResponse({"detail": "contexts: field required"}, status_code=400)
    try:
        result = await asyncio.to_thread(reorder_contexts, body["contexts"], config, tokenizer)
    except (TypeError, ValueError) as exc:
        return JSONResponse({"detail": str(exc)}, status_code=400)
    return JSONResponse(result)
