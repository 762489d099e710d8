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
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Sequence

from .blocks import Block, make_block
from .chunking import chunk_text
from .lifetimes import RunLengthOdds, advance_runs
from .validation import UnknownIdError

__all__ = ["ConversationStore", "TurnPlan", "BlockFate", "Sighting"]


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
    ):
        self.max_conversations = max_conversations
        self.max_entries = max_entries
        self.hint_template = hint_template
        self.chunk_hint_template = chunk_hint_template
        self.chunk_min_tokens = chunk_min_tokens
        self.chunk_target_words = chunk_target_words
        self._convs: OrderedDict[tuple[str, str], Conversation] = OrderedDict()
        self._odds: dict[str, RunLengthOdds] = {}

    # ------------------------------------------------------------- lookups
    def get(self, tenant: str, conversation_id: str) -> Conversation:
        conv = self._convs.get((tenant, conversation_id))
        if conv is None:
            raise UnknownIdError(f"conversation_id: no conversation {conversation_id!r} for tenant {tenant!r}")
        return conv

    def forget(self, tenant: str, conversation_id: str) -> None:
        self.get(tenant, conversation_id)
        del self._convs[(tenant, conversation_id)]

    def forget_tenant(self, tenant: str) -> None:
        for key in [k for k in self._convs if k[0] == tenant]:
            del self._convs[key]
        self._odds.pop(tenant, None)

    def __len__(self) -> int:
        return len(self._convs)

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
        key = (tenant, conversation_id)
        conv = self._convs.get(key)
        if conv is None:
            conv = self._convs[key] = Conversation()
            while len(self._convs) > self.max_conversations:
                self._convs.popitem(last=False)
        else:
            self._convs.move_to_end(key)
        conv.turns += 1
        turn = conv.turns
        odds = self._odds.get(tenant)
        if odds is None:
            odds = self._odds[tenant] = RunLengthOdds()
        keys = (b.key for b, _ in sent) if present is None else (b.key for b in present)
        conv.runs = advance_runs(conv.runs, keys, odds)
        for block, position in sent:
            if block.key not in conv.blocks:
                conv.blocks[block.key] = Sighting(turn, position, block.label or f"#{block.short_id[:8]}")
            if block.tokens >= self.chunk_min_tokens:
                sighting = Sighting(turn, position, block.label or f"#{block.short_id[:8]}")
                for chunk in chunk_text(block.text, self.chunk_target_words):
                    conv.chunks.setdefault(chunk.key, sighting)
        while len(conv.blocks) + len(conv.chunks) > self.max_entries:
            victim = conv.chunks if len(conv.chunks) >= len(conv.blocks) else conv.blocks
            victim.popitem(last=False)
        return turn
