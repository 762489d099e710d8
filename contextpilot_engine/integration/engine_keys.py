"""Engines' own page hashes, translated to canonical page keys.

The index speaks only canonical page keys (:mod:`contextpilot_engine.pages`):
chained hashes of token ids that the request side can compute from the tokens
it serves.  Engines name pages by hashes of their own (vLLM's block hashes,
SGLang's chained SHA-256 per page), and report removals by those hashes
alone, so a mirror must remember which canonical key each engine hash stands
for.  :class:`EngineKeyMap` is that memory, with one entry point per engine
style:

* :meth:`EngineKeyMap.add`: the caller computed the canonical key itself
  (vLLM's block pool, where the request's token ids are at hand);
* :meth:`EngineKeyMap.store_chain`: the event carries the pages' token ids and
  the parent page's engine hash (SGLang's radix cache and both engines' KV
  events), so the canonical keys are chained from the parent's.

Engines may hold several physical pages under one hash (vLLM allows
duplicates), each stored and removed separately, so the map counts copies: a
hash stays mapped until every copy is gone.
"""

from __future__ import annotations

from typing import Any, Hashable, Sequence

from contextpilot_engine.pages import ROOT_PAGE_KEY, chain_page_keys

__all__ = ["EngineKeyMap", "page_salt"]


def page_salt(cache_salt: Any, lora_name: Any) -> tuple | None:
    """The namespace mixed into a prompt's first canonical page key.

    Engines put the request's cache salt and LoRA adapter into their page
    hashes, so two prompts that differ only there never share KV.  The
    canonical keys must keep them apart too; the engine side and the request
    side both call this to get the same salt.
    """
    if cache_salt is None and lora_name is None:
        return None
    return ("cache_salt", cache_salt, "lora", lora_name)


class EngineKeyMap:
    """Engine page hash -> canonical page key, with a copy count per hash."""

    def __init__(self) -> None:
        self._canon: dict[Hashable, int] = {}
        self._refs: dict[Hashable, int] = {}

    def __len__(self) -> int:
        return len(self._canon)

    def canonical(self, engine_hash: Hashable) -> int | None:
        return self._canon.get(engine_hash)

    def add(self, engine_hash: Hashable, canonical: int) -> None:
        """One more cached copy of the page ``engine_hash``, whose canonical key is ``canonical``."""
        self._canon[engine_hash] = canonical
        self._refs[engine_hash] = self._refs.get(engine_hash, 0) + 1

    def store_chain(
        self,
        engine_hashes: Sequence[Hashable],
        parent_engine_hash: Hashable | None,
        token_ids: Sequence[int],
        page_size: int,
        salt: object = None,
        parent_canonical: int | None = None,
    ) -> list[int] | None:
        """Register consecutive stored pages; their canonical keys, or None if the parent is unknown.

        ``token_ids`` holds the pages' tokens, ``page_size`` each; a parent
        the map never saw (its store was missed) cannot be chained from, so
        nothing is registered, unless the caller knows the parent's canonical
        key from elsewhere (``parent_canonical``, e.g. a page held on another
        medium).
        """
        if parent_engine_hash is None:
            parent = ROOT_PAGE_KEY
        else:
            known = self._canon.get(parent_engine_hash, parent_canonical)
            if known is None:
                return None
            parent = known
        keys = chain_page_keys(token_ids[: len(engine_hashes) * page_size], page_size, parent, salt)
        for h, k in zip(engine_hashes, keys):
            self.add(h, k)
        return keys

    def remove(self, engine_hashes: Sequence[Hashable]) -> list[int]:
        """One copy fewer of each page; the canonical keys of the copies removed (unknown hashes skipped)."""
        out = []
        for h in engine_hashes:
            k = self._canon.get(h)
            if k is None:
                continue
            out.append(k)
            refs = self._refs[h] - 1
            if refs:
                self._refs[h] = refs
            else:
                del self._refs[h]
                del self._canon[h]
        return out

    def clear(self) -> None:
        self._canon.clear()
        self._refs.clear()

    def hash_map(self) -> dict[Hashable, int]:
        """Copy of engine hash -> canonical key (for checks)."""
        return dict(self._canon)

    def canonical_counts(self) -> dict[int, int]:
        """Canonical key -> cached copies over every engine hash."""
        out: dict[int, int] = {}
        for h, refs in self._refs.items():
            c = self._canon[h]
            out[c] = out.get(c, 0) + refs
        return out
