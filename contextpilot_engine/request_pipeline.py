"""One online request, end to end: the turn's plan, the cached-prefix order, the prompt, then the bookkeeping.

:class:`~contextpilot_engine.pilot.ContextPilot` validates input and holds
the lock; :func:`serve_request` does the work for one request whose blocks
are parsed, in an order that keeps a rejected request from changing state:

1. the blocks to send (a conversation's repeats become hints, see
   :mod:`.dedup`) and the ones likely to leave the conversation;
2. their order (:func:`.online_reorder.order_online`): the longest cached
   prefix first, then canonical popularity order;
3. the prompt (:func:`.prompts.render_messages`): blocks, then hints and the
   importance ranking;
4. the index learns the served sequence and the conversation its turn.
"""

from __future__ import annotations

from dataclasses import dataclass

from .blocks import Block
from .dedup import ConversationStore, TurnPlan
from .index import ContextIndex
from .online_reorder import order_online
from .prompts import Preamble, PromptLayout, render_messages

__all__ = ["ServedPrompt", "serve_request"]


@dataclass(frozen=True)
class ServedPrompt:
    """One request after :meth:`ContextPilot.serve`."""

    messages: list[dict]  # [system, user]
    report: dict  # blocks moved / deduplicated, tokens saved, expected cached tokens, order
    tenant: str
    preamble: Preamble  # the head of the system message (its key roots the tenant's prefix tree)
    ordered: list[Block]  # the blocks as written in the prompt, in prompt order
    turn: int | None  # conversation turn, when a conversation id was given


def serve_request(
    index: ContextIndex,
    conversations: ConversationStore,
    layout: PromptLayout,
    tenant: str,
    preamble: Preamble,
    blocks: list[Block],
    query: str,
    plan: TurnPlan | None,
) -> ServedPrompt:
    """Serve one request (see the module docstring); ``plan`` is its conversation turn, if any."""
    if plan is None:
        sent_idx = list(range(len(blocks)))
        sent = list(blocks)
        leaving: set[int] = set()
    else:
        sent_idx = [i for i, f in enumerate(plan.fates) if f.kind != "repeat"]
        sent = [plan.fates[i].block for i in sent_idx]
        leaving = {j for j, i in enumerate(sent_idx) if i in plan.leaving}
    order, expected_hit = order_online(index, tenant, preamble.key, sent, leaving) if sent else ([], 0)
    ordered = [sent[j] for j in order]
    position_of = {sent_idx[j]: pos + 1 for pos, j in enumerate(order)}
    relevance: list[str] = []
    hints: list[str] = []
    for i in range(len(blocks)):
        if i in position_of:
            relevance.append(f"[{position_of[i]}]")
        else:
            fate = plan.fates[i]  # type: ignore[union-attr]
            hints.append(fate.hint or "")
            relevance.append(f"(hint {len(hints)})")
    if hints:
        hints = [f"(hint {k + 1}) {h}" for k, h in enumerate(hints)]
    messages = render_messages(layout, preamble, ordered, relevance, query, hints)
    if ordered:
        index.record(tenant, preamble.key, preamble.tokens, [(b.key, b.tokens) for b in ordered])
    if plan is not None:
        originals = [(blocks[sent_idx[j]], pos + 1) for pos, j in enumerate(order)]
        conversations.commit(tenant, plan.conversation_id, originals, blocks)
    moved = sum(1 for pos, j in enumerate(order) if j != pos)
    report = {
        "blocks": len(blocks),
        "blocks_moved": moved,
        "blocks_deduplicated": len(blocks) - len(sent),
        "tokens_saved_by_dedup": plan.tokens_saved if plan else 0,
        "expected_cached_tokens": expected_hit,
        "order": [sent_idx[j] for j in order],
    }
    return ServedPrompt(messages, report, tenant, preamble, ordered, plan.turn if plan else None)
