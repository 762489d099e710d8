"""Seeded synthetic workloads calibrated to published statistics.

Chunks are identified by short synthetic texts (``"chunk 17 of topic 3"``) and
carry a token length drawn from the documented range; a workload's
:meth:`Workload.token_counter` returns those lengths, so benchmarks weigh
blocks exactly as a real tokenizer would weigh chunks of that size, without
materialising gigabytes of filler text.  :meth:`Workload.materialise` turns a
chunk into real text of about its token length when an engine must see it.

Statistics (see ``shared/notes/anchors.md``): retrieval popularity is Zipf
(alpha about 1 gives RAGCache's "3% of chunks draw 60% of retrievals"), queries
have topic locality, relevance order is query dependent, top-k is 10 to 20,
chunks are 200 to 1,300 tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

__all__ = ["Request", "Workload", "rag_batch", "zipf_weights", "materialise"]

#: words for materialised chunk text (any text works: the model's weights are random)
_WORDS = (
    "river market signal cedar orbit lantern quartz meadow harbor tundra falcon ember canyon "
    "mosaic velvet glacier prism thunder willow summit copper nectar pebble saffron beacon "
    "compass drift fable garnet hollow ivory jasper kettle lagoon marble nimbus oasis pioneer "
    "quiver ripple sable timber umber vortex whisper yonder zephyr anchor bramble cobalt"
).split()


@dataclass
class Request:
    contexts: list[str]
    query: str
    conversation: str | None = None


@dataclass
class Workload:
    name: str
    requests: list[Request]
    chunk_tokens: dict[str, int]
    params: dict = field(default_factory=dict)

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
    requests = [Request([mapping[c] for c in r.contexts], r.query, r.conversation) for r in wl.requests]
    return Workload(wl.name + "-text", requests, lengths, dict(wl.params, materialised=True))


def zipf_weights(n: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """Zipf probabilities over ``n`` items, assigned to items in a random order."""
    ranks = np.arange(1, n + 1, dtype=np.float64)
    p = ranks ** (-alpha)
    p /= p.sum()
    return p[rng.permutation(n)]


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
) -> Workload:
    """Multi-hop RAG batch: each query retrieves ``top_k`` distinct chunks.

    ``topic_share`` of each query's chunks come from its topic's pool (Zipf
    inside the topic), the rest from the global Zipf popularity; the list is
    then shuffled, because retrieval relevance order differs per query.
    """
    rng = np.random.default_rng(seed)
    n_chunks = n_chunks or max(2000, n_queries // 2)
    n_topics = n_topics or max(10, n_chunks // 20)
    if top_k > n_chunks:
        raise ValueError("top_k cannot exceed n_chunks")
    lengths = rng.integers(min_tokens, max_tokens + 1, size=n_chunks)
    topic_of = rng.integers(0, n_topics, size=n_chunks)
    texts = [f"chunk {c} (topic {topic_of[c]})" for c in range(n_chunks)]
    global_p = zipf_weights(n_chunks, zipf_alpha, rng)
    pools = [np.flatnonzero(topic_of == t) for t in range(n_topics)]
    pool_p = []
    for pool in pools:
        if len(pool):
            pp = zipf_weights(len(pool), zipf_alpha, rng)
        else:
            pp = np.zeros(0)
        pool_p.append(pp)
    query_topic = rng.choice(n_topics, size=n_queries, p=np.bincount(topic_of, minlength=n_topics) / n_chunks)
    requests = []
    for q in range(n_queries):
        pool, pp = pools[query_topic[q]], pool_p[query_topic[q]]
        n_local = min(len(pool), int(round(top_k * topic_share)))
        chosen = list(rng.choice(pool, size=n_local, replace=False, p=pp)) if n_local else []
        taken = set(chosen)
        while len(chosen) < top_k:
            extra = rng.choice(n_chunks, size=2 * top_k, p=global_p)
            for c in extra:
                if c not in taken:
                    taken.add(c)
                    chosen.append(c)
                    if len(chosen) == top_k:
                        break
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
    return Workload("rag", requests, chunk_tokens, params)
