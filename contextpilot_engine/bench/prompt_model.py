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


def _system_section(messages: Sequence[dict]) -> tuple[str, int]:
    if len(messages) < 2 or messages[0].get("role") != "system":
        raise ValueError("expected [system, user] messages in the contextpilot prompt layout")
    system = messages[0]["content"]
    opening = system.find(PromptLayout.OPEN)
    if opening < 0:
        raise ValueError("the system message has no <documents> section")
    return system, opening


def split_prompt(messages: Sequence[dict], texts: Sequence[str] | None = None) -> SplitPrompt:
    """Split ``[system, user]`` messages in the prompt layout into preamble, block texts, tail.

    Real documents hold lines that look like the layout's block labels (the
    PostgreSQL manual's footnotes start ``[2] ...``): a block whose text
    holds ``"\n[k+1] "`` cannot be told from two blocks by the labels alone.
    With ``texts`` (the request's input blocks, each copy used once) a block
    line is read as the longest input text that the line continues with and
    that is followed by the next label or the closing tag, so such a block
    stays whole; a line that is no input (a dedup hint, a rewritten block)
    ends at the next label.  Without ``texts`` every block ends at the first
    next label (ambiguous for such blocks: pass ``texts`` whenever the
    request's blocks are known).

    Raises ``ValueError`` when the system message does not follow the layout.
    """
    system, opening = _system_section(messages)
    by_head: dict[str, list[str]] = {}
    head = 0
    if texts:
        head = min([16, *(len(t) for t in texts)])  # texts are looked up by their first characters
        for t in texts:
            by_head.setdefault(t[:head], []).append(t)
    pos = opening + len(PromptLayout.OPEN)
    blocks: list[str] = []
    k = 1
    while system.startswith(f"[{k}] ", pos):
        start = pos + len(f"[{k}] ")
        after = (f"\n[{k + 1}] ", "\n" + PromptLayout.CLOSE)
        pool = by_head.get(system[start : start + head], []) if texts else []
        fits = [t for t in pool if system.startswith(t, start) and system.startswith(after, start + len(t))]
        if fits:
            text = max(fits, key=len)
            pool.remove(text)
            end = start + len(text)
        else:
            ends = [e for e in (system.find(a, start) for a in after) if e >= 0]
            if not ends:
                raise ValueError(f"block [{k}] is not terminated")
            end = min(ends)
        blocks.append(system[start:end])
        pos = end + 1
        k += 1
    user = "\n".join(m.get("content", "") for m in messages[1:])
    return SplitPrompt(system[: opening + len(PromptLayout.OPEN)], blocks, system[pos:] + "\n" + user)


def segments(split: SplitPrompt, count: Callable[[str], int], tail_key) -> list[Segment]:
    """Simulator segments of one prompt; ``tail_key`` must be unique per request."""
    out: list[Segment] = [(("preamble", split.preamble), count(split.preamble))]
    out.extend((text, count(text) + LINE_OVERHEAD) for text in split.blocks)
    out.append((("tail", tail_key), count(split.tail)))
    return out


def prompt_segments(
    messages: Sequence[dict], count: Callable[[str], int], tail_key, texts: Sequence[str] | None = None
) -> list[Segment]:
    """Simulator segments of one prompt; pass the request's ``texts`` to keep label-like lines whole."""
    return segments(split_prompt(messages, texts), count, tail_key)
