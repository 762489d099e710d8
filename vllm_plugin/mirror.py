"""Engine side: keep the Context Index in step with vLLM's block pool, synchronously.

vLLM's own KV events are queued by the block pool and published once per
engine step (and over ZMQ), so a consumer is always up to a step behind.  The
plugin instead wraps the few :class:`vllm.v1.core.block_pool.BlockPool`
methods that change ``cached_block_hash_to_block`` and updates the index in
the same call, before vLLM's method returns:

* ``_insert_block_hash(key, block, num_tokens)``: an entry (hash, block) was
  added.  vLLM allows several physical blocks with one hash, so every entry
  counts as one copy and the mirror keeps a reference count per hash.
* ``_remove_cached_block_hashes(block)``: vLLM returns the keys it actually
  popped (eviction on reuse, ``evict_blocks``, partial-to-full promotion,
  ``move_block_hashes``); each is one copy fewer.
* ``reset_prefix_cache()``: on success the whole map is replaced; the mirror
  is cleared.
* ``cache_full_blocks(request, ...)`` and ``cache_partial_block(request, ...)``
  only record *which request* is caching, so the insert hook can read its
  token ids;
* ``get_new_blocks`` (where eviction happens, lazily, when a cached free
  block is reused), ``evict_blocks`` and ``move_block_hashes`` only mark a
  call boundary: the page events of one such call leave for the
  cross-process channel together when it returns.

Every entry is re-keyed to a canonical page key
(:func:`contextpilot_engine.pages.chain_page_keys` over the request's token
ids up to the entry's ``num_tokens``, salted with ``cache_salt`` and the LoRA
name as vLLM salts its hashes).  The request side computes the same keys from
the tokens it serves, so it never needs vLLM's hash function or seed.  A hash
that is inserted again (a duplicate, or ``move_block_hashes`` re-inserting
what it just removed) reuses the canonical key already known for it.

The class methods are patched once per process, and only when an engine with
the plugin enabled is built; each pool is mirrored only if its scheduler's
engine enabled the plugin (``pool._contextpilot_mirror``), so other pools in
the same process (e.g. a CPU offload pool) run vLLM's code untouched.  Any
exception in a hook is logged once and the mirror switches itself off and
empties the index, so the request side stops trusting a stale view; the
block pool itself is never affected.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Hashable

from contextpilot_engine.pages import ROOT_PAGE_KEY, chain_page_keys

from .failopen import logger, patch_method, report_failure
from .options import page_salt

__all__ = ["EngineMirror", "install_block_pool_hooks", "mirror_of", "pool_canonical_counts", "ATTR"]

#: attribute of a BlockPool instance holding its EngineMirror (absent: not mirrored)
ATTR = "_contextpilot_mirror"
#: attribute of a vLLM Request caching its canonical page keys computed so far
_REQ_PAGES = "_contextpilot_pages"

#: page event opcodes, shared with the channel's wire format
STORED, REMOVED, CLEARED = 1, 2, 3


class EngineMirror:
    """Canonical view of one block pool's cached hashes, pushed into a ContextIndex.

    ``publisher`` (optional, the cross-process channel) receives every page
    event through ``sink(op, key)`` after the index has it, and ``flush()``
    when the outermost block-pool call that produced events returns, so a
    batch leaves the engine thread as soon as the pool is consistent again.
    ``update_seconds`` sums the time spent updating the index inside the
    block-pool hooks: the whole cost (and lag) of the in-process mirror.
    """

    def __init__(self, index, page_size: int, publisher: Any = None):
        self.index = index
        self.page_size = page_size
        self.publisher = publisher
        #: serialises mirror updates against a subscriber's snapshot (see .channel)
        self.lock = threading.Lock()
        self._canon: dict[Hashable, int] = {}
        self._refs: dict[Hashable, int] = {}
        self._current: list[Any] = []  # requests of the block-pool calls in progress (None: no request)
        #: hashes removed during the current call, so a re-insert (move_block_hashes) keeps its key
        self._recent: dict[Hashable, int] = {}
        self.enabled = True
        self.unattributed = 0
        self.updates = 0
        self.update_seconds = 0.0

    # -------------------------------------------------------------- scopes
    def begin(self, request: Any = None) -> None:
        """A wrapped block-pool call starts (``request``: whose blocks it caches, if any)."""
        self._current.append(request)

    def end(self) -> None:
        if self._current:
            self._current.pop()
        if not self._current:
            self._recent.clear()
            self._flush()

    def _flush(self) -> None:
        publisher = self.publisher
        if publisher is not None:
            try:
                publisher.flush()
            except Exception as exc:  # the channel is best effort; the engine goes on
                report_failure("channel flush", exc)

    def _request(self) -> Any:
        for request in reversed(self._current):
            if request is not None:
                return request
        return None

    def _canonical_for(self, key: Hashable, num_tokens: int | None) -> int | None:
        known = self._canon.get(key)
        if known is None:
            known = self._recent.get(key)
        if known is not None:
            return known
        request = self._request()
        if request is None or not num_tokens:
            return None
        n = num_tokens // self.page_size
        if n < 1 or n * self.page_size != num_tokens:
            return None
        pages = request.__dict__.get(_REQ_PAGES)
        if pages is None:
            pages = []
            request.__dict__[_REQ_PAGES] = pages
        if len(pages) < n:
            page = self.page_size
            tokens = request.all_token_ids[len(pages) * page : n * page]
            lora = getattr(request, "lora_request", None)
            salt = page_salt(getattr(request, "cache_salt", None), getattr(lora, "lora_name", None))
            parent = pages[-1] if pages else ROOT_PAGE_KEY
            pages.extend(chain_page_keys(tokens, page, parent, salt if not pages else None))
        return pages[n - 1] if len(pages) >= n else None

    # --------------------------------------------------------------- events
    def on_insert(self, key: Hashable, num_tokens: int | None) -> None:
        start = time.perf_counter()
        canonical = self._canonical_for(key, num_tokens)
        if canonical is None:
            self.unattributed += 1
            if self.unattributed == 1:
                logger.warning(
                    "contextpilot: a block was cached outside any request context; the mirror cannot "
                    "name its tokens and leaves it out (reported once)"
                )
            return
        with self.lock:
            self._canon[key] = canonical
            self._refs[key] = self._refs.get(key, 0) + 1
            self.index.pages_stored((canonical,))
            if self.publisher is not None:
                self.publisher.sink(STORED, canonical)
        self.updates += 1
        self.update_seconds += time.perf_counter() - start
        if not self._current:  # a change outside any wrapped call: publish it now
            self._flush()

    def on_remove(self, keys) -> None:
        if not keys:
            return
        start = time.perf_counter()
        with self.lock:
            removed = []
            for key in keys:
                canonical = self._canon.get(key)
                if canonical is None:
                    continue
                refs = self._refs[key] - 1
                if refs:
                    self._refs[key] = refs
                else:
                    del self._refs[key]
                    del self._canon[key]
                    if self._current:
                        self._recent[key] = canonical
                removed.append(canonical)
            if removed:
                self.index.pages_removed(removed)
                if self.publisher is not None:
                    for canonical in removed:
                        self.publisher.sink(REMOVED, canonical)
        self.updates += 1
        self.update_seconds += time.perf_counter() - start
        if not self._current:
            self._flush()

    def on_clear(self) -> None:
        with self.lock:
            self._canon.clear()
            self._refs.clear()
            self._recent.clear()
            self.index.pages_cleared()
            if self.publisher is not None:
                self.publisher.sink(CLEARED, 0)
        if not self._current:
            self._flush()

    def disable(self, reason: BaseException) -> None:
        """Stop mirroring after a failure; the index then claims nothing is cached."""
        self.enabled = False
        try:
            self.on_clear()
        except Exception:  # the index itself is broken; nothing more to do
            pass

    # ----------------------------------------------------------- inspection
    def canonical_counts(self) -> dict[int, int]:
        """Canonical key -> copies, from the mirror's own hash table (for checks)."""
        with self.lock:
            return self.canonical_counts_unlocked()

    def canonical_counts_unlocked(self) -> dict[int, int]:
        """:meth:`canonical_counts` for a caller that already holds :attr:`lock`."""
        out: dict[int, int] = {}
        for key, refs in self._refs.items():
            c = self._canon[key]
            out[c] = out.get(c, 0) + refs
        return out

    def engine_hash_map(self) -> dict[Hashable, int]:
        with self.lock:
            return dict(self._canon)


def mirror_of(pool: Any) -> EngineMirror | None:
    mirror = pool.__dict__.get(ATTR)
    return mirror if mirror is not None and mirror.enabled else None


def pool_canonical_counts(pool: Any, hash_to_canonical: Callable[[Hashable], Any]) -> dict[Any, int]:
    """Copies per canonical key of what ``pool.cached_block_hash_to_block`` holds right now.

    ``hash_to_canonical`` maps vLLM's hash keys to canonical keys; tests pass
    a table computed independently of the mirror.  Reads vLLM's private
    ``_cache`` dict (one block, or ``{block_id: block}`` for duplicates).
    """
    out: dict[Any, int] = {}
    for key, blocks in pool.cached_block_hash_to_block._cache.items():
        copies = len(blocks) if isinstance(blocks, dict) else 1
        c = hash_to_canonical(key)
        out[c] = out.get(c, 0) + copies
    return out


# --------------------------------------------------------------------------- hooks
def _guard(pool: Any, what: str, func: Callable[[EngineMirror], None]) -> None:
    mirror = mirror_of(pool)
    if mirror is None:
        return
    try:
        func(mirror)
    except Exception as exc:  # fail open: the pool already did its work
        report_failure(f"engine mirror ({what})", exc, "the mirror is switched off for this engine")
        mirror.disable(exc)


def _wrap_caching(orig: Callable) -> Callable:
    def caching(self, request, *args, **kwargs):
        mirror = mirror_of(self)
        if mirror is None:
            return orig(self, request, *args, **kwargs)
        mirror.begin(request)
        try:
            return orig(self, request, *args, **kwargs)
        finally:
            mirror.end()

    return caching


def _wrap_scope(orig: Callable) -> Callable:
    """A block-pool call that may evict: its page events leave as one batch when it returns."""

    def scope(self, *args, **kwargs):
        mirror = mirror_of(self)
        if mirror is None:
            return orig(self, *args, **kwargs)
        mirror.begin(None)
        try:
            return orig(self, *args, **kwargs)
        finally:
            mirror.end()

    return scope


def _wrap_insert(orig: Callable) -> Callable:
    def _insert_block_hash(self, key, block, num_tokens):
        if mirror_of(self) is None:
            return orig(self, key, block, num_tokens)
        table = self.cached_block_hash_to_block
        before = table.contain(key, block.block_id)
        result = orig(self, key, block, num_tokens)
        if not before and table.contain(key, block.block_id):
            _guard(self, "insert", lambda m: m.on_insert(key, num_tokens))
        return result

    return _insert_block_hash


def _wrap_remove(orig: Callable) -> Callable:
    def _remove_cached_block_hashes(self, block):
        removed = orig(self, block)
        if removed:
            _guard(self, "remove", lambda m: m.on_remove(removed))
        return removed

    return _remove_cached_block_hashes


def _wrap_reset(orig: Callable) -> Callable:
    def reset_prefix_cache(self):
        ok = orig(self)
        if ok:
            _guard(self, "reset", lambda m: m.on_clear())  # on_clear publishes at once
        return ok

    return reset_prefix_cache


#: (method, wrapper factory, expected leading parameters, optional?) checked against this vLLM
_HOOKS = (
    ("_insert_block_hash", _wrap_insert, ["self", None, "block", "num_tokens"], False),
    ("_remove_cached_block_hashes", _wrap_remove, ["self", "block"], False),
    ("reset_prefix_cache", _wrap_reset, ["self"], False),
    (
        "cache_full_blocks",
        _wrap_caching,
        ["self", "request", "blocks", "num_cached_blocks", "num_full_blocks", "block_size", "kv_cache_group_id"],
        False,
    ),
    ("cache_partial_block", _wrap_caching, ["self", "request", "block", "num_tokens"], True),
    ("get_new_blocks", _wrap_scope, ["self", "num_blocks"], True),
    ("evict_blocks", _wrap_scope, ["self", "block_ids"], True),
    ("move_block_hashes", _wrap_scope, ["self", "src_block", "dst_block"], True),
)

_installed: bool | None = None
_install_lock = threading.Lock()


def install_block_pool_hooks() -> bool:
    """Patch ``BlockPool`` once; False (and vLLM untouched) if this vLLM's signatures differ."""
    global _installed
    with _install_lock:
        if _installed is not None:
            return _installed
        import inspect

        from vllm.v1.core.block_pool import BlockPool

        # Check every signature first: the mirror needs all hooks or none.
        for name, _, expected, optional in _HOOKS:
            func = BlockPool.__dict__.get(name)
            if func is None:
                if optional:
                    continue
                logger.warning("contextpilot: BlockPool.%s is missing in this vLLM; the cache mirror is disabled", name)
                _installed = False
                return False
            params = list(inspect.signature(func).parameters)
            exact = name in ("_insert_block_hash", "_remove_cached_block_hashes", "reset_prefix_cache")
            if (len(params) != len(expected) if exact else len(params) < len(expected)) or any(
                want is not None and got != want for got, want in zip(params, expected)
            ):
                logger.warning(
                    "contextpilot: BlockPool.%s has parameters %s, expected %s; this vLLM is not supported by "
                    "the cache mirror, which stays disabled (vLLM runs unchanged)",
                    name,
                    params,
                    expected,
                )
                _installed = False
                return False
        for name, factory, expected, optional in _HOOKS:
            if name not in BlockPool.__dict__:
                continue
            names = list(inspect.signature(BlockPool.__dict__[name]).parameters)
            patch_method(BlockPool, name, factory, names[: len(expected)], prefix_only=True)
        _installed = True
        return True
