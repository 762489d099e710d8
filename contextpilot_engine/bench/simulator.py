"""Exact-prefix KV-cache simulators: paged over segments, and token-exact like vLLM.

**Segment mode** (:class:`PrefixCacheSimulator`).  A prompt is a sequence of
*segments* ``(key, tokens)``: the preamble, the blocks in their served order,
then the per-request tail (ranking note and query).  Two prompts share
tokens exactly as far as their segment sequences agree (segments with
different keys are taken to differ from their first token, which is how
distinct chunks behave after the shared ``[i] `` numbering).  This is fast
enough for batches of millions of tokens and needs no tokenizer.

**Token mode** (:class:`TokenPrefixCache`).  A prompt is its list of token
ids and a page is identified by the hash of its tokens chained with the
previous page's hash, as vLLM's prefix cache does, so per-request hits
equal the engine's ``num_cached_tokens`` (tested against vLLM CPU at block
size 32 with an unlimited cache).

Both work like vLLM's prefix cache:

* only full pages of ``page_size`` tokens are cached and reused, and a
  request hits the longest run of cached pages from its start;
* the last prompt token is always computed, so a prompt of ``n`` tokens
  hits at most ``(n - 1) // page_size * page_size`` tokens;
* with a finite capacity the least recently used pages are evicted, and a
  request's pages are touched tail first so its tail is evicted before its
  head (vLLM frees a finished request's blocks in reverse order).  vLLM
  evicts while it allocates and SGLang evicts leaves of a radix tree, so
  eviction order matches only approximately.

``page_size=1`` (SGLang's default radix cache) is simulated at segment
granularity in segment mode: a segment is cached, hit and evicted as a
whole.  With an unlimited cache that is exact; with a finite one a radix
cache could also keep part of a segment.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Hashable, Iterable, Sequence

from ..pages import chain_page_keys

__all__ = ["PrefixCacheSimulator", "TokenPrefixCache", "Segment", "simulate", "hit_ratio"]

Segment = tuple[Hashable, int]


class _LruCache:
    """Units (pages or segments) with sizes in tokens, least recently used first."""

    def __init__(self, capacity_tokens: int | None):
        self.capacity = capacity_tokens
        self.units: OrderedDict = OrderedDict()
        self.tokens = 0
        self.evicted_tokens = 0

    def touch_all(self, units: Sequence[tuple[Hashable, int]]) -> None:
        """Insert or refresh ``units`` (tail first, so the head ends most recent), then evict."""
        cache = self.units
        for key, size in reversed(units):
            if key in cache:
                cache.move_to_end(key)
            else:
                cache[key] = size
                self.tokens += size
        if self.capacity is not None:
            while self.tokens > self.capacity and cache:
                _, size = cache.popitem(last=False)
                self.tokens -= size
                self.evicted_tokens += size


class PrefixCacheSimulator:
    """Segment-mode simulator; ``serve`` returns each request's hit tokens (see the module docstring)."""

    def __init__(self, page_size: int = 16, capacity_tokens: int | None = None):
        if page_size < 1:
            raise ValueError("page_size must be >= 1")
        if capacity_tokens is not None and capacity_tokens < 1:
            raise ValueError("capacity_tokens must be >= 1 (or None for an unlimited cache)")
        self.page_size = page_size
        if capacity_tokens is not None and page_size > 1:
            capacity_tokens = max(1, capacity_tokens // page_size) * page_size
        self._cache = _LruCache(capacity_tokens)
        self._trie: dict = {}
        self._next_node = 0
        self.hits: list[int] = []
        self.prompt_tokens: list[int] = []

    @property
    def capacity_tokens(self) -> int | None:
        return self._cache.capacity

    @property
    def cached_tokens(self) -> int:
        return self._cache.tokens

    @property
    def evicted_tokens(self) -> int:
        return self._cache.evicted_tokens

    def _units(self, segments: Sequence[Segment]) -> tuple[list[tuple[Hashable, int]], int]:
        """Cache units of a prompt, head first, and its length in tokens.

        A page is named by (node of the segment holding the page's last
        token, page end), which identifies the whole prefix up to that
        token; at page size 1 a unit is a whole segment (its node).
        """
        page = self.page_size
        node = self._trie
        units: list[tuple[Hashable, int]] = []
        total = 0
        for key, tokens in segments:
            if tokens < 0:
                raise ValueError(f"segment {key!r} has a negative length {tokens}")
            child = node.get(key)
            if child is None:
                self._next_node += 1
                child = node[key] = {None: self._next_node}
            start, total = total, total + tokens
            node_id = child[None]
            if page == 1:
                if tokens:
                    units.append((node_id, tokens))
            else:
                for end in range((start // page + 1) * page, total + 1, page):
                    units.append(((node_id, end), page))
            node = child
        return units, total

    def serve(self, segments: Sequence[Segment]) -> int:
        """Serve one prompt; returns its cached (hit) tokens."""
        units, total = self._units(segments)
        cache = self._cache.units
        limit = max(total - 1, 0)  # the last token is always computed
        if self.page_size > 1:
            limit = limit // self.page_size * self.page_size
        hit = 0
        for key, size in units:
            if key not in cache or hit + size > limit:
                if key in cache and self.page_size == 1:
                    hit = limit  # a whole cached segment, but its last token is recomputed
                break
            hit += size
        self._cache.touch_all(units)
        self.hits.append(hit)
        self.prompt_tokens.append(total)
        return hit


class TokenPrefixCache:
    """Token-exact paged prefix cache (vLLM's block hashing); ``serve`` returns hit tokens."""

    def __init__(self, block_size: int = 32, capacity_blocks: int | None = None):
        if block_size < 1:
            raise ValueError("block_size must be >= 1")
        if capacity_blocks is not None and capacity_blocks < 1:
            raise ValueError("capacity_blocks must be >= 1 (or None for an unlimited cache)")
        self.block_size = block_size
        self._cache = _LruCache(None if capacity_blocks is None else capacity_blocks * block_size)
        self.hits: list[int] = []
        self.prompt_tokens: list[int] = []

    def _pages(self, token_ids: Sequence[int]) -> list[tuple[Hashable, int]]:
        bs = self.block_size
        return [(key, bs) for key in chain_page_keys(token_ids, bs)]

    def serve(self, token_ids: Sequence[int]) -> int:
        pages = self._pages([int(t) for t in token_ids])
        usable = max(len(token_ids) - 1, 0) // self.block_size
        hit = 0
        for key, _ in pages[:usable]:
            if key not in self._cache.units:
                break
            hit += self.block_size
        self._cache.touch_all(pages)
        self.hits.append(hit)
        self.prompt_tokens.append(len(token_ids))
        return hit


def simulate(
    prompts: Iterable[Sequence[Segment]], page_size: int = 16, capacity_tokens: int | None = None
) -> PrefixCacheSimulator:
    """Serve ``prompts`` in the given order through a fresh simulator."""
    sim = PrefixCacheSimulator(page_size, capacity_tokens)
    for p in prompts:
        sim.serve(p)
    return sim


def hit_ratio(sim: PrefixCacheSimulator | TokenPrefixCache) -> float:
    total = sum(sim.prompt_tokens)
    return sum(sim.hits) / total if total else 0.0
