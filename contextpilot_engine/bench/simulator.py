"""Exact-prefix, paged KV-cache simulator.

A prompt is a sequence of *segments* ``(key, tokens)``: the preamble, the
blocks in their served order, then the per-request tail (ranking note and
query).  Two prompts share tokens exactly as far as their segment sequences
agree (segments with different keys are taken to differ from their first
token, which is how distinct chunks behave after the shared ``[i] ``
numbering).

The cache works like vLLM's prefix cache: it holds full pages of
``page_size`` tokens, a request hits the longest run of cached pages from
its start, at least its last token is always computed, and with a finite
``capacity_tokens`` the least recently used pages are evicted, the tail of a
request before its head.  ``page_size=1`` models SGLang's default radix cache.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Hashable, Iterable, Sequence

__all__ = ["PrefixCacheSimulator", "Segment", "simulate", "hit_ratio"]

Segment = tuple[Hashable, int]


class PrefixCacheSimulator:
    def __init__(self, page_size: int = 16, capacity_tokens: int | None = None):
        if page_size < 1:
            raise ValueError("page_size must be >= 1")
        self.page_size = page_size
        self.capacity_pages = None if capacity_tokens is None else max(1, capacity_tokens // page_size)
        self._trie: dict = {}
        self._next_node = 0
        self._lru: OrderedDict = OrderedDict()
        self.hits: list[int] = []
        self.prompt_tokens: list[int] = []

    def _pages(self, segments: Sequence[Segment]) -> tuple[list[Hashable], int]:
        """Page ids of a prompt: (node of the segment holding the page's last token, page end)."""
        page = self.page_size
        node = self._trie
        pages: list[Hashable] = []
        total = 0
        for key, tokens in segments:
            child = node.get(key)
            if child is None:
                self._next_node += 1
                child = node[key] = {None: self._next_node}
            start, total = total, total + tokens
            node_id = child[None]
            first_end = (start // page + 1) * page
            for end in range(first_end, total + 1, page):
                pages.append((node_id, end))
            node = child
        return pages, total

    def serve(self, segments: Sequence[Segment]) -> int:
        """Serve one prompt; returns its cached (hit) tokens."""
        pages, total = self._pages(segments)
        cache = self._lru
        usable = (total - 1) // self.page_size  # the last token is always computed
        hit_pages = 0
        for p in pages[:usable]:
            if p not in cache:
                break
            hit_pages += 1
        hit = hit_pages * self.page_size
        for p in reversed(pages):  # head of the prompt ends up most recently used
            if p in cache:
                cache.move_to_end(p)
            else:
                cache[p] = None
        if self.capacity_pages is not None:
            while len(cache) > self.capacity_pages:
                cache.popitem(last=False)
        self.hits.append(hit)
        self.prompt_tokens.append(total)
        return hit


def simulate(
    prompts: Iterable[Sequence[Segment]], page_size: int = 16, capacity_tokens: int | None = None
) -> PrefixCacheSimulator:
    """Serve ``prompts`` in the given order through a fresh simulator."""
    sim = PrefixCacheSimulator(page_size, capacity_tokens)
    for p in prompts:
        sim.serve(p)
    return sim


def hit_ratio(sim: PrefixCacheSimulator) -> float:
    total = sum(sim.prompt_tokens)
    return sum(sim.hits) / total if total else 0.0
