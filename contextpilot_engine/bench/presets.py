"""The workloads the suite runs, at full and smoke sizes, and their engine-replay variants.

Full sizes follow the published settings (MultiHop-RAG top-20 retrieval, NarrativeQA,
LoCoMo, agent sessions) and
keep the reference's O(n^2) build within minutes; smoke sizes keep the CI
run in seconds.  Engine variants are small, materialised versions (shorter
chunks, fewer requests) so that every method can be replayed through vLLM
on a 2-core CPU in minutes.
"""

from __future__ import annotations

from typing import Callable

from .scenarios import agent_sessions, longdoc_qa, memory_chat
from .workloads import Workload, materialise, rag_batch

__all__ = ["WORKLOADS", "build", "build_engine_variant", "RAG_CALIBRATION"]

#: popularity knobs that give RAGCache's "3% of chunks draw ~60% of retrievals" (see rag_batch)
RAG_CALIBRATION = dict(zipf_alpha=1.25, topic_alpha=1.0, topic_share=0.3, coupled=True)


def _rag(n: int, k: int, **kw) -> Callable[[int], Workload]:
    def make(seed: int) -> Workload:
        wl = rag_batch(n_queries=n, top_k=k, seed=seed, **{**RAG_CALIBRATION, **kw})
        wl.name = f"rag-top{k}" if kw.get("coupled", True) else "rag-flat"
        return wl

    return make


def _named(name: str, fn: Callable[..., Workload], **kw) -> Callable[[int], Workload]:
    def make(seed: int) -> Workload:
        wl = fn(seed=seed, **kw)
        wl.name = name
        return wl

    return make


#: name -> (full, smoke, engine) builders, each ``seed -> Workload``
WORKLOADS: dict[str, tuple[Callable[[int], Workload], Callable[[int], Workload], Callable[[int], Workload]]] = {
    "rag-top20": (
        _rag(1000, 20),
        _rag(120, 20, n_chunks=400, n_topics=20),
        _rag(150, 8, n_chunks=300, n_topics=15, min_tokens=60, max_tokens=240),
    ),
    "rag-top10": (
        _rag(2000, 10),
        _rag(150, 10, n_chunks=400, n_topics=20),
        _rag(150, 10, n_chunks=300, n_topics=15, min_tokens=60, max_tokens=200),
    ),
    # low skew (MS MARCO-like: little overlap) with the legacy generator: the reference's online
    # index grows a wide root here and crashes (notes: a tree level of 1,000+ children)
    "rag-flat": (
        _rag(2000, 20, zipf_alpha=0.8, topic_share=0.3, topic_alpha=None, coupled=False),
        _rag(150, 20, n_chunks=600, n_topics=30, zipf_alpha=0.8, topic_share=0.3, topic_alpha=None, coupled=False),
        _rag(150, 8, n_chunks=500, n_topics=25, min_tokens=60, max_tokens=240, zipf_alpha=0.8, topic_share=0.3,
             topic_alpha=None, coupled=False),
    ),
    "longdoc": (
        _named("longdoc", longdoc_qa),
        _named("longdoc", longdoc_qa, n_documents=4, questions_per_document=(10, 15), chunks_per_document=(20, 30)),
        _named(
            "longdoc",
            longdoc_qa,
            n_documents=5,
            questions_per_document=(20, 30),
            chunks_per_document=(25, 40),
            top_k=6,
            min_tokens=100,
            max_tokens=300,
        ),
    ),
    "memory": (
        _named("memory", memory_chat),
        _named("memory", memory_chat, n_conversations=2, sessions=(5, 6), turns_per_session=(2, 3), top_k=(20, 40)),
        _named(
            "memory",
            memory_chat,
            n_conversations=2,
            sessions=(10, 12),
            turns_per_session=(2, 4),
            memories_per_session=(5, 10),
            top_k=(20, 40),
        ),
    ),
    "agent": (
        _named("agent", agent_sessions),
        _named("agent", agent_sessions, n_sessions=5, turns=(5, 8)),
        _named(
            "agent",
            agent_sessions,
            n_sessions=6,
            turns=(8, 12),
            spec_tokens=(100, 300),
            document_tokens=(150, 500),
            output_tokens=(50, 400),
        ),
    ),
}


def build(name: str, smoke: bool, seed: int) -> Workload:
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose from {sorted(WORKLOADS)}")
    full, small, _ = WORKLOADS[name]
    return (small if smoke else full)(seed)


def build_engine_variant(name: str, seed: int, smoke: bool = False) -> Workload:
    """The materialised engine-replay workload (a 16-request slice of it in smoke mode).

    The local tiny model's tokenizer (a BPE trained on Python sources)
    spends about 3.3 tokens on each filler word, so 0.3 words per nominal
    token keeps real prompt lengths close to the nominal ones (and below the
    model's 4,096 positions).
    """
    wl = WORKLOADS[name][2](seed)
    if smoke:
        wl.requests = wl.requests[:16]
    return materialise(wl, words_per_token=0.3, seed=seed)
