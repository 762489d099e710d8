"""Binding a served prompt to the engine's pages, after the engine has tokenized it.

The rewrite knows the system message's layout (preamble, one line per
block); the engine knows the prompt's token ids.  :func:`bind_served_prompt`
joins the two: it finds where each block ends, in tokens, from the
vocabulary's byte lengths (:class:`TokenByteTable`) or, for other
vocabularies, the tokenizer's character offsets (asked of the engine's own
tokenizer call), so nothing is tokenized twice, and ties the prompt's nodes
to the canonical keys of its full pages (:meth:`contextpilot_engine.index.ContextIndex.bind`).
From then on page events tell the index, page by page, which of these blocks
the engine still holds.
"""

from __future__ import annotations

import threading
import weakref
from array import array
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from contextpilot_engine.index import ContextIndex
from contextpilot_engine.pages import chain_page_keys
from contextpilot_engine.prompts import PromptLayout, block_char_ends

if TYPE_CHECKING:
    import numpy as np

from .conversation import Plan

__all__ = ["Located", "locate_blocks", "bind_served_prompt", "token_ends_from_offsets", "TokenByteTable"]


def _byte_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte value (the GPT-2 scheme), char -> byte."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(
        range(ord("\xae"), ord("\xff") + 1)
    )
    chars = list(keep)
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars)}


class TokenByteTable:
    """The UTF-8 length of every token of a byte-level BPE vocabulary, to locate tokens without offsets.

    In a byte-level BPE vocabulary (GPT-2, Llama 3, Qwen, DeepSeek, ...) every
    token stands for a fixed byte string, so the byte offset of each token of
    a prompt is the running sum of the lengths before it: block boundaries
    follow from the token ids alone, with no second tokenization and without
    asking the engine's tokenizer for character offsets (whose Python-side
    lists cost more than everything else the request path does).  Added
    tokens (chat-template markers) stand for their literal text.
    :meth:`from_tokenizer` gives None for other vocabularies (SentencePiece,
    WordPiece), which then need offsets.
    """

    def __init__(self, lengths: "np.ndarray", pieces: list[bytes]):
        self.lengths = lengths
        #: the bytes each token stands for
        self.pieces = pieces

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> "TokenByteTable | None":
        import numpy as np

        try:
            size = len(tokenizer)
            pieces = tokenizer.convert_ids_to_tokens(list(range(size)))
            added = {int(i): str(t) for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
        except Exception:  # not a Hugging Face tokenizer: no table
            return None
        alphabet = _byte_alphabet()
        lengths = np.zeros(size, dtype=np.int64)
        raw: list[bytes] = []
        for i, piece in enumerate(pieces):
            if i in added:
                b = added[i].encode("utf-8")
            elif piece is None:
                b = b""
            elif all(c in alphabet for c in piece):
                b = bytes(alphabet[c] for c in piece)
            else:
                return None  # a token that is not a byte string: not a byte-level vocabulary
            raw.append(b)
            lengths[i] = len(b)
        return cls(lengths, raw)

    def decode(self, token_ids: Sequence[int]) -> str | None:
        """The text of a prompt's tokens (None if an id is out of range or the bytes are not UTF-8)."""
        pieces = self.pieces
        try:
            return b"".join([pieces[i] for i in token_ids]).decode("utf-8")
        except (IndexError, TypeError, UnicodeDecodeError):
            return None

    def token_starts(self, token_ids: Sequence[int], prompt_bytes: int) -> "np.ndarray | None":
        """Byte offset of each token's start; None when the lengths do not add up to the prompt's."""
        import numpy as np

        ids = np.frombuffer(token_ids, dtype=np.int64) if isinstance(token_ids, array) else np.asarray(
            token_ids, dtype=np.int64
        )
        if not len(ids) or ids.min() < 0 or ids.max() >= len(self.lengths):
            return None
        ends = np.cumsum(self.lengths[ids])
        if int(ends[-1]) != prompt_bytes:
            return None  # the tokenizer changed the text (normalisation, a prefix space): cannot trust it
        return ends - self.lengths[ids]

    @classmethod
    def shared(cls, tokenizer: Any) -> "TokenByteTable | None":
        """The table of ``tokenizer``, built once per tokenizer object and shared by every state using it.

        Building it walks the whole vocabulary; a proxy keeps several states
        (per data-parallel rank, served and modelled) over one tokenizer, and
        each would otherwise build, and hold, its own copy.  Rebuilt when
        the vocabulary grew (added tokens); a None result (not a byte-level
        vocabulary) is remembered too.
        """
        try:
            size = len(tokenizer)
        except Exception:
            return None
        with _SHARED_LOCK:
            try:
                hit = _SHARED.get(tokenizer)
            except TypeError:  # not weak-referenceable: keyed by identity, holding the object
                hit = _SHARED_STRONG.get(id(tokenizer))
                hit = hit[1:] if hit is not None and hit[0] is tokenizer else None
            if hit is not None and hit[0] == size:
                return hit[1]
            table = cls.from_tokenizer(tokenizer)
            try:
                _SHARED[tokenizer] = (size, table)
            except TypeError:
                if len(_SHARED_STRONG) >= _SHARED_STRONG_MAX and id(tokenizer) not in _SHARED_STRONG:
                    _SHARED_STRONG.pop(next(iter(_SHARED_STRONG)))
                _SHARED_STRONG[id(tokenizer)] = (tokenizer, size, table)
            return table


#: tokenizer -> (vocabulary size, its table), for :meth:`TokenByteTable.shared`
_SHARED: "weakref.WeakKeyDictionary[Any, tuple[int, TokenByteTable | None]]" = weakref.WeakKeyDictionary()
#: the same for tokenizers that take no weak reference: id -> (tokenizer, size, table), a few at most
_SHARED_STRONG: dict[int, tuple[Any, int, "TokenByteTable | None"]] = {}
_SHARED_STRONG_MAX = 4
_SHARED_LOCK = threading.Lock()


def token_ends_from_offsets(char_ends: Sequence[int], offsets: Sequence[tuple[int, int]]) -> list[int]:
    """For each character boundary, how many tokens start before it."""
    out = []
    j = 0
    n = len(offsets)
    for end in char_ends:
        while j < n and offsets[j][0] < end:
            j += 1
        out.append(j)
    return out


@dataclass(frozen=True)
class Located:
    """Where a served prompt's blocks are, in tokens."""

    #: tokens before the end of the preamble, then of each block line
    token_ends: list[int]
    #: about how many tokens each block's text took, in prompt order (within a token or two of the
    #: block tokenized alone, since tokens may straddle the label and the line end)
    text_tokens: list[int]


def locate_blocks(
    plan: Plan,
    prompt_text: str,
    token_ids: Sequence[int],
    offsets: Sequence[tuple[int, int]] | None,
    table: TokenByteTable | None,
) -> Located | None:
    """Token positions of a served prompt's block boundaries; None when they cannot be found exactly.

    Tokens are located from character ``offsets`` when the tokenizer gave
    them, else from the vocabulary's byte lengths (``table``).
    """
    if plan.preamble is None or not plan.ordered:
        return None
    content = plan.system_content
    if not content.startswith(plan.preamble.text):
        return None
    rel = block_char_ends(plan.preamble.text, plan.ordered)
    if rel[-1] > len(content) or content[rel[-1] - 1] != "\n":
        return None  # the layout is not the one this code expects
    base = prompt_text.find(content)
    if base < 0:
        return None  # the chat template changed the content; cannot locate the blocks
    # each block line is "[k] text\n": its text starts after the label
    text_starts = [end + len(PromptLayout.block_line(k + 1, "")) - 1 for k, end in enumerate(rel[:-1])]
    points = sorted({base + r for r in rel} | {base + t for t in text_starts})
    if offsets is not None and len(offsets) == len(token_ids):
        counts = token_ends_from_offsets(points, offsets)
    elif table is not None:
        starts = table.token_starts(token_ids, len(prompt_text.encode("utf-8")))
        if starts is None:
            return None
        import numpy as np

        counts = np.searchsorted(starts, _byte_positions(prompt_text, points), side="left").tolist()
    else:
        return None
    at = dict(zip(points, counts))
    token_ends = [at[base + r] for r in rel]
    text_tokens = [max(1, token_ends[k + 1] - at[base + t]) for k, t in enumerate(text_starts)]
    return Located(token_ends, text_tokens)


def bind_served_prompt(index: ContextIndex, plan: Plan, token_ids: Sequence[int], located: Located) -> None:
    """Tie a located prompt's nodes to the canonical keys of its full pages."""
    page = index.page_size
    if page is None:
        raise RuntimeError("binding needs an index attached to an engine")
    keys = chain_page_keys(token_ids[: located.token_ends[-1]], page, salt=plan.salt)
    index.bind(
        plan.tenant,
        plan.preamble.key,  # type: ignore[union-attr]
        plan.preamble.tokens,  # type: ignore[union-attr]
        [(b.key, b.tokens) for b in plan.ordered],
        located.token_ends,
        keys,
    )


def _byte_positions(text: str, char_positions: Sequence[int]) -> list[int]:
    """UTF-8 byte offsets of increasing character positions in ``text``."""
    if text.isascii():
        return list(char_positions)
    out, done, prev = [], 0, 0
    for p in char_positions:
        done += len(text[prev:p].encode("utf-8"))
        out.append(done)
        prev = p
    return out
