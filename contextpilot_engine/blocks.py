"""Context blocks: identity, weight and the token counters that give the weight.

A *block* is one unit of context in front of a query: a retrieved chunk, a
memory, a tool result.  Two blocks are the same block exactly when their texts
are equal, so identity is a content hash (xxh3-128 of the UTF-8 text) rather
than a caller-chosen id: the same chunk retrieved by two pipelines that number
their documents differently is still recognised as shared.

The weight of a block is its token count, because what a prefix cache saves is
tokens of prefill, not documents.  The count comes from a pluggable
:class:`TokenCounter`; the engine plugins pass the engine's own tokenizer, the
default is a fast estimate that needs no vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence, Union, runtime_checkable

import xxhash

__all__ = [
    "Block",
    "BlockInput",
    "TokenCounter",
    "estimate_tokens",
    "block_key",
    "block_keys",
    "MAX_CONTEXT_TOKENS",
    "make_block",
    "block_fields",
    "checked_count",
    "count_texts",
    "tokenizer_counter",
]

#: What callers may pass as one block: its text, or a dict with ``text`` and an optional ``id``.
BlockInput = Union[str, dict]


@runtime_checkable
class TokenCounter(Protocol):
    """Anything that maps a text to its number of tokens."""

    def __call__(self, text: str) -> int: ...


def estimate_tokens(text: str) -> int:
    """Fast token estimate: about four characters per token, at least one.

    Byte-level BPE vocabularies average close to four characters per token on
    English prose and code; the estimate is only used to weigh blocks against
    each other, so a constant factor does not change any ordering decision.
    """
    return max(1, (len(text) + 3) // 4)


def tokenizer_counter(tokenizer: Any) -> TokenCounter:
    """Wrap a Hugging Face style tokenizer (anything with ``encode``) as a counter.

    The counter keeps counts by content key and tokenizes the unseen texts of
    a request in one batched call (:class:`.token_counts.CachedTokenCounter`).
    Special tokens are left out: a block sits in the middle of a prompt,
    where the chat template adds none.
    """
    from .token_counts import CachedTokenCounter

    return CachedTokenCounter(tokenizer)


def count_texts(count_tokens: Callable[[str], int], texts: Sequence[str], keys: Sequence[int]) -> list[int]:
    """Token counts of ``texts`` (content keys ``keys``), in one batched call where the counter has one."""
    many = getattr(count_tokens, "count_many", None)
    if many is not None:
        return many(texts, keys)
    return [count_tokens(t) for t in texts]


def block_key(text: str) -> int:
    """Content identity of a block: xxh3-128 of its UTF-8 text, as an int."""
    return xxhash.xxh3_128_intdigest(text.encode("utf-8"))


def block_keys(texts: Sequence[str], wheres: Sequence[str]) -> list[int]:
    """:func:`block_key` of each text; a text that is not valid Unicode (a lone surrogate) is an error naming it."""
    try:
        return [block_key(t) for t in texts]
    except UnicodeEncodeError:
        for text, where in zip(texts, wheres):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ValueError(f"{where}: the text is not valid Unicode ({exc.reason} at character "
                                 f"{exc.start})") from None
        raise


#: most tokens one context may hold (the overlap kernels count them in 32 bits)
MAX_CONTEXT_TOKENS = 2**31 - 1


@dataclass(frozen=True, slots=True, eq=False)
class Block:
    """One context block, normalised.

    ``source`` is exactly what the caller passed (a str or a dict), so results
    hand back the caller's own objects in the new order.  Blocks compare by
    identity; compare ``key`` to ask whether two blocks have the same content.
    """

    key: int
    text: str
    tokens: int
    label: str | None
    source: Any

    @property
    def short_id(self) -> str:
        """A short printable form of the key (16 hex digits), for hints and logs."""
        return f"{self.key >> 64:016x}"


def block_fields(item: BlockInput, where: str) -> tuple[str, str | None]:
    """Validate one caller item; its text and label (the caller's id, as a string)."""
    if isinstance(item, str):
        text, label = item, None
    elif isinstance(item, dict):
        if "text" not in item:
            raise ValueError(f"{where}: a dict block needs a 'text' key (got keys {sorted(map(str, item))})")
        text = item["text"]
        if not isinstance(text, str):
            raise TypeError(f"{where}['text']: expected str, got {type(text).__name__}")
        raw_label = item.get("id")
        if raw_label is not None and (not isinstance(raw_label, (str, int)) or isinstance(raw_label, bool)):
            raise TypeError(f"{where}['id']: expected str or int, got {type(raw_label).__name__}")
        label = None if raw_label is None else str(raw_label)
    else:
        raise TypeError(
            f"{where}: expected a str or a dict with 'text' (and optional 'id'), got {type(item).__name__}"
        )
    if not text.strip():
        raise ValueError(f"{where}: block text is empty")
    return text, label


def checked_count(tokens: Any, where: str) -> int:
    """A token counter's answer, validated (at least 1)."""
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0 or tokens > MAX_CONTEXT_TOKENS:
        raise ValueError(f"{where}: the token counter returned {tokens!r}; it must return an int from 0 to "
                         f"{MAX_CONTEXT_TOKENS}")
    return max(1, tokens)


def make_block(item: BlockInput, count_tokens: Callable[[str], int], where: str) -> Block:
    """Normalise one caller item into a :class:`Block`.

    ``where`` names the item in error messages (for example ``contexts[2][5]``)
    so a rejected call says exactly which element was wrong.
    """
    text, label = block_fields(item, where)
    (key,) = block_keys([text], [where])
    return Block(key, text, checked_count(count_tokens(text), where), label, item)
