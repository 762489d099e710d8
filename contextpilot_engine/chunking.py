"""Content-defined chunking of long texts, so partial repeats can be found.

Agents resend long tool outputs (a file listing, a log, a document) that are
mostly, not exactly, what they sent before.  Cutting a text at fixed offsets
would shift every boundary after the first edit; instead a boundary falls
after a *word whose hash is 0 modulo the target size*, so a boundary depends
only on the words around it and an edit moves at most the boundaries next to
it.  The unchanged chunks before and after an edit hash the same as before.

Words are maximal runs of non-space characters with the whitespace that
follows them, so joining the chunks gives back the text exactly.  Chunks are
kept between ``target/4`` and ``target*4`` words long.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import xxhash

__all__ = ["Chunk", "chunk_text", "MIN_CHUNK_WORDS"]

#: the smallest chunk target: shorter chunks would repeat by chance across unrelated texts
MIN_CHUNK_WORDS = 4

_WORD = re.compile(r"\s*\S+\s*|\s+")


@dataclass(frozen=True)
class Chunk:
    text: str
    key: int  # xxh3-128 of the chunk text with whitespace runs normalised
    words: int


def _chunk_key(words: list[str]) -> int:
    return xxhash.xxh3_128_intdigest(" ".join(w.strip() for w in words).encode("utf-8"))


def chunk_text(text: str, target_words: int = 48) -> list[Chunk]:
    """Split ``text`` into content-defined chunks (see the module docstring)."""
    if target_words < MIN_CHUNK_WORDS:
        raise ValueError(f"target_words must be >= {MIN_CHUNK_WORDS}, got {target_words}")
    words = _WORD.findall(text)
    lo, hi = max(1, target_words // 4), target_words * 4
    chunks: list[Chunk] = []
    start = 0
    digest = xxhash.xxh32_intdigest
    for i, w in enumerate(words):
        size = i + 1 - start
        if size < lo:
            continue
        if size >= hi or digest(w.strip().encode("utf-8")) % target_words == 0:
            part = words[start : i + 1]
            chunks.append(Chunk("".join(part), _chunk_key(part), len(part)))
            start = i + 1
    if start < len(words):
        part = words[start:]
        if chunks and len(part) < lo:  # a short tail joins the previous chunk
            prev = chunks.pop()
            merged = _WORD.findall(prev.text) + part
            chunks.append(Chunk(prev.text + "".join(part), _chunk_key(merged), len(merged)))
        else:
            chunks.append(Chunk("".join(part), _chunk_key(part), len(part)))
    return chunks
