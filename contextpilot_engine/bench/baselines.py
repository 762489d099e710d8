"""Baseline orderings that every benchmark compares against.

* retrieval order: blocks as retrieved, requests as they arrived;
* frequency sort: each context's blocks sorted by how often the block occurs
  in the whole batch (most frequent first, ties by content hash), then the
  contexts sorted lexicographically by that sequence.  A cheap, strong
  baseline: it aligns popular blocks into common prefixes with no index.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

from ..blocks import block_key

__all__ = ["retrieval_order", "frequency_sort"]


def retrieval_order(contexts: Sequence[Sequence[str]]) -> tuple[list[list[int]], list[int]]:
    """Identity permutations and arrival order."""
    return [list(range(len(c))) for c in contexts], list(range(len(contexts)))


def frequency_sort(contexts: Sequence[Sequence[str]]) -> tuple[list[list[int]], list[int]]:
    """Per-context permutations and an execution order (see the module docstring)."""
    keys = [[block_key(t) for t in c] for c in contexts]
    freq = Counter(k for ks in keys for k in set(ks))
    perms = []
    seqs = []
    for ks in keys:
        perm = sorted(range(len(ks)), key=lambda j: (-freq[ks[j]], ks[j], j))
        perms.append(perm)
        seqs.append([(-freq[ks[j]], ks[j]) for j in perm])
    order = sorted(range(len(contexts)), key=lambda i: (seqs[i], i))
    return perms, order
