"""Score a method's prompts: simulated hits, block reuse, conservation.

Hit ratio = sum of cached tokens / sum of prompt tokens, every prompt served
one after another in the method's own execution order through a fresh
:class:`.simulator.PrefixCacheSimulator`.

Cache capacities are fractions of the batch's **unique tokens**: the tokens
of every distinct segment of the batch's prompts (the preamble once, every
distinct block line once, every request's tail), measured on the
retrieval-order prompts.  This is method independent, so all methods get the
same cache; 25% of it is far below what an unlimited cache ends up holding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from .bounds import trie_reuse
from .methods import MethodResult
from .prompt_model import LINE_OVERHEAD, prompt_segments
from .simulator import PrefixCacheSimulator, Segment
from .workloads import Workload

__all__ = ["SimResult", "method_prompts", "unique_tokens", "simulate_prompts", "block_reuse", "conservation"]


@dataclass(frozen=True)
class SimResult:
    page_size: int
    capacity_tokens: int | None
    cached: int
    prompt: int
    evicted: int

    @property
    def hit_ratio(self) -> float:
        return self.cached / self.prompt if self.prompt else 0.0


def method_prompts(result: MethodResult, count: Callable[[str], int]) -> list[list[Segment]]:
    """Segments of the method's prompts, in its execution order (read back with their known blocks)."""
    if result.splits:
        return result.prompts(count)
    return [prompt_segments(result.messages[i], count, i) for i in result.order]


def unique_tokens(prompts: Sequence[Sequence[Segment]]) -> int:
    """Tokens of the distinct segments of a batch's prompts."""
    seen: dict = {}
    for p in prompts:
        for key, tokens in p:
            seen.setdefault(key, tokens)
    return sum(seen.values())


def simulate_prompts(prompts: Sequence[Sequence[Segment]], page_size: int, capacity_tokens: int | None) -> SimResult:
    sim = PrefixCacheSimulator(page_size, capacity_tokens)
    for p in prompts:
        sim.serve(p)
    return SimResult(page_size, capacity_tokens, sum(sim.hits), sum(sim.prompt_tokens), sim.evicted_tokens)


def block_reuse(result: MethodResult, wl: Workload, count: Callable[[str], int]) -> int:
    """Block tokens the method's orders share in a prefix tree (unlimited cache, page 1).

    Same unit as :mod:`.bounds` (a block weighs its text plus its line label).
    """
    return trie_reuse(result.sequences(wl), lambda t: count(t) + LINE_OVERHEAD)


def conservation(result: MethodResult, wl: Workload) -> dict:
    """Did every input block come out as many times as it went in?

    Checks the recorded positions against the input multiset and reports
    what was dropped (and invented, which no method should do).
    """
    problems = 0
    for i, r in enumerate(wl.requests):
        pos = (
            result.served.get(i, [])
            + result.hinted.get(i, [])
            + result.dropped.get(i, [])
        )
        if sorted(pos) != list(range(len(r.contexts))):
            problems += 1
    dropped_tokens = 0
    count = wl.token_counter()
    for i, lost in result.dropped.items():
        dropped_tokens += sum(count(wl.requests[i].contexts[p]) for p in lost)
    return {
        "conserved": result.conserved() and problems == 0,
        "dropped_blocks": result.dropped_blocks,
        "dropped_tokens": dropped_tokens,
        "requests_with_drops": result.requests_with_drops,
        "invented_blocks": result.invented,
        "hinted_blocks": sum(len(v) for v in result.hinted.values()),
        "rewritten_blocks": sum(len(v) for v in result.rewritten.values()),
        "bookkeeping_errors": problems,
    }
