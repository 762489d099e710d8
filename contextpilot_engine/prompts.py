"""The prompt around the blocks: a stable head, the blocks, then everything that varies.

A prefix cache only helps if the shared part of two prompts is byte-for-byte
identical, so the prompt is laid out in that order:

1. the *preamble* (optional caller instruction, the fixed instruction and the
   opening ``<documents>`` tag): the same for every request with the same
   instruction;
2. one line per block, numbered by position (``[1] ...``): identical for two
   requests exactly as far as their block orders agree;
3. after the closing tag, everything request-specific: hints for blocks that
   were deduplicated, and the *importance ranking*, which restates the
   retrieval relevance order in terms of the new positions so the model still
   knows which documents matter most (answer quality does not depend on the
   physical order);
4. the query, as the user message.

The messages have the same shape as the reference ``optimize`` output: a
system message holding the documents and the ranking, then the user query.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain, repeat
from typing import Sequence

from .blocks import Block, block_key

__all__ = [
    "PromptLayout",
    "Preamble",
    "render_messages",
    "ranking_note",
    "position_labels",
    "block_char_ends",
    "as_given_system",
]


@dataclass(frozen=True)
class Preamble:
    text: str
    key: int
    tokens: int


class PromptLayout:
    OPEN = "<documents>\n"
    CLOSE = "</documents>"

    def __init__(self, instruction: str):
        self.instruction = instruction
        self._cache: dict[str | None, Preamble] = {}

    def preamble(self, system_instruction: str | None, count_tokens) -> Preamble:
        """The head of the system message; its key names the root of the prefix tree."""
        hit = self._cache.get(system_instruction)
        if hit is not None:
            return hit
        text = preamble_text(self.instruction, system_instruction)
        pre = Preamble(text, block_key(text), count_tokens(text))
        if len(self._cache) < 256:
            self._cache[system_instruction] = pre
        return pre

    @staticmethod
    def block_line(position: int, text: str) -> str:
        """How block ``position`` (1-based) appears in the prompt; :func:`render_messages` writes the same."""
        return f"[{position}] {text}\n"


def preamble_text(instruction: str, system_instruction: str | None) -> str:
    """Caller's system text (if any), the fixed instruction, then the opening tag."""
    parts = [system_instruction] if system_instruction else []
    parts.append(instruction)
    return "\n\n".join(parts) + "\n\n" + PromptLayout.OPEN


def as_given_system(instruction: str, system_instruction: str | None, texts: Sequence[str]) -> str:
    """The system message of this layout with the blocks as given: no reordering, hints or ranking.

    What a request that opted out (``enabled: false``) or that our code failed
    on is served with: the client's blocks, in the client's order, where the
    layout puts them.
    """
    body = "".join(PromptLayout.block_line(i, t) for i, t in enumerate(texts, 1))
    return preamble_text(instruction, system_instruction) + body + PromptLayout.CLOSE


_LABELS: list[str] = []


def _labels(n: int) -> list[str]:
    """``["[1] ", "[2] ", ...]``, built once: every prompt numbers its blocks the same way."""
    while len(_LABELS) < n:
        _LABELS.append(f"[{len(_LABELS) + 1}] ")
    return _LABELS[:n]


def block_char_ends(preamble_text: str, ordered: Sequence[Block]) -> list[int]:
    """Character offsets in the system content where the preamble and each block line end.

    The engine plugins turn these into token offsets to bind a served prompt
    to the engine's pages; they follow :func:`render_messages`' layout.
    """
    ends = [len(preamble_text)]
    pos = ends[0]
    for label, block in zip(_labels(len(ordered)), ordered):
        pos += len(label) + len(block.text) + 1
        ends.append(pos)
    return ends


_RANKS: list[str] = []


def position_labels(order: Sequence[int]) -> list[str]:
    """For blocks listed in retrieval order, the ``"[k]"`` label of the position each now has.

    ``order[k]`` is the input index of the block placed at position ``k+1``.
    """
    n = len(order)
    while len(_RANKS) < n:
        _RANKS.append(f"[{len(_RANKS) + 1}]")
    where = sorted(range(n), key=order.__getitem__)  # where[j]: position (0-based) of input block j
    return [_RANKS[p] for p in where]


def ranking_note(ranked_positions: Sequence[str]) -> str:
    """The importance ranking: prompt positions listed from most to least relevant."""
    return (
        "Importance ranking of the documents, most relevant first: "
        + " > ".join(ranked_positions)
        + ". Rely on higher-ranked documents first."
    )


def render_messages(
    layout: PromptLayout,
    preamble: Preamble,
    ordered: Sequence[Block],
    relevance: Sequence[str],
    query: str,
    hints: Sequence[str] = (),
) -> list[dict]:
    """OpenAI-style messages: system (preamble, blocks, hints, ranking), then the user query.

    ``relevance`` lists, in retrieval order, how each original block is
    referred to (``"[3]"`` for the block now at position 3, or a hint label).
    """
    body = "".join(chain.from_iterable(zip(_labels(len(ordered)), [b.text for b in ordered], repeat("\n"))))
    tail = [layout.CLOSE]
    if hints:
        tail.append("\n".join(hints))
    tail.append(ranking_note(relevance))
    system = preamble.text + body + "\n\n".join(tail)
    return [{"role": "system", "content": system}, {"role": "user", "content": query}]
