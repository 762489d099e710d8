"""Canonical keys for token pages, shared by the engine side and the request side.

Engines identify a cached page of ``page_size`` tokens by a chained hash of
its tokens and of everything before it.  Their hashes are not portable: vLLM's
default seed is fixed only for SHA-256 and random per process for xxhash, and
SGLang uses its own scheme.  The request path (where blocks are reordered) may
live in another process than the engine core, so instead of reproducing each
engine's hash we re-key every page to a *canonical* chained key computed from
token ids alone:

    key(page j) = xxh3_128(key(page j-1) || salt-of-page || token ids of page j)

The engine side computes it when a page enters the cache (it has the token
ids there), the request side when it binds a served prompt to the index.  Both
agree without sharing any engine state.
"""

from __future__ import annotations

from array import array
from typing import Sequence

import xxhash

__all__ = ["ROOT_PAGE_KEY", "chain_page_keys", "salt_bytes"]

#: parent key of the first page of every prompt
ROOT_PAGE_KEY = 0


def salt_bytes(salt: object) -> bytes:
    """Bytes of a namespace salt (a cache salt, a LoRA name) mixed into the first page key."""
    if salt is None:
        return b""
    if isinstance(salt, bytes):
        return salt
    return repr(salt).encode("utf-8")


def _int_bytes(key: int) -> bytes:
    return key.to_bytes(16, "little", signed=False)


def chain_page_keys(
    token_ids: Sequence[int],
    page_size: int,
    parent: int = ROOT_PAGE_KEY,
    salt: object = None,
    start: int = 0,
) -> list[int]:
    """Canonical keys of the full pages of ``token_ids[start:]`` (a sequence, or an ``array("q")``).

    ``parent`` is the key of the page just before ``start`` (``ROOT_PAGE_KEY``
    at the beginning of a prompt); ``salt`` is mixed into the first page of
    the prompt only, as engines do with a cache salt.  A trailing partial page
    has no key: engines never cache it.
    """
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size}")
    n_full = (len(token_ids) - start) // page_size
    keys: list[int] = []
    prev = parent
    salt_b = salt_bytes(salt) if parent == ROOT_PAGE_KEY else b""
    digest = xxhash.xxh3_128_intdigest
    width = 8 * page_size  # bytes of one page of int64 token ids
    span = token_ids[start : start + n_full * page_size]
    buf = (span if isinstance(span, array) and span.typecode == "q" else array("q", span)).tobytes()
    for j in range(n_full):
        chunk = buf[j * width : (j + 1) * width]
        if j == 0 and salt_b:
            chunk = salt_b + b"\x00" + chunk
        prev = digest(_int_bytes(prev) + chunk)
        keys.append(prev)
    return keys
