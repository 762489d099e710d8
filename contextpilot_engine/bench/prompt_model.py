"""From rendered chat messages to what a prefix cache sees.

Every method's prompts are rendered in one layout (:mod:`contextpilot_engine.prompts`:
preamble, one ``[k] text`` line per block, then hints, the importance
ranking and the query), so hit ratios differ only by block order and
execution order.  This module splits a rendered prompt back into

* the preamble (identical for every request),
* the block lines, in prompt order,
* the tail: everything after the last block (closing tag, dedup hints,
  ranking note) plus the user message; request-specific, never shared,

and turns it into simulator segments.  A block line costs its text's
tokens plus :data:`LINE_OVERHEAD` for the ``[k] `` label and the newline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from ..prompts import PromptLayout
from .simulator import Segment

__all__ = ["LINE_OVERHEAD", "SplitPrompt", "split_prompt", "segments", "prompt_segments"]

#: tokens of the ``[k] `` label and the newline around a block's text
LINE_OVERHEAD = 3


@dataclass(frozen=True)
class SplitPrompt:
    preamble: str
    blocks: list[str]
    tail: str


def split_prompt(messages: Sequence[dict]) -> SplitPrompt:
    """Split ``[system, user]`` messages in the prompt layout into preamble, block texts, tail.

    Raises ``ValueError`` when the system message does not follow the layout.
    """
    if len(messages) < 2 or messages[0].get("role") != "system":
        raise ValueError("expected [system, user] messages in the contextpilot prompt layout")
    system = messages[0]["content"]
    opening = system.find(PromptLayout.OPEN)
    if opening < 0:
        raise ValueError("the system message has no <documents> section")
    pos = opening + len(PromptLayout.OPEN)
    blocks: list[str] = []
    k = 1
    while system.startswith(f"[{k}] ", pos):
        start = pos + len(f"[{k}] ")
        candidates = [system.find(f"\n[{k + 1}] ", start), system.find("\n" + PromptLayout.CLOSE, start)]
        ends = [c for c in candidates if c >= 0]
        if not ends:
            raise ValueError(f"block [{k}] is not terminated")
        end = min(ends)
        blocks.append(system[start:end])
        pos = end + 1
        k += 1
    user = "\n".join(m.get("content", "") for m in messages[1:])
    return SplitPrompt(system[:opening + len(PromptLayout.OPEN)], blocks, system[pos:] + "\n" + user)


def segments(split: SplitPrompt, count: Callable[[str], int], tail_key) -> list[Segment]:
    """Simulator segments of one prompt; ``tail_key`` must be unique per request."""
    out: list[Segment] = [(("preamble", split.preamble), count(split.preamble))]
    out.extend((text, count(text) + LINE_OVERHEAD) for text in split.blocks)
    out.append((("tail", tail_key), count(split.tail)))
    return out


def prompt_segments(messages: Sequence[dict], count: Callable[[str], int], tail_key) -> list[Segment]:
    return segments(split_prompt(messages), count, tail_key)
