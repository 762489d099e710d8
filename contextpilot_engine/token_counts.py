"""Block token counts from a real tokenizer: each distinct block tokenized once, unseen ones in one call.

The same documents come back request after request, and a tokenizer call per
block per request costs more than everything else on the request path (a
Hugging Face tokenizer's Python wrapper dominates short texts).  So counts are
kept by content key (the block's xxh3-128, computed anyway for its identity)
in a bounded least-recently-used table, and the blocks of a request that are
not in it are encoded together in one batched call of the tokenizer's fast
backend.  The table belongs to one counter, so to one tokenizer.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Callable, Sequence

from .blocks import block_key, estimate_tokens

__all__ = ["CachedTokenCounter"]


def _batch_encoder(tokenizer: Any) -> Callable[[list[str]], list[int]]:
    """The cheapest way this tokenizer offers to count the tokens of several texts (no special tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)  # Hugging Face fast tokenizers
    if backend is not None:
        encode_batch = getattr(backend, "encode_batch_fast", None) or backend.encode_batch

        def count_backend(texts: list[str]) -> list[int]:
            return [len(e.ids) for e in encode_batch(texts, add_special_tokens=False)]

        return count_backend
    encode = tokenizer.encode

    def count_each(texts: list[str]) -> list[int]:
        out = []
        for text in texts:
            try:
                ids = encode(text, add_special_tokens=False)
            except TypeError:  # tokenizers without the keyword (tiktoken-like)
                ids = encode(text)
            out.append(len(ids))
        return out

    return count_each


class CachedTokenCounter:
    """A ``text -> tokens`` counter over a tokenizer, with a bounded table of counts by block key.

    Special tokens are left out: a block sits in the middle of a prompt,
    where the chat template adds none.  Every count is at least 1.
    """

    def __init__(self, tokenizer: Any, max_entries: int = 200_000, estimate_unseen: bool = False):
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self._encode = _batch_encoder(tokenizer)
        #: unseen texts get a character estimate instead of a tokenizer call; the caller teaches the
        #: exact count later (:meth:`learn`), e.g. from the prompt the engine tokenized anyway
        self.estimate_unseen = estimate_unseen
        self.max_entries = max_entries
        self._counts: OrderedDict[int, int] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._counts)

    def __call__(self, text: str) -> int:
        return self.count_many([text], [block_key(text)])[0]

    def count_many(self, texts: Sequence[str], keys: Sequence[int]) -> list[int]:
        """Token counts of ``texts`` (whose content keys are ``keys``), tokenizing only unseen ones, together."""
        counts = self._counts
        out: list[int | None] = [None] * len(texts)
        missing: dict[int, list[int]] = {}
        with self._lock:
            for i, key in enumerate(keys):
                n = counts.get(key)
                if n is None:
                    missing.setdefault(key, []).append(i)
                else:
                    counts.move_to_end(key)
                    out[i] = n
            self.hits += len(texts) - sum(len(v) for v in missing.values())
        if missing and self.estimate_unseen:
            for positions in missing.values():
                n = estimate_tokens(texts[positions[0]])
                for i in positions:
                    out[i] = n
            return out  # type: ignore[return-value]

        if missing:
            first = [positions[0] for positions in missing.values()]
            found = self._encode([texts[i] for i in first])
            with self._lock:
                self.misses += len(first)
                for (key, positions), n in zip(missing.items(), found):
                    n = max(1, int(n))
                    counts[key] = n
                    for i in positions:
                        out[i] = n
                while len(counts) > self.max_entries:
                    counts.popitem(last=False)
        return out  # type: ignore[return-value]

    def learn(self, key: int, tokens: int) -> None:
        """Record the count of the text with content key ``key`` (from a tokenization done elsewhere)."""
        with self._lock:
            self._counts[key] = max(1, int(tokens))
            self._counts.move_to_end(key)
            while len(self._counts) > self.max_entries:
                self._counts.popitem(last=False)
