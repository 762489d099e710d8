"""The workloads the suite runs, at full and smoke sizes, and their engine-replay variants.

Synthetic workloads: full sizes follow the published settings (MultiHop-RAG
top-20 retrieval, NarrativeQA, LoCoMo, agent sessions) and keep the
reference's O(n^2) build within minutes; smoke sizes keep the CI run in
seconds.  Engine variants are small, materialised versions (shorter
chunks, fewer requests) so that every method can be replayed through vLLM
on a 2-core CPU in minutes.

Real-corpus workloads (:data:`REAL_WORKLOADS`, from :mod:`.real_traces`)
check the synthetic calibration against what real retrievers do with a
real manual.  One trace set holds all of them, so they are built (or read
from the disk cache) together, once per process; a machine without their
packages or without the manual's ``.deb`` runs the synthetic workloads
alone, and :func:`real_unavailable` says why.
"""

from __future__ import annotations

import shutil
from functools import lru_cache
from typing import Callable

from .real_traces import WORKLOAD_SPECS
from .scenarios import agent_sessions, longdoc_qa, memory_chat
from .workloads import Workload, materialise, rag_batch

__all__ = [
    "WORKLOADS",
    "REAL_WORKLOADS",
    "build",
    "build_engine_variant",
    "real_unavailable",
    "RAG_CALIBRATION",
]

#: the real-corpus workloads, in :data:`.real_traces.WORKLOAD_SPECS` order
REAL_WORKLOADS: tuple[str, ...] = tuple(name for name, *_ in WORKLOAD_SPECS)

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


def real_unavailable() -> str | None:
    """Why the real-corpus workloads cannot be built here, or None when they can."""
    from . import corpus, real_traces

    missing = real_traces.missing_packages()
    if missing:
        return f"packages missing: {', '.join(missing)} (they are in requirements/engine.lock)"
    have_deb = any((corpus.corpus_dir() / "deb").glob(f"{corpus.CORPUS_PACKAGE}_*.deb"))
    if not have_deb and shutil.which("apt-get") is None:
        return f"no apt-get to fetch {corpus.CORPUS_PACKAGE} and no .deb in {corpus.corpus_dir() / 'deb'}"
    return None


@lru_cache(maxsize=2)
def _real(smoke: bool, seed: int) -> dict[str, Workload]:
    from .real_traces import real_workloads

    return {wl.name: wl for wl in real_workloads(smoke, seed)}


def build(name: str, smoke: bool, seed: int) -> Workload:
    """A synthetic workload built from ``seed``, or a real-corpus one from the trace set of ``seed``."""
    if name in REAL_WORKLOADS:
        return _real(smoke, seed)[name]
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose from {sorted(WORKLOADS) + list(REAL_WORKLOADS)}")
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
