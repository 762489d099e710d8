"""Deduplication against the prompt being served: a block is replaced only where the model still sees it.

Chat clients resend the conversation so far with every turn: earlier user
and assistant messages, tool outputs, sometimes documents pasted into a
message.  When a context block's full text is already one of those messages
(or inside one), sending it again in the documents costs prefill for nothing,
so it becomes a short hint that names the message holding it.  The rule is
strict: a block is replaced only if its *whole* text is present elsewhere in
this very prompt (a long block may instead have runs of its content-defined
chunks replaced, each run present elsewhere).  Nothing that exists only in
an earlier request, which the client may not have resent, is ever hidden.

:class:`PromptCopies` holds the rest of the prompt, searchable;
:func:`copy_fates` decides, for the blocks that are not part of the cached
prefix (those cost nothing to send again and their removal would break the
prefix), which to replace.
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Any, Callable, Collection, Sequence

from .blocks import Block, make_block
from .chunking import chunk_text
from .dedup import BlockFate

__all__ = ["PromptCopies", "copy_fates", "message_text"]


class PromptCopies:
    """Texts the model sees elsewhere in the prompt, each with a name for hints (``"message 3 (tool)"``)."""

    def __init__(self, parts: Sequence[tuple[str, str]]):
        self._names = [name for name, _ in parts]
        self._texts = [text for _, text in parts]
        self._starts: list[int] = []
        pos = 0
        for text in self._texts:
            self._starts.append(pos)
            pos += len(text) + 1
        # one string (parts separated by NUL) so that a lookup is one search, whatever the number of parts
        self._joined = "\x00".join(self._texts)

    @classmethod
    def from_messages(cls, messages: Sequence[Any], first_number: int = 1) -> "PromptCopies":
        """The text of chat messages, named ``"message N (role)"`` with N counted from ``first_number``."""
        parts = []
        for n, msg in enumerate(messages, start=first_number):
            if isinstance(msg, dict):
                text = message_text(msg.get("content"))
                if text:
                    parts.append((f"message {n} ({msg.get('role', '?')})", text))
        return cls(parts)

    def __bool__(self) -> bool:
        return bool(self._joined)

    def where(self, text: str) -> str | None:
        """The name of a part that holds ``text`` in full, or None."""
        if not text or len(text) > len(self._joined):
            return None
        at = self._joined.find(text)
        while at >= 0:
            i = bisect_right(self._starts, at) - 1
            if at + len(text) <= self._starts[i] + len(self._texts[i]):
                return self._names[i]
            at = self._joined.find(text, at + 1)  # the match ran across two parts: look further
        return None


def message_text(content: Any) -> str:
    """The text a chat message shows the model: a string, or its text parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            p["text"] for p in content if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        )
    return ""


def copy_fates(
    blocks: Sequence[Block],
    candidates: Collection[int],
    copies: PromptCopies,
    count_tokens: Callable[[str], int],
    hint_template: str,
    chunk_hint_template: str,
    chunk_min_tokens: int,
    chunk_target_words: int,
) -> dict[int, BlockFate]:
    """For the ``candidates`` (input indices) whose text is elsewhere in the prompt, what to send instead.

    ``"repeat"``: the whole block is elsewhere and its hint is shorter;
    ``"partial"``: a long block whose runs of chunks are elsewhere, with those
    runs replaced by chunk hints.  Blocks not in the result are sent as they are.
    """
    fates: dict[int, BlockFate] = {}
    for i in candidates:
        b = blocks[i]
        where = copies.where(b.text)
        if where is not None:
            hint = hint_template.format(doc_id=_doc_id(b), where=where, hash=b.short_id)
            saved = b.tokens - count_tokens(hint)
            if saved > 0:  # a block shorter than its hint is cheaper to send again
                fates[i] = BlockFate("repeat", b, hint, saved)
            continue
        if b.tokens >= chunk_min_tokens:
            rewritten = _rewrite_chunks(b, copies, count_tokens, chunk_hint_template, chunk_target_words)
            if rewritten is not None:
                fates[i] = BlockFate("partial", rewritten, None, max(0, b.tokens - rewritten.tokens))
    return fates


def _doc_id(b: Block) -> str:
    return b.label or f"#{b.short_id[:8]}"


def _rewrite_chunks(
    b: Block, copies: PromptCopies, count_tokens: Callable[[str], int], template: str, target_words: int
) -> Block | None:
    """``b`` with each run of chunks present elsewhere (in one part) replaced by a hint; None if none is."""
    pieces: list[str] = []
    replaced = False
    run_where: str | None = None
    run_text: list[str] = []
    run_words = 0

    def flush() -> None:
        nonlocal run_where, run_words, replaced
        if run_where is None:
            return
        original = "".join(run_text)
        hint = template.format(words=run_words, where=run_where)
        if len(hint) < len(original):
            pieces.append(hint + ("\n" if original.endswith("\n") else " "))
            replaced = True
        else:
            pieces.append(original)
        run_where, run_words = None, 0
        run_text.clear()

    for chunk in chunk_text(b.text, target_words):
        where = copies.where(chunk.text.strip())
        if where is None:
            flush()
            pieces.append(chunk.text)
            continue
        if run_where is not None and where != run_where:
            flush()
        run_where = where
        run_words += chunk.words
        run_text.append(chunk.text)
    flush()
    if not replaced:
        return None
    return make_block("".join(pieces), count_tokens, "rewritten block")
