"""Binding a served prompt to the engine's pages, after the engine has tokenized it.

The rewrite knows the system message's layout (preamble, one line per
block); the engine knows the prompt's token ids.  :func:`bind_served_prompt`
joins the two: it finds where each block ends, in tokens, from the
tokenizer's character offsets (asked of the engine's own tokenizer call, so
nothing is tokenized twice), and ties the prompt's nodes to the canonical
keys of its full pages (:meth:`contextpilot_engine.index.ContextIndex.bind`).
From then on page events tell the index, page by page, which of these blocks
the engine still holds.
"""

from __future__ import annotations

from typing import Callable, Sequence

from contextpilot_engine.index import ContextIndex
from contextpilot_engine.pages import chain_page_keys
from contextpilot_engine.prompts import block_char_ends

from .conversation import Plan

__all__ = ["bind_served_prompt", "token_ends_from_offsets"]


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


def bind_served_prompt(
    index: ContextIndex,
    plan: Plan,
    prompt_text: str,
    token_ids: Sequence[int],
    offsets: Sequence[tuple[int, int]] | None,
    retokenize: Callable[[str], tuple[list[int], list[tuple[int, int]]]] | None = None,
) -> bool:
    """Bind a served prompt's blocks to its canonical pages; False when it cannot be done exactly."""
    page = index.page_size
    if page is None or plan.preamble is None or not plan.ordered:
        return False
    content = plan.system_content
    if not content.startswith(plan.preamble.text):
        return False
    rel = block_char_ends(plan.preamble.text, plan.ordered)
    if rel[-1] > len(content) or content[rel[-1] - 1] != "\n":
        return False  # the layout is not the one this code expects
    base = prompt_text.find(content)
    if base < 0:
        return False  # the chat template changed the content; cannot locate the blocks
    if offsets is None or len(offsets) != len(token_ids):
        if retokenize is None:
            return False
        ids, offsets = retokenize(prompt_text)
        if list(ids) != list(token_ids):
            return False
    token_ends = token_ends_from_offsets([base + r for r in rel], offsets)
    keys = chain_page_keys(token_ids[: token_ends[-1]], page, salt=plan.salt)
    index.bind(
        plan.tenant,
        plan.preamble.key,
        plan.preamble.tokens,
        [(b.key, b.tokens) for b in plan.ordered],
        token_ends,
        keys,
    )
    return True
