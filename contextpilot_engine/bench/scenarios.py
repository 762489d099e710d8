"""Workloads beyond the RAG batch: long-document QA, memory chat, agent sessions.

Each generator is seeded and deterministic, documents its knobs, and models
one published setting (NarrativeQA, LoCoMo/Mem0, agent tool loops):

* :func:`longdoc_qa` (NarrativeQA-like, closed domain): many questions per
  long document, each retrieving top-k of *that* document's chunks, so
  overlap is very high inside a document and zero across documents;
* :func:`memory_chat` (LoCoMo / Mem0-like): conversations of 20-35 sessions
  whose turns retrieve 20-100 short memories from a store that grows every
  session; consecutive turns retrieve almost the same memories in a slowly
  changing relevance order;
* :func:`agent_sessions` (OpenClaw-like): agent turns that resend tool
  specifications, re-read the same few documents and carry recent tool
  outputs forward, sometimes holding the same output twice; this is where
  deduplication pays.

Chat and agent workloads are *causal* (a turn depends on the previous
answer), so benchmarks keep their arrival order; conversations are
interleaved as if served concurrently.
"""

from __future__ import annotations

import numpy as np

from .workloads import Request, Workload, fill_top_k, zipf_weights

__all__ = ["longdoc_qa", "memory_chat", "agent_sessions"]


def _arrivals(n: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Poisson arrival times (seconds) at ``rate`` requests per second."""
    return np.cumsum(rng.exponential(1.0 / rate, size=n))


def _interleave(turns_per_conv: list[int], rng: np.random.Generator) -> list[tuple[int, int]]:
    """(conversation, turn) in a random interleaving that keeps each conversation's turn order.

    The next request comes from a conversation chosen in proportion to its
    remaining turns, which spreads every conversation over the whole trace.
    """
    remaining = np.asarray(turns_per_conv, dtype=np.float64)
    nxt = [0] * len(turns_per_conv)
    out = []
    for _ in range(int(remaining.sum())):
        c = int(rng.choice(len(remaining), p=remaining / remaining.sum()))
        out.append((c, nxt[c]))
        nxt[c] += 1
        remaining[c] -= 1
    return out


def longdoc_qa(
    n_documents: int = 30,
    questions_per_document: tuple[int, int] = (20, 40),
    chunks_per_document: tuple[int, int] = (50, 100),
    top_k: int = 10,
    local_share: float = 0.5,
    window: int = 3,
    zipf_alpha: float = 1.0,
    min_tokens: int = 700,
    max_tokens: int = 1300,
    rate: float = 4.0,
    seed: int = 0,
) -> Workload:
    """Closed-domain QA over long documents (NarrativeQA: ~30 questions per story).

    Each document is cut into ``chunks_per_document`` chunks (a 50-100k-token
    story at ~1k tokens per chunk).  A question is about one place in the
    story: its *focus* chunk is drawn from the document's Zipf popularity
    (some passages, like the opening or the climax, are asked about often);
    ``local_share`` of its top-k are the focus and its neighbours within
    ``window`` chunks, the rest come from the document's popularity.  The
    retrieved list is in a query-dependent relevance order (shuffled).
    Questions of all documents arrive interleaved (Poisson, ``rate`` per s).
    """
    rng = np.random.default_rng(seed)
    lo_q, hi_q = questions_per_document
    lo_c, hi_c = chunks_per_document
    if lo_c < top_k:
        raise ValueError(f"chunks_per_document must allow top_k={top_k} chunks per document")
    chunk_tokens: dict[str, int] = {}
    items = []  # (document, question text, chunks)
    for d in range(n_documents):
        n_chunks = int(rng.integers(lo_c, hi_c + 1))
        names = [f"document {d} chunk {c}" for c in range(n_chunks)]
        for name, t in zip(names, rng.integers(min_tokens, max_tokens + 1, size=n_chunks)):
            chunk_tokens[name] = int(t)
        pop = zipf_weights(n_chunks, zipf_alpha, rng)
        for q in range(int(rng.integers(lo_q, hi_q + 1))):
            focus = int(rng.choice(n_chunks, p=pop))
            near = [c for c in range(focus - window, focus + window + 1) if 0 <= c < n_chunks]
            n_local = min(len(near), max(1, int(round(top_k * local_share))))
            chosen = [focus] + [int(c) for c in rng.permutation([c for c in near if c != focus])[: n_local - 1]]
            fill_top_k(chosen, top_k, lambda: rng.choice(n_chunks, size=2 * top_k, p=pop).tolist())
            rng.shuffle(chosen)
            items.append((d, f"question {q} about document {d}", [names[c] for c in chosen]))
    order = rng.permutation(len(items))
    times = _arrivals(len(items), rate, rng)
    requests = [Request(items[i][2], items[i][1], None, float(t)) for i, t in zip(order.tolist(), times)]
    params = dict(
        n_documents=n_documents,
        questions_per_document=list(questions_per_document),
        chunks_per_document=list(chunks_per_document),
        top_k=top_k,
        local_share=local_share,
        window=window,
        zipf_alpha=zipf_alpha,
        tokens=[min_tokens, max_tokens],
        seed=seed,
    )
    return Workload("longdoc", requests, chunk_tokens, params)


def memory_chat(
    n_conversations: int = 8,
    sessions: tuple[int, int] = (20, 35),
    turns_per_session: tuple[int, int] = (3, 8),
    memories_per_session: tuple[int, int] = (5, 15),
    top_k: tuple[int, int] = (20, 100),
    turn_drift: float = 0.15,
    session_drift: float = 0.6,
    rank_noise: float = 0.05,
    recency_boost: float = 1.0,
    min_tokens: int = 15,
    max_tokens: int = 60,
    rate: float = 4.0,
    seed: int = 0,
) -> Workload:
    """Multi-session memory chat (LoCoMo via Mem0: up to 35 sessions, memory top-k 20-100).

    Every session adds ``memories_per_session`` short memories (``min_tokens``
    to ``max_tokens`` each, so a conversation holds ~10-25k tokens of memory).
    Each turn retrieves the ``k`` best-scoring memories in score order (``k``
    drawn once per conversation from ``top_k``, capped by the store), as a
    vector search would.  A memory's score is a lasting relevance (standard
    normal) plus a random walk that moves by ``turn_drift`` per turn and
    ``session_drift`` at a session boundary, plus ``recency_boost`` while it
    belongs to the current session, plus ``rank_noise`` of per-turn jitter.
    So the retrieved set drifts slowly (memories near the cut-off come and
    go; ~5-15% of a turn's memories are new to the previous turn) and
    neighbours in the ranking swap now and then.
    """
    rng = np.random.default_rng(seed)
    chunk_tokens: dict[str, int] = {}
    turns: list[list[tuple[list[str], str]]] = []
    for conv in range(n_conversations):
        names: list[str] = []
        base = np.zeros(0)
        walk = np.zeros(0)
        k = int(rng.integers(top_k[0], top_k[1] + 1))
        conv_turns = []
        for s in range(int(rng.integers(sessions[0], sessions[1] + 1))):
            n_new = int(rng.integers(memories_per_session[0], memories_per_session[1] + 1))
            for m in range(n_new):
                name = f"memory {m} of session {s} in conversation {conv}"
                chunk_tokens[name] = int(rng.integers(min_tokens, max_tokens + 1))
                names.append(name)
            base = np.concatenate([base, rng.normal(size=n_new)])
            walk = np.concatenate([walk, np.zeros(n_new)]) + rng.normal(scale=session_drift, size=len(names))
            recent = np.zeros(len(names))
            recent[-n_new:] = recency_boost
            for t in range(int(rng.integers(turns_per_session[0], turns_per_session[1] + 1))):
                if t:
                    walk += rng.normal(scale=turn_drift, size=len(names))
                score = base + walk + recent + rng.normal(scale=rank_noise, size=len(names))
                top = np.argsort(-score, kind="stable")[: min(k, len(names))]
                conv_turns.append(([names[i] for i in top.tolist()], f"turn {t} of session {s} in conversation {conv}"))
        turns.append(conv_turns)
    schedule = _interleave([len(t) for t in turns], rng)
    times = _arrivals(len(schedule), rate, rng)
    requests = [
        Request(list(turns[c][t][0]), turns[c][t][1], f"conversation-{c}", float(ts))
        for (c, t), ts in zip(schedule, times)
    ]
    params = dict(
        n_conversations=n_conversations,
        sessions=list(sessions),
        turns_per_session=list(turns_per_session),
        memories_per_session=list(memories_per_session),
        top_k=list(top_k),
        turn_drift=turn_drift,
        session_drift=session_drift,
        rank_noise=rank_noise,
        recency_boost=recency_boost,
        tokens=[min_tokens, max_tokens],
        seed=seed,
    )
    return Workload("memory", requests, chunk_tokens, params, causal=True)


def agent_sessions(
    n_sessions: int = 30,
    turns: tuple[int, int] = (10, 30),
    n_tool_specs: int = 3,
    n_documents: int = 22,
    working_set: tuple[int, int] = (2, 5),
    read_probability: float = 0.5,
    history: int = 3,
    repeat_probability: float = 0.15,
    spec_tokens: tuple[int, int] = (300, 800),
    document_tokens: tuple[int, int] = (400, 2000),
    output_tokens: tuple[int, int] = (100, 1500),
    doc_alpha: float = 1.0,
    rate: float = 4.0,
    seed: int = 0,
) -> Workload:
    """Agent sessions (OpenClaw: 60 tasks over 22 shared documents) that repeat content.

    Every turn's context, in the order an agent framework sends it:

    1. the ``n_tool_specs`` tool specifications, identical in every session;
    2. the documents read in the last ``history`` turns (a session works on
       ``working_set`` documents drawn by Zipf popularity from a shared
       corpus of ``n_documents``, and reads one with ``read_probability``
       per turn, often one it read before);
    3. the tool outputs of the last ``history`` turns (each output is resent
       for ``history`` turns);
    4. this turn's new tool output; with ``repeat_probability`` it is
       identical to an earlier output of the session (a re-run command), so
       the context holds that block twice.
    """
    rng = np.random.default_rng(seed)
    chunk_tokens: dict[str, int] = {}
    specs = [f"tool specification {i}" for i in range(n_tool_specs)]
    for s in specs:
        chunk_tokens[s] = int(rng.integers(spec_tokens[0], spec_tokens[1] + 1))
    docs = [f"shared document {i}" for i in range(n_documents)]
    for d in docs:
        chunk_tokens[d] = int(rng.integers(document_tokens[0], document_tokens[1] + 1))
    doc_p = zipf_weights(n_documents, doc_alpha, rng)
    sessions_turns = []
    for sid in range(n_sessions):
        ws_size = min(n_documents, int(rng.integers(working_set[0], working_set[1] + 1)))
        ws = [docs[i] for i in rng.choice(n_documents, size=ws_size, replace=False, p=doc_p).tolist()]
        reads: list[str | None] = []
        outputs: list[str] = []
        conv_turns = []
        for t in range(int(rng.integers(turns[0], turns[1] + 1))):
            reads.append(ws[int(rng.integers(len(ws)))] if rng.random() < read_probability else None)
            if outputs and rng.random() < repeat_probability:
                new = outputs[int(rng.integers(len(outputs)))]
            else:
                new = f"tool output {t} of session {sid}"
                chunk_tokens[new] = int(rng.integers(output_tokens[0], output_tokens[1] + 1))
            recent_docs = []
            for d in reads[-history:]:
                if d is not None and d not in recent_docs:
                    recent_docs.append(d)
            context = specs + recent_docs + outputs[-history:] + [new]
            outputs.append(new)
            conv_turns.append((context, f"step {t} of session {sid}"))
        sessions_turns.append(conv_turns)
    schedule = _interleave([len(t) for t in sessions_turns], rng)
    times = _arrivals(len(schedule), rate, rng)
    requests = [
        Request(list(sessions_turns[c][t][0]), sessions_turns[c][t][1], f"session-{c}", float(ts))
        for (c, t), ts in zip(schedule, times)
    ]
    params = dict(
        n_sessions=n_sessions,
        turns=list(turns),
        n_tool_specs=n_tool_specs,
        n_documents=n_documents,
        working_set=list(working_set),
        read_probability=read_probability,
        history=history,
        repeat_probability=repeat_probability,
        seed=seed,
    )
    return Workload("agent", requests, chunk_tokens, params, causal=True)
