"""The Context Index: what each tenant has served, and what the engine still holds.

One :class:`ContextIndex` serves many tenants.  Each tenant has its own
:class:`~contextpilot_engine.trie.BlockTrie` and its own block popularity, so
one tenant's requests never change another tenant's orderings or hints.

Two sources of truth for "is it cached":

* With no engine attached the index *models* the cache: every tenant's trie
  holds at most ``capacity_tokens`` tokens and evicts least-recently-used
  leaves, the way a radix cache does.
* With an engine attached (:meth:`ContextIndex.attach_engine`) the engine's
  own events drive it, through one door: canonical page events
  (:meth:`pages_stored`, :meth:`pages_removed`, :meth:`pages_cleared`).
  Engines name pages by hashes of their own; the integration layer's mirror
  (:mod:`contextpilot_engine.integration.mirror`) translates those to
  canonical keys before they reach the index.  The request side binds each
  served prompt to the pages that hold it (:meth:`bind`).  A page event
  updates the bound nodes at once, so the index is never staler than the
  last event delivered to it.

Every tenant's tree and popularity table draw on one process-wide memory
budget (:mod:`.memory_budget`), which may ask for least recently used leaves
and least popular blocks back.  Tree nodes whose pages the engine holds are
the engine's truth: they are reported (``"mirror"``), never charged and never
evicted by the budget.  The per-tenant limits below stay upper limits.

All public methods take one lock, so engine threads and request threads may
call in concurrently.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Hashable, Iterable, Mapping, Sequence

from .memory_budget import MIB, EvictionRequest, MemoryBudget, Usage, process_budget, resident
from .popularity import ENTRY_BYTES as POPULARITY_ENTRY_BYTES
from .popularity import BlockPopularity
from .co_occurrence import ENTRY_BYTES as RECENT_ENTRY_BYTES
from .co_occurrence import RecentRequests
from .trie import NODE_BYTES, BlockTrie, CachedMatch, TrieNode
from .validation import UnknownIdError, check_int, check_name

__all__ = ["ContextIndex", "TenantState", "DEFAULT_TENANT", "IndexLimits"]

DEFAULT_TENANT = "default"

#: approximate resident bytes of one tenant besides its entries (its state, tree and popularity
#: objects, the popularity table's random sampler, its accounts in the budget and their weak
#: references), charged while the tenant exists
TENANT_BYTES = resident(12288)
#: approximate resident bytes the mirror keeps per page the engine holds, and per page bound to a
#: node (reported as the ``mirror`` structure, outside the budget)
CACHED_PAGE_BYTES = resident(160)
BOUND_PAGE_BYTES = resident(232)


@dataclass(frozen=True)
class IndexLimits:
    """Memory bounds of an index; every map in it is bounded by one of these."""

    #: model mode: tokens one tenant's modelled cache holds before it evicts
    capacity_tokens: int = 2_000_000
    #: trie nodes one tenant may keep (engine mode bound; model mode is bounded by capacity too)
    max_nodes: int = 200_000
    #: tenants kept at once; the least recently used tenant is dropped beyond this
    max_tenants: int = 1024
    #: blocks whose popularity one tenant tracks
    max_tracked_blocks: int = 200_000
    #: per-request discount of a block's popularity since it was last requested (1: none)
    popularity_decay: float = 0.97
    #: a tenant's last requests whose block sets order new requests' uncached blocks (0: off)
    recent_requests: int = 512
    #: the process's memory budget in MiB, set by building an index with it (None: leave it as it is)
    memory_budget_mb: int | None = None
    #: the process's limit on entries of all structures together (None: leave it as it is)
    memory_budget_entries: int | None = None

    def __post_init__(self) -> None:
        for name in ("capacity_tokens", "max_nodes", "max_tenants", "max_tracked_blocks"):
            check_int(getattr(self, name), name, minimum=1)
        check_int(self.recent_requests, "recent_requests", minimum=0)
        d = self.popularity_decay
        if not isinstance(d, (int, float)) or isinstance(d, bool) or not 0.0 < d <= 1.0:
            raise ValueError(f"popularity_decay: expected a number in (0, 1], got {d!r}")
        for name in ("memory_budget_mb", "memory_budget_entries"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name}: expected an int >= 1 or None, got {value!r}")


class TenantState:
    """Everything the index keeps for one tenant."""

    __slots__ = ("name", "trie", "popularity", "recent")

    def __init__(self, name: str, trie: BlockTrie, popularity: BlockPopularity, recent: RecentRequests):
        self.name = name
        self.trie = trie
        self.popularity = popularity
        self.recent = recent


class ContextIndex:
    """The Context Index (see the module docstring).

    Args:
        limits: the per-tenant bounds; ``memory_budget_mb`` and
            ``memory_budget_entries``, when set, set the limits of ``budget``.
        budget: the memory budget the tenants draw on (default: the
            process-wide one, :func:`.memory_budget.process_budget`).
    """

    def __init__(self, limits: IndexLimits | None = None, budget: MemoryBudget | None = None):
        self.limits = limits or IndexLimits()
        self.budget = budget if budget is not None else process_budget()
        if self.limits.memory_budget_mb is not None:
            self.budget.configure(max_bytes=self.limits.memory_budget_mb * MIB)
        if self.limits.memory_budget_entries is not None:
            self.budget.configure(max_entries=self.limits.memory_budget_entries)
        self._lock = threading.RLock()
        self._ids = itertools.count(1)
        self._tenants: OrderedDict[str, TenantState] = OrderedDict()
        self.page_size: int | None = None
        #: canonical page key -> number of cached copies the engine reports
        self._cached: dict[Hashable, int] = {}
        #: canonical page key -> bound (node, position in node.pages) pairs
        self._owners: dict[Hashable, list[tuple[TrieNode, int]]] = {}
        self.budget.watch("mirror", self._mirror_usage)

    # ---------------------------------------------------------------- tenants
    def _new_id(self) -> int:
        return next(self._ids)

    def tenant(self, name: str = DEFAULT_TENANT) -> TenantState:
        """The state of tenant ``name``, created on first use."""
        check_name(name, "tenant")
        with self._lock:
            state = self._tenants.get(name)
            if state is not None:
                self._tenants.move_to_end(name)
                return state
            limits = self.limits
            trie_account = self.budget.open("trie", name, self._evict_trie)
            trie_account.charge(0, TENANT_BYTES)
            trie = BlockTrie(self._new_id, limits.capacity_tokens, limits.max_nodes, self._unbind, trie_account)
            trie.engine_page_size = self.page_size
            popularity = BlockPopularity(
                limits.max_tracked_blocks, limits.popularity_decay, self.budget.open("popularity", name,
                                                                                     self._evict_popularity)
            )
            recent = RecentRequests(limits.recent_requests, self.budget.open("recent_requests", name,
                                                                             self._evict_recent))
            state = TenantState(name, trie, popularity, recent)
            self._tenants[name] = state
            while len(self._tenants) > limits.max_tenants:
                _, old = self._tenants.popitem(last=False)
                self._release(old, "max_tenants")
            return state

    @staticmethod
    def _release(state: TenantState, reason: str | None) -> None:
        """Empty a tenant that left the table and give its memory back to the budget."""
        state.trie.clear(reason)
        state.popularity.clear(reason)
        state.recent.clear()
        for account in (state.trie.account, state.popularity.account, state.recent.account):
            if account is not None:
                account.close()

    def peek(self, name: str) -> TenantState | None:
        """The state of tenant ``name`` if it exists; unlike :meth:`tenant`, never creates one.

        Read-only questions (matching, popularity) go through here, so asking
        about a new tenant cannot push an existing one out of the bounded table.
        """
        with self._lock:
            return self._tenants.get(name)

    def tenant_names(self) -> list[str]:
        with self._lock:
            return list(self._tenants)

    def drop_tenant(self, name: str) -> None:
        """Forget everything about one tenant."""
        check_name(name, "tenant")
        with self._lock:
            state = self._tenants.pop(name, None)
            if state is None:
                raise UnknownIdError(f"tenant: no tenant named {name!r} in this index")
            self._release(state, None)

    def close(self) -> None:
        """Forget every tenant and give the index's memory back to the budget."""
        with self._lock:
            while self._tenants:
                _, state = self._tenants.popitem(last=False)
                self._release(state, None)

    # ---------------------------------------------------------------- budget
    def _evict_trie(self, tenant: str, request: EvictionRequest) -> None:
        """The budget's evictor for a tenant's tree: least recently used leaves (never mirrored ones).

        A tenant left with no nodes and no popularity is dropped altogether.
        """
        if not self._lock.acquire(blocking=False):
            return  # in use by another thread: the next settle asks again
        try:
            state = self._tenants.get(tenant)
            if state is None:
                return
            state.trie.evict_lru(request.entries, request.bytes, request.reason)
            if not state.trie.node_count() and not len(state.popularity) and not len(state.recent):
                del self._tenants[tenant]
                self._release(state, request.reason)
        finally:
            self._lock.release()

    def _evict_popularity(self, tenant: str, request: EvictionRequest) -> None:
        """The budget's evictor for a tenant's popularity: the same sampled rule as its own bound."""
        if not self._lock.acquire(blocking=False):
            return
        try:
            state = self._tenants.get(tenant)
            if state is not None:
                n = max(request.entries, -(-request.bytes // POPULARITY_ENTRY_BYTES))
                state.popularity.evict_some(n, request.reason)
        finally:
            self._lock.release()

    def _evict_recent(self, tenant: str, request: EvictionRequest) -> None:
        """The budget's evictor for a tenant's recent requests: the oldest go first."""
        if not self._lock.acquire(blocking=False):
            return
        try:
            state = self._tenants.get(tenant)
            if state is not None:
                state.recent.evict(max(request.entries, -(-request.bytes // RECENT_ENTRY_BYTES)), request.reason)
        finally:
            self._lock.release()

    def _mirror_usage(self) -> Usage:
        """What the index keeps for the engine's cached pages (outside the budget)."""
        if self.page_size is None:
            return Usage(0, 0)
        with self._lock:
            mirrored = sum(s.trie.mirrored for s in self._tenants.values())
            cached, bound = len(self._cached), len(self._owners)
        return Usage(
            cached + bound + mirrored, cached * CACHED_PAGE_BYTES + bound * BOUND_PAGE_BYTES + mirrored * NODE_BYTES
        )

    # ----------------------------------------------------------- request path
    def match(
        self, tenant: str, preamble_key: int, wanted: Mapping[int, int], tokens: Mapping[int, int] | None = None
    ) -> CachedMatch:
        """Longest cached prefix for a request whose blocks are the multiset ``wanted`` (read-only).

        ``tokens`` (key -> tokens of one copy) lets the search prune; the result is the same.
        """
        with self._lock:
            state = self._tenants.get(tenant)
            if state is None:
                return CachedMatch([], 0, None)
            return state.trie.match_cached(preamble_key, wanted, tokens)

    def record(
        self,
        tenant: str,
        preamble_key: int,
        preamble_tokens: int,
        blocks: Sequence[tuple[int, int]],
    ) -> list[TrieNode]:
        """Record that a prompt (preamble, then ``(key, tokens)`` blocks) was served."""
        with self._lock:
            state = self.tenant(tenant)
            state.popularity.add(k for k, _ in blocks)
            state.recent.add(k for k, _ in blocks)
            path = state.trie.insert(preamble_key, preamble_tokens, blocks)
        self.budget.settle(tenant)
        return path

    def record_many(
        self,
        tenant: str,
        preamble_key: int,
        preamble_tokens: int,
        sequences: Iterable[Sequence[tuple[int, int]]],
        block_counts: Mapping[int, int],
    ) -> None:
        """Record a whole batch: popularity from aggregated counts, the sequences in order."""
        with self._lock:
            state = self.tenant(tenant)
            state.popularity.add_counts(block_counts)
            for blocks in sequences:
                state.recent.add(k for k, _ in blocks)
                state.trie.insert(preamble_key, preamble_tokens, blocks)
        self.budget.settle(tenant)

    # ------------------------------------------------------------ engine side
    def attach_engine(self, page_size: int) -> None:
        """Switch to engine mode: cached state now comes only from page events."""
        check_int(page_size, "page_size", minimum=1)
        with self._lock:
            self.page_size = page_size
            for state in self._tenants.values():
                state.trie.clear()
                state.trie.engine_page_size = page_size
            self._cached.clear()
            self._owners.clear()

    def bind(
        self,
        tenant: str,
        preamble_key: int,
        preamble_tokens: int,
        blocks: Sequence[tuple[int, int]],
        token_ends: Sequence[int],
        page_keys: Sequence[Hashable],
    ) -> list[TrieNode]:
        """Tie a served prompt's nodes to the engine pages that hold its tokens.

        ``token_ends[0]`` is the token offset where the preamble ends and
        ``token_ends[i]`` where block ``i`` ends; ``page_keys`` are the
        canonical keys of the prompt's full pages.  A page belongs to the node
        whose span holds its last token.  Pages past the last block (the
        ranking note and the query) are not bound.
        """
        page = self.page_size
        if page is None:
            raise RuntimeError("bind() needs an attached engine: call attach_engine(page_size) first")
        if len(token_ends) != len(blocks) + 1:
            raise ValueError(
                f"token_ends has {len(token_ends)} entries; it needs one for the preamble plus one per block "
                f"({len(blocks) + 1})"
            )
        prev = 0
        for i, end in enumerate(token_ends):
            if not isinstance(end, int) or end < prev:
                raise ValueError(f"token_ends[{i}]: offsets must be non-decreasing ints, got {end!r}")
            prev = end
        with self._lock:
            trie = self.tenant(tenant).trie
            path = trie.insert(preamble_key, preamble_tokens, blocks, visit=False)
            n_pages = len(page_keys)
            j = 0
            for node, end in zip(path, token_ends):
                hi = min(end // page, n_pages)
                pages = tuple(page_keys[j:hi]) if hi > j else ()
                j = max(j, hi)
                if node.pages != pages:
                    self._rebind(node, pages)
        self.budget.settle(tenant)
        return path

    def _rebind(self, node: TrieNode, pages: tuple[Hashable, ...]) -> None:
        was_mirrored = bool(node.pages) and node.lead_cached > 0
        if node.pages:
            self._unbind(node)
        node.pages = pages
        owners = self._owners
        cached = self._cached
        lead = 0
        counting = True
        for idx, key in enumerate(pages):
            owners.setdefault(key, []).append((node, idx))
            if counting and key in cached:
                lead += 1
            else:
                counting = False
        node.lead_cached = lead
        mirrored = bool(pages) and lead > 0
        if mirrored != was_mirrored and node.trie is not None:
            if mirrored:
                node.trie.mirror_started(node)
            else:
                node.trie.mirror_ended(node)

    def _unbind(self, node: TrieNode) -> None:
        owners = self._owners
        for idx, key in enumerate(node.pages or ()):
            lst = owners.get(key)
            if not lst:
                continue
            for pos, (n, i) in enumerate(lst):
                if n is node and i == idx:
                    del lst[pos]
                    break
            if not lst:
                del owners[key]

    def pages_stored(self, keys: Iterable[Hashable]) -> None:
        """Canonical pages entered the engine's cache (one call per copy)."""
        with self._lock:
            cached, owners = self._cached, self._owners
            for key in keys:
                refs = cached.get(key, 0)
                cached[key] = refs + 1
                if refs:
                    continue
                for node, idx in owners.get(key, ()):
                    if idx == node.lead_cached:
                        pages = node.pages
                        assert pages is not None
                        lead = idx + 1
                        while lead < len(pages) and pages[lead] in cached:
                            lead += 1
                        node.lead_cached = lead
                        if idx == 0 and node.trie is not None:
                            node.trie.mirror_started(node)

    def pages_removed(self, keys: Iterable[Hashable]) -> None:
        """Canonical pages left the engine's cache (one call per copy)."""
        with self._lock:
            cached, owners = self._cached, self._owners
            for key in keys:
                refs = cached.get(key)
                if refs is None:
                    continue
                if refs > 1:
                    cached[key] = refs - 1
                    continue
                del cached[key]
                for node, idx in owners.get(key, ()):
                    if idx < node.lead_cached:
                        node.lead_cached = idx
                        if idx == 0 and node.trie is not None:
                            node.trie.mirror_ended(node)

    def pages_cleared(self) -> None:
        """The engine dropped its whole prefix cache."""
        with self._lock:
            self._cached.clear()
            for lst in self._owners.values():
                for node, _ in lst:
                    if node.lead_cached:
                        node.lead_cached = 0
                        if node.trie is not None:
                            node.trie.mirror_ended(node)

    # ------------------------------------------------------------- inspection
    def cached_pages(self) -> dict[Hashable, int]:
        """Copy of the mirror: canonical page key -> cached copies."""
        with self._lock:
            return dict(self._cached)

    def snapshot(self) -> dict:
        """Canonical description of the whole index, for equality checks."""
        with self._lock:
            return {
                "page_size": self.page_size,
                "tenants": {
                    name: {"trie": s.trie.snapshot(), "popularity": s.popularity.snapshot()}
                    for name, s in self._tenants.items()
                },
                "cached": dict(self._cached),
                "owners": {k: [(n.id, i) for n, i in v] for k, v in self._owners.items()},
            }

    def stats(self) -> dict:
        with self._lock:
            return {
                "tenants": len(self._tenants),
                "nodes": sum(s.trie.node_count() for s in self._tenants.values()),
                "modelled_cached_tokens": (
                    None if self.page_size else sum(s.trie.cached_tokens for s in self._tenants.values())
                ),
                "engine_cached_pages": len(self._cached) if self.page_size else None,
                "bound_pages": len(self._owners),
                "page_size": self.page_size,
                "mirrored_nodes": sum(s.trie.mirrored for s in self._tenants.values()) if self.page_size else None,
            }
