"""Conversation-level deduplication: never send the same block twice in one conversation.

Memory chat and agents put the same memories, documents and tool outputs in
front of turn after turn.  Once a block has been sent in a conversation, a
later turn replaces it with a short *reference hint* that names where it was
(turn and position, and the caller's id when the block had one), never its
text.  A block shorter than its hint is simply sent again.  Long blocks (tool outputs) are also compared chunk by chunk
(:mod:`.chunking`), so a resent log with a few new lines only sends the new
lines.

Each conversation also keeps how many turns in a row each block of its last
turn has been present, and each tenant the odds that a block stays another
turn (:mod:`.lifetimes`): the online reorder puts the blocks likely to leave
last, so the next turn reuses more of this one's prefix.  That part needs no
deduplication, so it also runs when deduplication is switched off.

State is per tenant and per conversation, bounded: at most
``max_conversations`` conversations (least recently used forgotten first) and
``max_conversation_entries`` remembered blocks and chunks each (oldest
first).  Checking a turn (:meth:`ConversationStore.check`) changes nothing;
only :meth:`ConversationStore.commit` records what was sent, so a request
that fails validation or is dropped leaves the conversation as it was.

Inside those bounds the store draws on the process memory budget
(:mod:`.memory_budget`), per tenant: one account for the conversations'
remembered blocks and chunks, one for the lifetimes (the tenant's odds and
each conversation's run lengths).  When the budget asks a tenant for memory
back, the tenant's least recently used conversations go first: a small
request trims the oldest entries of the coldest conversation, a larger one
drops whole conversations.  The conversation whose turn is being checked is
never evicted between its check and its commit.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Sequence

from .blocks import Block, make_block
from .chunking import chunk_text
from .lifetimes import ODDS_BYTES, RUN_BYTES, RunLengthOdds, advance_runs
from .memory_budget import BudgetAccount, EvictionRequest, MemoryBudget, process_budget, resident
from .validation import UnknownIdError

__all__ = ["ConversationStore", "TurnPlan", "BlockFate", "Sighting", "ENTRY_BYTES", "CONVERSATION_BYTES"]

#: approximate resident bytes of one remembered block or chunk (its key and sighting), and of one
#: conversation besides its entries (the record, its id, its places in the store's tables);
#: live bytes measured on CPython 3.11, rounded up
ENTRY_BYTES = resident(256)
CONVERSATION_BYTES = resident(1280)


@dataclass(frozen=True)
class Sighting:
    """Where a block or chunk was first sent in a conversation."""

    turn: int
    position: int  # 1-based position in that turn's prompt
    doc_id: str


@dataclass
class Conversation:
    turns: int = 0
    blocks: OrderedDict = field(default_factory=OrderedDict)  # block key -> Sighting
    chunks: OrderedDict = field(default_factory=OrderedDict)  # chunk key -> Sighting
    runs: dict = field(default_factory=dict)  # block key of the last turn -> turns present in a row


@dataclass(frozen=True)
class BlockFate:
    """What happens to one block of a turn."""

    kind: str  # "new" (sent as is), "repeat" (replaced by a hint) or "partial" (repeated chunks replaced)
    block: Block  # what is sent: the original, or the block with repeated chunks replaced
    hint: str | None = None  # for "repeat"
    tokens_saved: int = 0


@dataclass(frozen=True)
class TurnPlan:
    conversation_id: str
    turn: int
    fates: list[BlockFate]
    #: input positions of the blocks likely to leave the conversation before its next turn
    leaving: frozenset[int] = frozenset()

    @property
    def tokens_saved(self) -> int:
        return sum(f.tokens_saved for f in self.fates)


class ConversationStore:
    def __init__(
        self,
        max_conversations: int,
        max_entries: int,
        hint_template: str,
        chunk_hint_template: str,
        chunk_min_tokens: int,
        chunk_target_words: int,
        budget: MemoryBudget | None = None,
    ):
        self.max_conversations = max_conversations
        self.max_entries = max_entries
        self.hint_template = hint_template
        self.chunk_hint_template = chunk_hint_template
        self.chunk_min_tokens = chunk_min_tokens
        self.chunk_target_words = chunk_target_words
        self.budget = budget if budget is not None else process_budget()
        self._lock = threading.RLock()
        #: every conversation, least recently used first (the max_conversations bound)
        self._convs: OrderedDict[tuple[str, str], Conversation] = OrderedDict()
        #: the same, per tenant (the budget evicts a tenant's coldest conversations)
        self._by_tenant: dict[str, OrderedDict[str, Conversation]] = {}
        self._odds: dict[str, RunLengthOdds] = {}
        #: per tenant: the accounts of its conversations and of its lifetimes
        self._accounts: dict[str, tuple[BudgetAccount, BudgetAccount]] = {}
        #: the conversation checked last, whose commit may follow: the budget leaves it alone
        self._inflight: tuple[str, str] | None = None

    # ------------------------------------------------------------- lookups
    def get(self, tenant: str, conversation_id: str) -> Conversation:
        conv = self._convs.get((tenant, conversation_id))
        if conv is None:
            raise UnknownIdError(f"conversation_id: no conversation {conversation_id!r} for tenant {tenant!r}")
        return conv

    def forget(self, tenant: str, conversation_id: str) -> None:
        with self._lock:
            conv = self.get(tenant, conversation_id)
            self._remove(tenant, conversation_id, conv, None)

    def forget_tenant(self, tenant: str) -> None:
        with self._lock:
            for cid, conv in list(self._by_tenant.get(tenant, {}).items()):
                self._remove(tenant, cid, conv, None)
            self._by_tenant.pop(tenant, None)
            self._odds.pop(tenant, None)
            accounts = self._accounts.pop(tenant, None)
            if accounts is not None:
                for account in accounts:
                    account.close()

    def close(self) -> None:
        """Forget everything and give the store's memory back to the budget."""
        with self._lock:
            for tenant in list(self._accounts):
                self.forget_tenant(tenant)
            self._convs.clear()
            self._by_tenant.clear()
            self._odds.clear()

    def __len__(self) -> int:
        return len(self._convs)

    # -------------------------------------------------------------- memory
    def _accounts_of(self, tenant: str) -> tuple[BudgetAccount, BudgetAccount]:
        accounts = self._accounts.get(tenant)
        if accounts is None:
            accounts = self._accounts[tenant] = (
                self.budget.open("conversations", tenant, self._evict_conversations),
                self.budget.open("lifetimes", tenant, self._evict_lifetimes),
            )
        return accounts

    def _remove(self, tenant: str, cid: str, conv: Conversation, reason: str | None) -> None:
        """Drop one conversation and release its memory (``reason``: the bound that evicted it)."""
        del self._convs[(tenant, cid)]
        del self._by_tenant[tenant][cid]
        accounts = self._accounts.get(tenant)
        if accounts is None:
            return
        entries = len(conv.blocks) + len(conv.chunks)
        runs = len(conv.runs)
        for account, e, b in (
            (accounts[0], 1 + entries, CONVERSATION_BYTES + entries * ENTRY_BYTES),
            (accounts[1], runs, runs * RUN_BYTES),
        ):
            if reason is None:
                account.charge(-e, -b)
            elif e or b:
                account.evicted(reason, e, b)

    def _trim(self, tenant: str, conv: Conversation, n: int, reason: str) -> int:
        """Forget the ``n`` oldest entries of one conversation (chunks and blocks, the larger table first)."""
        done = 0
        while done < n and (conv.blocks or conv.chunks):
            victim = conv.chunks if len(conv.chunks) >= len(conv.blocks) else conv.blocks
            victim.popitem(last=False)
            done += 1
        if done and tenant in self._accounts:
            self._accounts[tenant][0].evicted(reason, done, done * ENTRY_BYTES)
        return done

    def _evict_conversations(self, tenant: str, request: EvictionRequest) -> None:
        """The budget's evictor: the tenant's coldest conversations, trimmed or dropped."""
        if not self._lock.acquire(blocking=False):
            return  # in use by another thread: the next settle asks again
        try:
            self._evict(tenant, request, trim=True)
        finally:
            self._lock.release()

    def _evict_lifetimes(self, tenant: str, request: EvictionRequest) -> None:
        """The budget's evictor for lifetimes: run lengths go with their (coldest) conversations.

        A tenant without conversations gives back its odds.
        """
        if not self._lock.acquire(blocking=False):
            return
        try:
            if not self._by_tenant.get(tenant):
                self._drop_odds(tenant, request.reason)
                return
            self._evict(tenant, request, trim=False)
        finally:
            self._lock.release()

    def _drop_odds(self, tenant: str, reason: str) -> None:
        accounts = self._accounts.get(tenant)
        if self._odds.pop(tenant, None) is not None and accounts is not None:
            accounts[1].evicted(reason, 0, ODDS_BYTES)
        if not self._by_tenant.get(tenant):
            self._by_tenant.pop(tenant, None)
            for account in self._accounts.pop(tenant, ()):
                account.close()

    def _evict(self, tenant: str, request: EvictionRequest, trim: bool) -> None:
        convs = self._by_tenant.get(tenant)
        accounts = self._accounts.get(tenant)
        if not convs or accounts is None:
            return
        conv_account, life_account = accounts

        def held() -> tuple[int, int]:
            if trim:
                return conv_account.entries, conv_account.bytes
            # run lengths only leave with their conversations: what both give back counts
            return conv_account.entries + life_account.entries, conv_account.bytes + life_account.bytes

        start_e, start_b = held()
        goal_e, goal_b = start_e - request.entries, start_b - request.bytes
        moved = False
        while convs:
            now_e, now_b = held()
            left_e, left_b = now_e - goal_e, now_b - goal_b
            if left_e <= 0 and left_b <= 0:
                return
            cid, conv = next(iter(convs.items()))
            if (tenant, cid) == self._inflight:
                if moved or len(convs) == 1:
                    return
                convs.move_to_end(cid)  # it is in use: its turn is being served
                self._convs.move_to_end((tenant, cid))
                moved = True
                continue
            entries = len(conv.blocks) + len(conv.chunks)
            if trim and entries > 1 and (1 + entries > left_e and CONVERSATION_BYTES + entries * ENTRY_BYTES > left_b):
                # a small request: the oldest entries of the coldest conversation are enough
                self._trim(tenant, conv, max(left_e, -(-left_b // ENTRY_BYTES), 1), request.reason)
                return
            self._remove(tenant, cid, conv, request.reason)

    # --------------------------------------------------------------- check
    def check(
        self,
        tenant: str,
        conversation_id: str,
        blocks: Sequence[Block],
        count_tokens: Callable[[str], int],
        hint_template: str | None = None,
        deduplicate: bool = True,
    ) -> TurnPlan:
        """Decide each block's fate against the conversation so far (changes nothing).

        With ``deduplicate=False`` every block is sent as is; the plan still
        says which blocks are likely to leave before the next turn.
        """
        with self._lock:
            return self._check(tenant, conversation_id, blocks, count_tokens, hint_template, deduplicate)

    def _check(
        self,
        tenant: str,
        conversation_id: str,
        blocks: Sequence[Block],
        count_tokens: Callable[[str], int],
        hint_template: str | None,
        deduplicate: bool,
    ) -> TurnPlan:
        self._inflight = (tenant, conversation_id)
        conv = self._convs.get((tenant, conversation_id)) or Conversation()
        odds = self._odds.get(tenant)
        leaving: frozenset[int] = frozenset()
        if odds is not None:
            leaving = frozenset(i for i, b in enumerate(blocks) if odds.likely_to_leave(conv.runs.get(b.key, 0) + 1))
        if not deduplicate:
            return TurnPlan(conversation_id, conv.turns + 1, [BlockFate("new", b) for b in blocks], leaving)
        template = hint_template or self.hint_template
        fates: list[BlockFate] = []
        for b in blocks:
            seen = conv.blocks.get(b.key)
            if seen is not None:
                hint = template.format(
                    doc_id=seen.doc_id, turn=seen.turn, position=seen.position, words=0, hash=b.short_id
                )
                saved = b.tokens - count_tokens(hint)
                if saved > 0:  # a block shorter than its hint is cheaper to send again
                    fates.append(BlockFate("repeat", b, hint, saved))
                    continue
            if b.tokens >= self.chunk_min_tokens and conv.chunks:
                rewritten = self._rewrite_chunks(b, conv, count_tokens)
                if rewritten is not None:
                    fates.append(BlockFate("partial", rewritten, None, max(0, b.tokens - rewritten.tokens)))
                    continue
            fates.append(BlockFate("new", b))
        return TurnPlan(conversation_id, conv.turns + 1, fates, leaving)

    def _rewrite_chunks(self, b: Block, conv: Conversation, count_tokens) -> Block | None:
        pieces: list[str] = []
        replaced = False
        run: tuple[Sighting, int] | None = None  # a run of repeated chunks from one source: (sighting, words)
        run_text: list[str] = []

        def flush() -> None:
            nonlocal run, replaced
            if run is None:
                return
            sighting, words = run
            hint = self.chunk_hint_template.format(
                doc_id=sighting.doc_id, turn=sighting.turn, position=sighting.position, words=words, hash=""
            )
            original = "".join(run_text)
            if len(hint) < len(original):
                pieces.append(hint + ("\n" if original.endswith("\n") else " "))
                replaced = True
            else:
                pieces.append(original)
            run = None
            run_text.clear()

        for chunk in chunk_text(b.text, self.chunk_target_words):
            seen = conv.chunks.get(chunk.key)
            if seen is None:
                flush()
                pieces.append(chunk.text)
                continue
            if run is not None and run[0] != seen:
                flush()
            run = (seen, (run[1] if run else 0) + chunk.words)
            run_text.append(chunk.text)
        flush()
        if not replaced:
            return None
        text = "".join(pieces)
        return make_block(text, count_tokens, "rewritten block")

    # -------------------------------------------------------------- commit
    def commit(
        self,
        tenant: str,
        conversation_id: str,
        sent: Sequence[tuple[Block, int]],
        present: Sequence[Block] | None = None,
    ) -> int:
        """Record a turn: each ``(original block, position in the prompt)`` now counts as sent.

        ``present`` is every block of the turn, sent or replaced by a hint
        (default: the sent ones); it updates how long blocks stay.
        """
        with self._lock:
            try:
                turn = self._commit(tenant, conversation_id, sent, present)
            finally:
                if self._inflight == (tenant, conversation_id):
                    self._inflight = None  # its turn is recorded (or failed): an ordinary conversation again
        self.budget.settle(tenant)
        return turn

    def _commit(
        self, tenant: str, conversation_id: str, sent: Sequence[tuple[Block, int]], present: Sequence[Block] | None
    ) -> int:
        # everything that can fail first, so a failure changes nothing
        chunked = [
            (block, position, chunk_text(block.text, self.chunk_target_words) if block.tokens >= self.chunk_min_tokens
             else ())
            for block, position in sent
        ]
        key = (tenant, conversation_id)
        conv_account, life_account = self._accounts_of(tenant)
        conv = self._convs.get(key)
        if conv is None:
            conv = self._convs[key] = Conversation()
            self._by_tenant.setdefault(tenant, OrderedDict())[conversation_id] = conv
            conv_account.charge(1, CONVERSATION_BYTES)
            while len(self._convs) > self.max_conversations:
                (old_tenant, old_cid), old = next(iter(self._convs.items()))
                self._remove(old_tenant, old_cid, old, "max_conversations")
        else:
            self._convs.move_to_end(key)
            self._by_tenant[tenant].move_to_end(conversation_id)
        conv.turns += 1
        turn = conv.turns
        odds = self._odds.get(tenant)
        if odds is None:
            odds = self._odds[tenant] = RunLengthOdds()
            life_account.charge(0, ODDS_BYTES)
        keys = (b.key for b, _ in sent) if present is None else (b.key for b in present)
        runs_before = len(conv.runs)
        conv.runs = advance_runs(conv.runs, keys, odds)
        grown = len(conv.runs) - runs_before
        if grown:
            life_account.charge(grown, grown * RUN_BYTES)
        entries_before = len(conv.blocks) + len(conv.chunks)
        for block, position, chunks in chunked:
            if block.key not in conv.blocks:
                conv.blocks[block.key] = Sighting(turn, position, block.label or f"#{block.short_id[:8]}")
            if chunks:
                sighting = Sighting(turn, position, block.label or f"#{block.short_id[:8]}")
                for chunk in chunks:
                    conv.chunks.setdefault(chunk.key, sighting)
        entries = len(conv.blocks) + len(conv.chunks)
        if entries > entries_before:
            conv_account.charge(entries - entries_before, (entries - entries_before) * ENTRY_BYTES)
        if entries > self.max_entries:
            self._trim(tenant, conv, entries - self.max_entries, "max_conversation_entries")
        return turn
