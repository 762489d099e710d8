"""Exactly how many tokens of a served prompt the engine will find cached, from the mirrored pages.

The Context Index predicts a request's cache hit from its tree of served
block sequences, page by page along the blocks it places first.  That is
what the rewrite needs, but it cannot see a page that straddles the end of
the cached blocks into a block the tree has never seen there: when the
next block's first tokens are the same as those of another block that
followed the same prefix before (its label ``[3] ``, a common opening like
``Title:``), the engine still holds that page and hits it, and the tree
does not know.  Pages after the last block (the ranking note, the query)
are not in the tree at all.

With KV events the proxy knows every page the engine holds, by canonical
key, and it has the served prompt's token ids, so it can count what the
engine will count: the leading full pages of the prompt that are cached,
never including the last prompt token (engines always compute it).  That
number is the report's ``expected_cached_tokens`` in events mode.

:class:`CachedPages` collects the canonical keys the engine holds; it is
the mirror's publisher (:class:`~contextpilot_engine.integration.mirror.PagePublisher`),
so it sees every page event right after the index does.
"""

from __future__ import annotations

from typing import Any, Sequence

from contextpilot_engine.integration import metrics
from contextpilot_engine.integration.channel import CLEARED, REMOVED, STORED
from contextpilot_engine.integration.engine_keys import page_salt
from contextpilot_engine.pages import chain_page_keys

__all__ = ["CachedPages", "cached_prompt_tokens"]


class CachedPages:
    """Canonical page key -> cached copies, kept by the mirror's page events."""

    def __init__(self) -> None:
        self._copies: dict[int, int] = {}
        self._pending = [0, 0, 0]  # stored, removed, cleared since the last flush (for the metrics)

    def __len__(self) -> int:
        return len(self._copies)

    def __contains__(self, key: int) -> bool:
        return key in self._copies

    # PagePublisher
    def sink(self, op: int, key: int) -> None:
        copies = self._copies
        if op == STORED:
            copies[key] = copies.get(key, 0) + 1
            self._pending[0] += 1
        elif op == REMOVED:
            n = copies.get(key)
            if n is not None:
                if n > 1:
                    copies[key] = n - 1
                else:
                    del copies[key]
            self._pending[1] += 1
        elif op == CLEARED:
            copies.clear()
            self._pending[2] += 1

    def flush(self) -> None:
        stored, removed, cleared = self._pending
        if stored or removed or cleared:
            self._pending = [0, 0, 0]
            metrics.count_mirror_events(stored=stored, removed=removed, cleared=cleared)


def cached_prompt_tokens(cached: CachedPages, token_ids: Sequence[int], page_size: int, cache_salt: Any,
                         lora_name: Any) -> int:
    """Tokens of the prompt an engine with these pages reuses: leading cached full pages, last token excluded."""
    usable = (len(token_ids) - 1) // page_size  # the last prompt token is always computed
    if usable <= 0:
        return 0
    keys = chain_page_keys(token_ids[: usable * page_size], page_size, salt=page_salt(cache_salt, lora_name))
    hit = 0
    for key in keys:
        if key not in cached:
            break
        hit += 1
    return hit * page_size
