"""Candidate pairs of contexts that may share blocks, without an all-pairs pass.

Scoring all ``n^2`` pairs is what made the reference's index build take 52 s
for 4k contexts.  Here each context *probes* an inverted index (item ->
contexts holding it) with its ``probe_items`` rarest items, which are the
most telling: two contexts that share a rare block very likely belong
together, while a block in half the batch says little.  Holders of one item
are sorted by a min-hash signature of their whole item set (similar sets
agree on min-hashes with probability equal to their Jaccard similarity, as
in LSH), and each holder is paired with the next ``window`` holders.  That is
``n * probe_items * window`` raw pairs, linear in the batch.

Pairs are deduplicated, pre-ranked by how many probes met, scored exactly by
the overlap kernel (tokens shared), and each context keeps its
``per_context`` best partners.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .kernels import OverlapBackend, pack_rows, pair_overlap

__all__ = ["CandidateConfig", "candidate_pairs"]


@dataclass(frozen=True)
class CandidateConfig:
    #: items per context used to find partners (its rarest ones: the most telling)
    probe_items: int = 6
    #: partners each context meets in one item's signature-sorted holder list
    window: int = 4
    #: min-hash functions in the signature
    n_hashes: int = 4
    #: best partners kept per context after exact scoring
    per_context: int = 6
    seed: int = 0x5EED

    @classmethod
    def for_batch(cls, n_contexts: int, blocks: int | None = None) -> "CandidateConfig":
        """How hard to look, by batch size and (``blocks``) the blocks of all its contexts together.

        Small batches get more candidates (better partners, a few % more
        sharing), and keep many partners each: the merge tree then sees the
        second and third best partners of a context too, which is what finds
        the shared cores of topical batches, at little cost since the pairs
        are already scored.  Contexts of a retriever's top-k size
        (``SHORT_CONTEXT`` blocks or fewer on average) also probe with more
        of their blocks (all of a top-10 retrieval, most of a top-20 one)
        and meet twice the neighbours in each holder list: probing more of a
        top-20 context's blocks finds partners that its rarest ones miss.
        Wider windows and more partners than that found little more on the
        real retrieval traces, for much more planning time.  The work of the
        merge tree grows with pairs times blocks, so longer contexts
        (memories, agent histories) keep the narrower search, where the
        wider one found nothing more.
        Above 50k contexts the lean default keeps 100k contexts well under
        10 s.  The tiers were chosen on the benchmark suite so that the plan
        stays 20x faster than the reference's on the same batch.
        """
        if n_contexts <= 20_000:
            if blocks is None or blocks > SHORT_CONTEXT * n_contexts:
                return cls(probe_items=10, window=8, per_context=48)
            return cls(probe_items=16, window=16, per_context=48)
        if n_contexts <= 50_000:
            return cls(probe_items=10, window=6, per_context=10)
        return cls(probe_items=4, window=3)


#: mean blocks per context up to which a small batch meets the wider window (:meth:`CandidateConfig.for_batch`)
SHORT_CONTEXT = 20


def _pairs_within_runs(run_id: np.ndarray, members: np.ndarray, max_gap: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (members[p], members[p+d]) for 1 <= d <= max_gap inside runs of equal ``run_id``."""
    lefts, rights = [], []
    for d in range(1, max_gap + 1):
        if d >= len(members):
            break
        same = run_id[d:] == run_id[:-d]
        lefts.append(members[:-d][same])
        rights.append(members[d:][same])
    if not lefts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(lefts), np.concatenate(rights)


def _signature_rank(n: int, lengths: np.ndarray, items: np.ndarray, n_items: int, config: CandidateConfig):
    """Rank of every context when sorted by its min-hash signature (similar sets sort together)."""
    rng = np.random.default_rng(config.seed)
    starts = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    nonempty = lengths > 0
    sig = np.zeros((n, config.n_hashes), dtype=np.int64)
    for h in range(config.n_hashes):
        vals = rng.permutation(n_items).astype(np.int64)[items]
        sig[nonempty, h] = np.minimum.reduceat(vals, starts[:-1][nonempty])
    rank = np.empty(n, dtype=np.int64)
    rank[np.lexsort(sig.T[::-1])] = np.arange(n, dtype=np.int64)
    return rank


def _sort_by(major: np.ndarray, minor: np.ndarray, last: np.ndarray | None = None) -> np.ndarray:
    """Order by (major, minor[, last]) for non-negative int arrays.

    When the keys fit one int64 they are combined and sorted with the default
    (fastest) algorithm; with ``last`` making every key distinct, the result is
    the same whatever the algorithm.
    """
    if len(major) == 0:
        return np.zeros(0, dtype=np.int64)
    span_minor = int(minor.max()) + 1
    span_last = int(last.max()) + 1 if last is not None else 1
    if int(major.max()) + 1 <= (1 << 62) // (span_minor * span_last):
        key = major * span_minor + minor
        if last is not None:
            key = key * span_last + last
        return np.argsort(key, kind="stable" if last is None else "quicksort")
    keys = (minor, major) if last is None else (last, minor, major)
    return np.lexsort(keys)


def _rarest(lengths: np.ndarray, items: np.ndarray, holders: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each context's ``k`` rarest items that some other context also holds: (items, contexts)."""
    n = len(lengths)
    ctx = np.repeat(np.arange(n, dtype=np.int64), lengths)
    n_items = len(holders)
    shared = holders[items] > 1
    key = holders[items] * n_items + items  # rarer first, then by item: unique within a context
    # sorted by (context, key) over the flat items: each context's first k are its rarest
    # (no context-by-width matrix, whose size one very long context would set for the whole batch)
    order = np.lexsort((key, ctx))
    take = order[shared[order]]
    t_ctx = ctx[take]
    first = np.searchsorted(t_ctx, t_ctx, side="left")
    take = take[np.arange(len(take), dtype=np.int64) - first < k]
    return items[take], ctx[take]


def _keep_best(lo: np.ndarray, hi: np.ndarray, score: np.ndarray, k: int) -> np.ndarray:
    """Mask of pairs that are among the ``k`` best of either of their two contexts."""
    ends = np.concatenate([lo, hi])
    other = np.concatenate([hi, lo])
    edge = np.concatenate([np.arange(len(lo))] * 2)
    s2 = np.concatenate([score, score])
    order = _sort_by(ends, int(s2.max()) - s2 if len(s2) else s2, other)
    ends_sorted = ends[order]
    first = np.searchsorted(ends_sorted, ends_sorted, side="left")
    chosen = np.zeros(len(lo), dtype=bool)
    chosen[edge[order][np.arange(len(order)) - first < k]] = True
    return chosen


def candidate_pairs(
    lengths: np.ndarray,
    items: np.ndarray,
    weights: np.ndarray,
    group: np.ndarray,
    config: CandidateConfig = CandidateConfig(),
    backend: OverlapBackend | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scored candidate pairs ``(left, right, shared_tokens)`` with left < right, same group, overlap > 0."""
    n = len(lengths)
    empty = (np.zeros(0, np.int64),) * 3
    if n < 2 or len(items) == 0:
        return empty
    n_items = len(weights)

    # each context probes with its rarest items held by at least one other context
    holders = np.bincount(items, minlength=n_items)
    p_items, p_ctx = _rarest(lengths, items, holders, config.probe_items)

    # holders of each probed item, sorted by signature: neighbours are similar contexts
    sig_rank = _signature_rank(n, lengths, items, n_items, config)
    order = _sort_by(p_items, sig_rank[p_ctx])
    left, right = _pairs_within_runs(p_items[order], p_ctx[order], config.window)
    lo, hi = np.minimum(left, right), np.maximum(left, right)
    keep = group[lo] == group[hi]
    if not keep.any():
        return empty
    codes, inverse = np.unique(lo[keep] * n + hi[keep], return_inverse=True)
    lo, hi = codes // n, codes % n

    # a first, cheap score: how many probes met; then exact tokens for the survivors
    met = np.bincount(inverse, minlength=len(codes))
    first_cut = _keep_best(lo, hi, met, 2 * config.per_context)
    lo, hi = lo[first_cut], hi[first_cut]
    rows = pack_rows(lengths, items, weights, pow2=backend is not None and backend.name == "triton")
    shared = pair_overlap(rows, lo, hi, backend)
    pos = shared > 0
    lo, hi, shared = lo[pos], hi[pos], shared[pos]
    chosen = _keep_best(lo, hi, shared, config.per_context)
    return lo[chosen], hi[chosen], shared[chosen]
