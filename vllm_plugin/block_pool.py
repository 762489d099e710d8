"""vLLM engine side: the block-pool hooks that feed the integration layer's page mirror.

vLLM's own KV events are queued by the block pool and published once per
engine step (and over ZMQ), so a consumer is always up to a step behind.  The
plugin instead wraps the few :class:`vllm.v1.core.block_pool.BlockPool`
methods that change ``cached_block_hash_to_block`` and reports each change to
a :class:`~contextpilot_engine.integration.mirror.PageMirror` in the same
call, before vLLM's method returns:

* ``_insert_block_hash(key, block, num_tokens)``: an entry (hash, block) was
  added.  vLLM allows several physical blocks with one hash, so every entry
  counts as one copy (the mirror counts copies per hash).
* ``_remove_cached_block_hashes(block)``: vLLM returns the keys it actually
  popped (eviction on reuse, ``evict_blocks``, partial-to-full promotion,
  ``move_block_hashes``); each is one copy fewer.
* ``reset_prefix_cache()``: on success the whole map is replaced; the mirror
  is cleared.
* ``cache_full_blocks(request, ...)`` and ``cache_partial_block(request, ...)``
  open a mirror scope whose subject is the request being cached, so the
  insert hook can read its token ids;
* ``get_new_blocks`` (where eviction happens, lazily, when a cached free
  block is reused), ``evict_blocks`` and ``move_block_hashes`` open a scope
  without a subject: the page events of one such call leave for the
  cross-process channel together when it returns.

Every entry is named by its canonical page key
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
exception in a hook switches that mirror off (it empties its index); the
block pool itself is never affected.
"""

from __future__ import annotations

import inspect
import time
from typing import Any, Callable, Hashable

from contextpilot_engine.integration.engine_keys import page_salt
from contextpilot_engine.integration.failopen import logger, once, report_failure
from contextpilot_engine.integration.mirror import PageMirror
from contextpilot_engine.pages import ROOT_PAGE_KEY, chain_page_keys

from .hook_points import hook_point, matches, patch

__all__ = ["install_block_pool_hooks", "mirror_of", "pool_canonical_counts", "ATTR"]

#: attribute of a BlockPool instance holding its PageMirror (absent: not mirrored)
ATTR = "_contextpilot_mirror"
#: attribute of a vLLM Request caching its canonical page keys computed so far
_REQ_PAGES = "_contextpilot_pages"


def _request_page_key(mirror: PageMirror, num_tokens: int | None) -> int | None:
    """Canonical key of the page ending at ``num_tokens`` of the request being cached, if any."""
    request = mirror.subject()
    if request is None or not num_tokens:
        return None
    page = mirror.page_size
    n = num_tokens // page
    if n < 1 or n * page != num_tokens:
        return None
    pages = request.__dict__.get(_REQ_PAGES)
    if pages is None:
        pages = []
        request.__dict__[_REQ_PAGES] = pages
    if len(pages) < n:
        tokens = request.all_token_ids[len(pages) * page : n * page]
        lora = getattr(request, "lora_request", None)
        salt = page_salt(getattr(request, "cache_salt", None), getattr(lora, "lora_name", None))
        parent = pages[-1] if pages else ROOT_PAGE_KEY
        pages.extend(chain_page_keys(tokens, page, parent, salt if not pages else None))
    return pages[n - 1] if len(pages) >= n else None


def _on_insert(mirror: PageMirror, key: Hashable, num_tokens: int | None) -> None:
    started = time.perf_counter()
    canonical = mirror.known(key)
    if canonical is None:
        canonical = _request_page_key(mirror, num_tokens)
    mirror.stored(key, canonical, started)


def mirror_of(pool: Any) -> PageMirror | None:
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
def _guard(pool: Any, what: str, func: Callable[[PageMirror], None]) -> None:
    mirror = mirror_of(pool)
    if mirror is None:
        return
    try:
        func(mirror)
    except Exception as exc:  # fail open: the pool already did its work
        report_failure("mirror_error", exc, f"{what}; the mirror is switched off for this engine")
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
            _guard(self, "insert", lambda m: _on_insert(m, key, num_tokens))
        return result

    return _insert_block_hash


def _wrap_remove(orig: Callable) -> Callable:
    def _remove_cached_block_hashes(self, block):
        removed = orig(self, block)
        if removed:
            _guard(self, "remove", lambda m: m.removed(removed))
        return removed

    return _remove_cached_block_hashes


def _wrap_reset(orig: Callable) -> Callable:
    def reset_prefix_cache(self):
        ok = orig(self)
        if ok:
            _guard(self, "reset", lambda m: m.cleared())  # cleared() publishes at once
        return ok

    return reset_prefix_cache


#: the wrapper of each BlockPool method (signatures: .hook_points)
_WRAPPERS = {
    "_insert_block_hash": _wrap_insert,
    "_remove_cached_block_hashes": _wrap_remove,
    "reset_prefix_cache": _wrap_reset,
    "cache_full_blocks": _wrap_caching,
    "cache_partial_block": _wrap_caching,
    "get_new_blocks": _wrap_scope,
    "evict_blocks": _wrap_scope,
    "move_block_hashes": _wrap_scope,
}


@once
def install_block_pool_hooks() -> bool:
    """Patch ``BlockPool`` once; False (and vLLM untouched) if this vLLM's signatures differ."""
    from vllm.v1.core.block_pool import BlockPool

    # Check every signature first: the mirror needs all required hooks or none.
    points = [hook_point("BlockPool", name) for name in _WRAPPERS]
    present = []
    for point in points:
        func = BlockPool.__dict__.get(point.method)
        if func is None:
            if point.optional:
                continue
            logger.warning("contextpilot: BlockPool.%s is missing in this vLLM; the cache mirror is disabled",
                           point.method)
            return False
        params = list(inspect.signature(func).parameters)
        if not matches(point, params):
            logger.warning(
                "contextpilot: BlockPool.%s has parameters %s, expected %s; this vLLM is not supported by "
                "the cache mirror, which stays disabled (vLLM runs unchanged)",
                point.method,
                params,
                list(point.params),
            )
            return False
        present.append(point.method)
    for name in present:
        patch(BlockPool, name, _WRAPPERS[name])
    return True
