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

from .batch_reorder import plan_batch
from .blocks import Block
from .candidates import CandidateConfig
from .config import PilotConfig
from .dedup import BlockFate, ConversationStore, TurnPlan
from .index import ContextIndex
from .kernels import OverlapBackend
from .online_reorder import cached_prefix, order_rest
from .prompt_copies import PromptCopies, copy_fates
from .prompts import Preamble, PromptLayout, render_messages
from .schedule import apply_aging_bound

__all__ = ["ServedPrompt", "PendingRequest", "GroupRequest", "serve_request", "serve_group"]


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
    draft = _draft(index, config, count_tokens, tenant, preamble, blocks, turn, copies)
    leaving = turn.leaving if turn is not None else ()
    rest = order_rest(index, tenant, draft.sent_view, draft.rest, leaving, draft.prefix)
    return _complete(index, conversations, layout, draft, draft.prefix + rest, query, turn)


@dataclass(frozen=True)
class PendingRequest:
    """A request waiting to be served with others (:meth:`ContextPilot.serve_group`), blocks already parsed."""

    blocks: list[Block]
    query: str
    conversation_id: str | None = None
    system_instruction: str | None = None
    tenant: str | None = None
    #: the rest of the prompt the caller serves (see :meth:`ContextPilot.serve`)
    copies: PromptCopies | None = None


@dataclass(frozen=True)
class GroupRequest:
    """One request, outside any conversation, of a group that arrived together (:func:`serve_group`)."""

    tenant: str
    preamble: Preamble
    blocks: list[Block]
    query: str


def serve_group(
    index: ContextIndex,
    conversations: ConversationStore,
    layout: PromptLayout,
    config: PilotConfig,
    count_tokens: Callable[[str], int],
    backend: OverlapBackend,
    requests: list[GroupRequest],
) -> tuple[list[ServedPrompt], list[int]]:
    """Serve requests that arrived together, planned jointly; returns them (input order) and an admission order.

    Requests of one tenant and preamble are planned like
    :meth:`~contextpilot_engine.pilot.ContextPilot.optimize_batch`
    (:func:`.batch_reorder.plan_batch`, started from each one's cached
    prefix, which stays first): blocks that several of them share form a
    common prefix, and the admission order runs the requests that share a
    prefix back to back (depth first under the aging bound).  A group of one
    is served as :func:`serve_request` would.  Groups are admitted in the
    order their first request arrived; each request is recorded in the index
    in admission order, exactly as if it had been served alone at that point.
    Requests in a conversation are not grouped (their turn decides their
    order and deduplication): the caller serves them with :func:`serve_request`.
    """
    served: list[ServedPrompt | None] = [None] * len(requests)
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(requests):
        groups.setdefault((r.tenant, r.preamble.key) if r.blocks else (i,), []).append(i)
    admission: list[int] = []
    for members in groups.values():
        first = requests[members[0]]
        drafts = [_draft(index, config, count_tokens, first.tenant, first.preamble, requests[i].blocks, None, None)
                  for i in members]
        if len(members) == 1:
            orders = [d.prefix + order_rest(index, first.tenant, d.sent_view, d.rest, (), d.prefix) for d in drafts]
            schedule = list(range(len(members)))
        else:
            plan = plan_batch(
                [d.sent_view for d in drafts], [d.prefix for d in drafts], backend, config.strategies,
                CandidateConfig.for_batch(len(drafts), sum(len(d.sent_view) for d in drafts)),
            )
            orders, schedule = plan.orders, apply_aging_bound(plan.dfs_order, config.max_delay)
        for c in schedule:
            i = members[c]
            served[i] = _complete(index, conversations, layout, drafts[c], orders[c], requests[i].query, None)
            admission.append(i)
    return served, admission  # type: ignore[return-value]


@dataclass
class _Draft:
    """A request planned up to the order of its tail."""

    tenant: str
    preamble: Preamble
    blocks: list[Block]
    #: input indices of the cached prefix (first, in cached order, always sent in full)
    prefix: list[int]
    #: input indices of the other blocks that are sent (not replaced by a hint)
    rest: list[int]
    expected_hit: int
    fates: dict[int, BlockFate]
    #: the blocks as they will be written (a chunk-deduplicated block replaced), by input index
    sent_view: list[Block]


def _draft(
    index: ContextIndex,
    config: PilotConfig,
    count_tokens: Callable[[str], int],
    tenant: str,
    preamble: Preamble,
    blocks: list[Block],
    turn: TurnPlan | None,
    copies: PromptCopies | None,
) -> _Draft:
    """Steps 1 and 2 of the module docstring: the cached prefix, and which other blocks become hints."""
    prefix, rest, expected_hit = cached_prefix(index, tenant, preamble.key, blocks)
    fates: dict[int, BlockFate] = {}
    if turn is not None and copies and config.deduplicate:
        fates = copy_fates(
            blocks, rest, copies, count_tokens, config.copy_hint_template, config.copy_chunk_hint_template,
            config.chunk_min_tokens, config.chunk_target_words,
        )
    if fates:
        rest = [i for i in rest if not (i in fates and fates[i].kind == "repeat")]
        sent_view = [fates[i].block if i in fates and fates[i].block is not None else b for i, b in enumerate(blocks)]
    else:
        sent_view = blocks
    return _Draft(tenant, preamble, blocks, prefix, rest, expected_hit, fates, sent_view)


def _complete(
    index: ContextIndex,
    conversations: ConversationStore,
    layout: PromptLayout,
    draft: _Draft,
    order: list[int],
    query: str,
    turn: TurnPlan | None,
) -> ServedPrompt:
    """Steps 4 and 5: the prompt for ``order`` (the sent blocks' input indices), and the bookkeeping."""
    blocks, fates, tenant, preamble = draft.blocks, draft.fates, draft.tenant, draft.preamble
    ordered = [draft.sent_view[i] for i in order]
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
        "expected_cached_tokens": draft.expected_hit,
        "order": order,
    }
    return ServedPrompt(messages, report, tenant, preamble, ordered, turn.turn if turn is not None else None)
