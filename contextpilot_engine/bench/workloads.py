"""Seeded synthetic workloads calibrated to published statistics.

Chunks are identified by short synthetic texts (``"chunk 17 of topic 3"``) and
carry a token length drawn from the documented range; a workload's
:meth:`Workload.token_counter` returns those lengths, so benchmarks weigh
blocks exactly as a real tokenizer would weigh chunks of that size, without
materialising gigabytes of filler text.  :func:`materialise` turns a chunk
into real text of about its token length when an engine must see it.

This module holds the shared types and the multi-hop RAG batch;
:mod:`.scenarios` has the long-document QA, memory-chat and agent
generators, :mod:`.traces` the JSONL and Mooncake import/export.

Statistics (from the published workloads): retrieval popularity is Zipf
(RAGCache: 3% of the chunks draw about 60% of the retrievals), queries have
topic locality, relevance order is query dependent, top-k is 10 to 20,
chunks are 200 to 1,300 tokens.  :func:`workload_stats` measures what a
generated workload actually has, so the report can print it next to the
targets.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

__all__ = ["Request", "Workload", "rag_batch", "zipf_weights", "materialise", "workload_stats"]

#: words for materialised chunk text (any text works: the model's weights are random)
_WORDS = (
    "river market signal cedar orbit lantern quartz meadow harbor tundra falcon ember canyon "
    "mosaic velvet glacier prism thunder willow summit copper nectar pebble saffron beacon "
    "compass drift fable garnet hollow ivory jasper kettle lagoon marble nimbus oasis pioneer "
    "quiver ripple sable timber umber vortex whisper yonder zephyr anchor bramble cobalt"
).split()


@dataclass
class Request:
    """One LLM call: its context blocks in retrieval (relevance) order and its query.

    ``conversation`` groups the turns of one chat or agent session (turns of a
    conversation must run in arrival order); ``timestamp`` (seconds from the
    start of the trace) and ``output_tokens`` are carried for trace export.
    """

    contexts: list[str]
    query: str
    conversation: str | None = None
    timestamp: float | None = None
    output_tokens: int = 128


@dataclass
class Workload:
    """A named list of requests plus the token length of every block text.

    ``causal`` marks workloads whose requests depend on earlier answers (chat
    turns, agent steps): benchmarks then keep arrival order and only reorder
    blocks inside each request.
    """

    name: str
    requests: list[Request]
    chunk_tokens: dict[str, int]
    params: dict = field(default_factory=dict)
    causal: bool = False

    def token_counter(self) -> Callable[[str], int]:
        lengths = self.chunk_tokens

        def count(text: str) -> int:
            n = lengths.get(text)
            return n if n is not None else max(1, (len(text) + 3) // 4)

        return count

    @property
    def contexts(self) -> list[list[str]]:
        return [r.contexts for r in self.requests]

    @property
    def queries(self) -> list[str]:
        return [r.query for r in self.requests]


def materialise(wl: Workload, words_per_token: float = 0.75, seed: int = 0) -> Workload:
    """The same workload with every chunk replaced by real text of about its token length.

    Each chunk becomes a deterministic run of words (seeded by the chunk), so
    an engine tokenizes, caches and reuses it like any document.
    """
    rng = np.random.default_rng(seed)
    mapping: dict[str, str] = {}
    lengths: dict[str, int] = {}
    for i, (label, tokens) in enumerate(sorted(wl.chunk_tokens.items())):
        n_words = max(1, int(tokens * words_per_token))
        words = rng.choice(len(_WORDS), size=n_words)
        text = f"Document {i}: " + " ".join(_WORDS[w] for w in words) + "."
        mapping[label] = text
        lengths[text] = tokens
    requests = [
        Request([mapping[c] for c in r.contexts], r.query, r.conversation, r.timestamp, r.output_tokens)
        for r in wl.requests
    ]
    return Workload(wl.name + "-text", requests, lengths, dict(wl.params, materialised=True), wl.causal)


def zipf_weights(n: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """Zipf probabilities over ``n`` items, assigned to items in a random order."""
    ranks = np.arange(1, n + 1, dtype=np.float64)
    p = ranks ** (-alpha)
    p /= p.sum()
    return p[rng.permutation(n)]


def fill_top_k(chosen: list, top_k: int, draw: Callable[[], "np.ndarray | list"]) -> None:
    """Append distinct items from repeated ``draw()`` calls until ``chosen`` holds ``top_k``.

    Retrieval never returns a chunk twice for one query, so popularity draws
    that repeat a chunk already chosen are skipped.
    """
    taken = set(chosen)
    while len(chosen) < top_k:
        for c in draw():
            if c not in taken:
                taken.add(c)
                chosen.append(c)
                if len(chosen) == top_k:
                    break


def rag_batch(
    n_queries: int = 1000,
    top_k: int = 20,
    n_chunks: int | None = None,
    n_topics: int | None = None,
    zipf_alpha: float = 1.0,
    topic_share: float = 0.5,
    min_tokens: int = 200,
    max_tokens: int = 1300,
    seed: int = 0,
    topic_alpha: float | None = None,
    coupled: bool = False,
) -> Workload:
    """Multi-hop RAG batch: each query retrieves ``top_k`` distinct chunks.

    ``topic_share`` of each query's chunks come from its topic's pool, the
    rest from the global Zipf popularity (``zipf_alpha``); the list is then
    shuffled, because retrieval relevance order differs per query.

    Two knobs calibrate popularity skew (both off by default, which keeps the
    batches of earlier benchmarks unchanged):

    * ``topic_alpha``: queries pick their topic with Zipf popularity (a few
      hot topics) instead of in proportion to the topic's size;
    * ``coupled``: inside a topic, chunks are drawn by their *global*
      popularity instead of an independent Zipf, so a globally popular chunk
      is popular in its topic too.

    Because a query retrieves each chunk at most once, the most popular
    chunks saturate (they appear in almost every request) and the Zipf
    exponent understates the skew: on a 2,000-chunk corpus, 3% of the chunks
    draw 40-46% of the retrievals at ``zipf_alpha=1``; RAGCache's 60% needs
    ``zipf_alpha=1.25, topic_alpha=1, topic_share=0.3, coupled=True``
    (53% at top-20, 59% at top-10); see :func:`workload_stats`.
    """
    rng = np.random.default_rng(seed)
    n_chunks = n_chunks or max(2000, n_queries // 2)
    n_topics = n_topics or max(10, n_chunks // 20)
    if top_k > n_chunks:
        raise ValueError("top_k cannot exceed n_chunks")
    if not 0.0 <= topic_share <= 1.0:
        raise ValueError(f"topic_share must be in [0, 1], got {topic_share}")
    lengths = rng.integers(min_tokens, max_tokens + 1, size=n_chunks)
    topic_of = rng.integers(0, n_topics, size=n_chunks)
    texts = [f"chunk {c} (topic {topic_of[c]})" for c in range(n_chunks)]
    global_p = zipf_weights(n_chunks, zipf_alpha, rng)
    pools = [np.flatnonzero(topic_of == t) for t in range(n_topics)]
    pool_p = []
    for pool in pools:
        if not len(pool):
            pp = np.zeros(0)
        elif coupled:
            pp = global_p[pool] / global_p[pool].sum()
        else:
            pp = zipf_weights(len(pool), zipf_alpha, rng)
        pool_p.append(pp)
    if topic_alpha is None:
        topic_p = np.bincount(topic_of, minlength=n_topics) / n_chunks
    else:
        topic_p = zipf_weights(n_topics, topic_alpha, rng)
        topic_p[[len(p) == 0 for p in pools]] = 0.0
        topic_p /= topic_p.sum()
    query_topic = rng.choice(n_topics, size=n_queries, p=topic_p)
    requests = []
    for q in range(n_queries):
        pool, pp = pools[query_topic[q]], pool_p[query_topic[q]]
        n_local = min(len(pool), int(round(top_k * topic_share)))
        chosen = list(rng.choice(pool, size=n_local, replace=False, p=pp)) if n_local else []
        fill_top_k(chosen, top_k, lambda: rng.choice(n_chunks, size=2 * top_k, p=global_p))
        rng.shuffle(chosen)
        requests.append(Request([texts[c] for c in chosen], f"question {q} about topic {query_topic[q]}"))
    chunk_tokens = {texts[c]: int(lengths[c]) for c in range(n_chunks)}
    params = dict(
        n_queries=n_queries,
        top_k=top_k,
        n_chunks=n_chunks,
        n_topics=n_topics,
        zipf_alpha=zipf_alpha,
        topic_share=topic_share,
        tokens=(min_tokens, max_tokens),
        seed=seed,
    )
    if topic_alpha is not None or coupled:
        params.update(topic_alpha=topic_alpha, coupled=coupled)
    return Workload("rag", requests, chunk_tokens, params)


def workload_stats(wl: Workload, top_share: float = 0.03) -> dict:
    """What a workload actually contains, for the report and the calibration tests.

    * ``top_share_of_retrievals``: share of all block retrievals drawn by the
      most retrieved ``top_share`` of the corpus (RAGCache: 3% -> ~60%);
    * ``blocks_per_request`` (mean, min, max), ``block_tokens`` (mean, min, max);
    * ``repeat_within_request``: requests holding a block more than once;
    * ``repeat_across_turns``: share of a conversation turn's blocks already
      sent earlier in the same conversation (what deduplication can remove);
    * ``dedup_share``: 1 - unique block tokens / total block tokens.
    """
    count = wl.token_counter()
    retrievals: Counter = Counter()
    per_request = []
    repeats_within = 0
    seen_by_conv: dict[str, set] = {}
    repeated_blocks = 0
    conv_blocks = 0
    total_tokens = 0
    for r in wl.requests:
        retrievals.update(r.contexts)
        per_request.append(len(r.contexts))
        total_tokens += sum(count(t) for t in r.contexts)
        if len(set(r.contexts)) < len(r.contexts):
            repeats_within += 1
        if r.conversation is not None:
            seen = seen_by_conv.setdefault(r.conversation, set())
            conv_blocks += len(r.contexts)
            repeated_blocks += sum(1 for t in r.contexts if t in seen)
            seen.update(r.contexts)
    corpus = max(len(wl.chunk_tokens), len(retrievals))
    freq = np.sort(np.fromiter(retrievals.values(), dtype=np.int64))[::-1]
    top = max(1, int(round(top_share * corpus)))
    unique_tokens = sum(count(t) for t in retrievals)
    lengths = np.fromiter((count(t) for t in retrievals), dtype=np.int64) if retrievals else np.zeros(1, np.int64)
    return {
        "requests": len(wl.requests),
        "conversations": len(seen_by_conv),
        "corpus_blocks": corpus,
        "blocks_used": len(retrievals),
        "top_share_of_retrievals": float(freq[:top].sum() / max(1, freq.sum())),
        "blocks_per_request": [float(np.mean(per_request)), int(min(per_request)), int(max(per_request))]
        if per_request
        else [0.0, 0, 0],
        "block_tokens": [float(lengths.mean()), int(lengths.min()), int(lengths.max())],
        "total_block_tokens": int(total_tokens),
        "unique_block_tokens": int(unique_tokens),
        "dedup_share": 1.0 - unique_tokens / total_tokens if total_tokens else 0.0,
        "repeat_within_request": repeats_within,
        "repeat_across_turns": repeated_blocks / conv_blocks if conv_blocks else 0.0,
    }
