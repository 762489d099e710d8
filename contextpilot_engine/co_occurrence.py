"""Which of a tenant's recent requests held each block: the evidence for ordering a request's uncached tail.

A prompt served now is reused later only as far as a later request holds
*every* block up to that point: a request that shares blocks b1, b2, b3 with
this one, but not b1, reuses nothing of it.  So the order of the blocks that
are not cached yet should follow what later requests will hold together,
not each block's popularity on its own: after the blocks already placed, the
next block should be the one that most of the requests holding all of them
also hold.  The requests to come are not known; the tenant's recent requests
stand in for them (retrieval traffic keeps returning to the same topics).

:class:`RecentRequests` keeps, for a bounded window of a tenant's last
requests, which of them held each block (an inverted index of request
numbers), and :meth:`RecentRequests.extend` builds the greedy order above
with set intersections, so its cost grows with the window and the request's
blocks, never with the index.  Where no recent request holds everything
placed so far, the evidence has run out and the caller's fallback order
(token-weighted popularity) places the rest.  The window is small on
purpose: what recurs together is a property of the last few hundred
requests, and more history did not order better on real retrieval traces.

The window draws on the process memory budget like every other per-tenant
structure: each (block, request) pair is charged to the tenant's account,
and under pressure the oldest requests go first.
"""

from __future__ import annotations

from collections import deque
from typing import Iterable, Sequence

from .blocks import Block
from .memory_budget import BudgetAccount, resident

__all__ = ["RecentRequests", "ENTRY_BYTES", "rank_discount", "RANK_DECAY"]

#: how fast a block's weight falls with its input position (see :func:`rank_discount`)
RANK_DECAY = 0.2


def rank_discount(position: int) -> float:
    """Weight of a block's evidence by where the caller put it: retrieval order carries relevance.

    Retrievers return their best match first, and the chunks a query ranks
    highest are the ones other queries on the same topic retrieve again,
    while the tail of a top-k list varies from query to query.  So among
    blocks with equal evidence the earlier one is the safer prefix for the
    requests to come.  Where the caller's order means nothing (a shuffled
    list) the discount costs a little reuse; on real retrieval traces it
    gains more than it costs there (BENCHMARKS.md, real-corpus workloads).
    """
    return 1.0 / (1.0 + RANK_DECAY * position)

#: approximate resident bytes of one (block, request) pair: its slot in the request's key tuple,
#: the holder dict's entry (most blocks of a window are held by one request: a bare request number),
#: a share of the holder sets of the others, and the allocator's overhead on all of them
ENTRY_BYTES = resident(144)

_EMPTY: frozenset = frozenset()


def _as_set(held: "int | set[int] | frozenset[int]") -> "set[int] | frozenset[int]":
    """A holder entry as a set (one request is stored as its bare number)."""
    return {held} if type(held) is int else held


class RecentRequests:
    """The block sets of a tenant's last ``window`` requests, inverted by block."""

    __slots__ = ("window", "account", "_holders", "_requests", "_next")

    def __init__(self, window: int, account: "BudgetAccount | None" = None):
        if not isinstance(window, int) or isinstance(window, bool) or window < 0:
            raise ValueError(f"window: expected an integer >= 0, got {window!r}")
        self.window = window
        #: the window's account in the memory budget (None: not accounted)
        self.account = account
        #: block key -> number of the one recent request that held it, or the set of several: most
        #: blocks of a window are held once, and a one-element set costs several times a number
        self._holders: dict[int, int | set[int]] = {}
        #: (request number, its distinct keys), oldest first
        self._requests: deque[tuple[int, tuple[int, ...]]] = deque()
        self._next = 0

    def __len__(self) -> int:
        return len(self._requests)

    def entries(self) -> int:
        """(block, request) pairs held: what the window costs in memory."""
        return sum(len(keys) for _, keys in self._requests)

    def add(self, keys: Iterable[int]) -> None:
        """Remember one request that held ``keys`` (copies count once); forget the oldest past the window."""
        if not self.window:
            return
        distinct = tuple(dict.fromkeys(keys))
        n = self._next
        self._next += 1
        holders = self._holders
        for k in distinct:
            h = holders.get(k)
            if h is None:
                holders[k] = n
            elif type(h) is int:
                holders[k] = {h, n}
            else:
                h.add(n)
        self._requests.append((n, distinct))
        dropped = 0
        while len(self._requests) > self.window:
            dropped += self._drop_oldest()
        if self.account is not None and len(distinct) != dropped:
            grown = len(distinct) - dropped
            self.account.charge(grown, grown * ENTRY_BYTES)

    def _drop_oldest(self, most: int | None = None) -> int:
        """Forget the oldest request, or only ``most`` of its keys; returns how many keys went."""
        old, old_keys = self._requests.popleft()
        if most is not None and most < len(old_keys):
            self._requests.appendleft((old, old_keys[most:]))
            old_keys = old_keys[:most]
        holders = self._holders
        for k in old_keys:
            h = holders[k]
            if type(h) is int:
                del holders[k]
                continue
            h.discard(old)
            if len(h) == 1:  # a set holds two or more distinct numbers: one is left
                holders[k] = h.pop()
        return len(old_keys)

    def evict(self, entries: int, reason: str) -> int:
        """Forget exactly ``entries`` (block, request) pairs, oldest first (fewer if fewer are held).

        The oldest request may lose only some of its blocks, so the budget
        gets what it asked for and no more.
        """
        freed = 0
        while self._requests and freed < entries:
            freed += self._drop_oldest(entries - freed)
        if freed and self.account is not None:
            self.account.evicted(reason, freed, freed * ENTRY_BYTES)
        return freed

    def clear(self) -> None:
        held = self.entries()
        self._holders.clear()
        self._requests.clear()
        if held and self.account is not None:
            self.account.charge(-held, -held * ENTRY_BYTES)

    def extend(self, blocks: Sequence[Block], placed: Iterable[int], candidates: Sequence[int]) -> tuple[list[int], list[int]]:
        """Order ``candidates`` (indices into ``blocks``) after the blocks with keys ``placed``.

        Returns the candidates placed by evidence, in order, and the others
        (input order) for the caller's fallback.  Each step takes the block
        held by the most recent requests that hold every block placed so far,
        weighted by its tokens and discounted by its input position
        (:func:`rank_discount`; ties: more tokens, then smaller key, then
        input order); it stops when no recent request holds everything
        placed.  With nothing placed, every recent request counts.
        """
        holders = self._holders
        support: set[int] | None = None
        for k in placed:
            h = _as_set(holders.get(k, _EMPTY))
            support = set(h) if support is None else support & h
            if not support:
                return [], list(candidates)
        remaining = [i for i in candidates if blocks[i].key in holders]
        if not remaining:
            return [], list(candidates)
        ordered: list[int] = []
        while remaining:
            best = -1
            best_score: tuple = ()
            for pos, i in enumerate(remaining):
                b = blocks[i]
                h = holders[b.key]
                if type(h) is int:
                    n = 1 if support is None or h in support else 0
                else:
                    n = len(h) if support is None else len(h & support)
                if not n:
                    continue
                score = (n * b.tokens * rank_discount(i), b.tokens, -b.key, -pos)
                if score > best_score:
                    best, best_score = pos, score
            if best < 0:
                break
            i = remaining.pop(best)
            ordered.append(i)
            h = _as_set(holders[blocks[i].key])
            support = set(h) if support is None else support & h
            if not support:
                break
        chosen = set(ordered)
        return ordered, [i for i in candidates if i not in chosen]
