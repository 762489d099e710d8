"""One online request, end to end: cached prefix, copies elsewhere in the prompt, order, prompt, bookkeeping.

:class:`~contextpilot_engine.pilot.ContextPilot` validates input and holds
the lock; :func:`serve_request` does the work for one request whose blocks
are parsed:

1. the longest cached prefix of the blocks (:func:`.online_reorder.cached_prefix`):
   those blocks go first, in the cached order, and are always sent in full,
   since the engine reuses their KV and leaving one out would break the
   prefix;
2. with a conversation and deduplication on, each other block whose text is
   present elsewhere in the prompt being served (``copies``, see
   :mod:`.prompt_copies`) becomes a hint to that copy; nothing is ever
   replaced by a reference to something the prompt does not hold;
3. the rest in canonical popularity order, blocks likely to leave the
   conversation last (:mod:`.lifetimes`);
4. the prompt (:func:`.prompts.render_messages`): blocks, then hints and the
   importance ranking;
5. the index learns the served sequence and the conversation its turn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .blocks import Block
from .config import PilotConfig
from .dedup import BlockFate, ConversationStore, TurnPlan
from .index import ContextIndex
from .online_reorder import cached_prefix, order_rest
from .prompt_copies import PromptCopies, copy_fates
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
    config: PilotConfig,
    count_tokens: Callable[[str], int],
    tenant: str,
    preamble: Preamble,
    blocks: list[Block],
    query: str,
    turn: TurnPlan | None,
    copies: PromptCopies | None,
) -> ServedPrompt:
    """Serve one request (see the module docstring); ``turn`` is its conversation turn, if any."""
    prefix, rest, expected_hit = cached_prefix(index, tenant, preamble.key, blocks)
    fates: dict[int, BlockFate] = {}
    if turn is not None and copies and config.deduplicate:
        fates = copy_fates(
            blocks, rest, copies, count_tokens, config.copy_hint_template, config.copy_chunk_hint_template,
            config.chunk_min_tokens, config.chunk_target_words,
        )
    hinted = {i for i, f in fates.items() if f.kind == "repeat"}
    sent = {i: fates[i].block if i in fates else b for i, b in enumerate(blocks) if i not in hinted}
    rest = [i for i in rest if i not in hinted]
    leaving = turn.leaving if turn is not None else ()
    order = prefix + order_rest(index, tenant, [sent.get(i, b) for i, b in enumerate(blocks)], rest, leaving)
    ordered = [sent[i] for i in order]
    position_of = {i: pos + 1 for pos, i in enumerate(order)}
    relevance: list[str] = []
    hints: list[str] = []
    for i in range(len(blocks)):
        if i in position_of:
            relevance.append(f"[{position_of[i]}]")
        else:
            hints.append(f"(hint {len(hints) + 1}) {fates[i].hint}")
            relevance.append(f"(hint {len(hints)})")
    messages = render_messages(layout, preamble, ordered, relevance, query, hints)
    if ordered:
        index.record(tenant, preamble.key, preamble.tokens, [(b.key, b.tokens) for b in ordered])
    if turn is not None:
        conversations.commit(tenant, turn.conversation_id, [(blocks[i], pos + 1) for pos, i in enumerate(order)], blocks)
    report = {
        "blocks": len(blocks),
        "blocks_moved": sum(1 for pos, i in enumerate(order) if i != pos),
        "blocks_deduplicated": len(blocks) - len(order),
        "tokens_saved_by_dedup": sum(f.tokens_saved for f in fates.values()),
        "expected_cached_tokens": expected_hit,
        "order": order,
    }
    return ServedPrompt(messages, report, tenant, preamble, ordered, turn.turn if turn is not None else None)
