"""Real-corpus traces: the manual's chunks, real retrievers, generated queries and the manifest cache.

The first group needs only numpy (parser, chunker, rank fusion and query
drawing on small made-up inputs).  The second builds the smoke traces
(``real_workloads(smoke=True)``): the PostgreSQL manual's ``.deb`` from
Debian, the DeepSeek tokenizer, BM25 and MiniLM from requirements/corpus.txt;
it skips with the reason where those are missing, and fails instead under
CONTEXTPILOT_REQUIRE_ENGINE=1.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from contextpilot_engine.bench import corpus as corpus_mod
from contextpilot_engine.bench import real_traces
from contextpilot_engine.bench.corpus import MAX_TOKENS, MIN_TOKENS, Section, Tokenizer, chunk_sections
from contextpilot_engine.bench.retrieval import rrf_fuse, top_k

# ---------------------------------------------------------------------------
# Pure logic on made-up inputs


def _word_tokenizer() -> Tokenizer:
    """One token per whitespace-separated word: makes chunk sizes easy to reason about."""

    def count(text: str) -> int:
        return len(text.split())

    def encode_batch(texts):
        return [list(range(len(t.split()))) for t in texts]

    return Tokenizer(count, encode_batch, Path("words"), "0" * 64, "words")


def _words(n: int, tag: str) -> str:
    return " ".join(f"{tag}{i}" for i in range(n))


def test_chunks_follow_sections_and_stay_in_range():
    tok = _word_tokenizer()
    sections = [
        Section("a.html", "A", "Long section", 2, [_words(400, f"p{i}x") for i in range(8)]),  # 3,200 words
        Section("a.html", "B", "Tiny one", 2, [_words(20, "t")]),
        Section("a.html", "C", "Medium", 2, [_words(300, "m")]),
        Section("b.html", "D", "Alone and tiny", 2, [_words(10, "z")]),
        Section("c.html", "E", "Other page", 2, [_words(500, "o")]),
    ]
    docs = ["d1", "d1", "d1", "d2", "d3"]
    chunks, dropped = chunk_sections(sections, docs, tok)
    assert all(MIN_TOKENS <= c.tokens <= MAX_TOKENS for c in chunks)
    assert all(c.tokens == tok.count(c.text) for c in chunks)
    long_parts = [c for c in chunks if c.sections == [0]]
    assert len(long_parts) == 3, "3,200 words split into three even pieces, not two full ones and a runt"
    assert max(c.tokens for c in long_parts) - min(c.tokens for c in long_parts) <= 420
    assert any(c.sections == [1, 2] for c in chunks), "the tiny section is merged into the next one of its page"
    assert dropped == 1 and not any(3 in c.sections for c in chunks), "a tiny document alone is dropped"
    assert all(c.text.startswith(sections[c.sections[0]].heading) for c in chunks)
    assert len({c.text for c in chunks}) == len(chunks)


def test_a_unit_longer_than_a_chunk_is_cut_at_lines_then_words():
    tok = _word_tokenizer()
    code = "\n".join(_words(30, f"l{i}x") for i in range(100))  # one 3,000-word pre block
    prose = _words(2000, "w")  # one 2,000-word paragraph
    chunks, _ = chunk_sections([Section("p.html", "", "Code", 2, [code, prose])], ["d"], tok)
    assert all(c.tokens <= MAX_TOKENS for c in chunks)
    assert sum(c.tokens for c in chunks) >= 5000


def test_parser_skips_navigation_and_keeps_labels_inline():
    page = (
        '<html><body><div class="navheader"><table><tr><td><a accesskey="n" href="x.html">Next</a>'
        '</td></tr></table><hr /></div><div class="sect1" id="S1"><div class="titlepage"><h2 class="title">'
        '9.4. String Functions</h2></div><div class="toc"><p>table of contents</p></div>'
        '<p>Use <code class="function">concat()</code> to join   strings.</p>'
        '<div class="note"><h3 class="title">Note</h3><p>Mind the nulls.</p></div>'
        '<pre class="programlisting">SELECT 1;\n  SELECT 2;</pre>'
        '<dl><dt><code class="varname">work_mem</code> (integer)</dt><dd><p>Memory.</p></dd></dl>'
        '<div class="sect2" id="S2"><h3 class="title">9.4.1. format</h3><p>Formats.</p></div>'
        '</div><div class="navfooter"><p>footer</p></div></body></html>'
    )
    parser = corpus_mod._SectionParser("p.html")
    parser.feed(page)
    parser.close()
    secs = [s for s in parser.sections if s.units]
    assert [s.heading for s in secs] == ["9.4. String Functions", "9.4.1. format"]
    first = secs[0]
    assert first.anchor == "S1" and secs[1].anchor == "S2"
    assert first.units[0] == "Use concat() to join strings."
    assert "Note" in first.units and "SELECT 1;\n  SELECT 2;" in first.units
    assert not any("contents" in u or "footer" in u or "Next" in u for s in secs for u in s.units)
    assert first.terms == {"function": ["concat"], "setting": ["work_mem"]}


def test_top_k_is_distinct_and_breaks_ties_by_index():
    scores = np.array([[1.0, 3.0, 3.0, 0.0, 2.0]])
    assert top_k(scores, 3) == [[1, 2, 4]]
    assert top_k(np.zeros((2, 4)), 4) == [[0, 1, 2, 3]] * 2
    with pytest.raises(ValueError):
        top_k(scores, 6)


def test_rank_fusion_rewards_agreement():
    lexical = np.array([[5.0, 4.0, 0.0, 1.0]])
    dense = np.array([[0.1, 0.9, 0.8, 0.0]])
    fused = rrf_fuse([lexical, dense], depth=4, rrf_k=60)
    assert top_k(fused, 2) == [[1, 0]]  # chunk 1 is 2nd and 1st; chunk 0 is 1st and 4th
    assert fused[0, 1] == pytest.approx(1 / 62 + 1 / 61)


def test_query_draws_are_distinct_and_zipf_skewed():
    rng = np.random.default_rng(3)
    topics = [
        real_traces.Topic(f"t{i}", f"d{i % 5}", [f"name{i}a", f"name{i}b"], [f"q{i} {j}" for j in range(10)])
        for i in range(200)
    ]
    drawn = real_traces._draw_queries(topics, real_traces._partners(topics), 1500, rng, 1.0, 0.15, set())
    queries = [q for _, q in drawn]
    assert len(set(map(real_traces._normal, queries))) == len(queries) == 1500
    counts = np.sort(np.bincount([t for t, _ in drawn], minlength=200))[::-1]
    assert counts[:20].sum() > 0.4 * counts.sum(), "the top 10% of topics get most of the queries"
    assert counts[0] >= 10 * max(1, np.median(counts))


# ---------------------------------------------------------------------------
# The smoke traces from the real manual


def _require_corpus() -> None:
    from conftest import _skip

    missing = real_traces.missing_packages()
    if missing:
        _skip(f"real-corpus packages missing: {', '.join(missing)} (pip install -r requirements/corpus.txt)")
    have_deb = any((corpus_mod.corpus_dir() / "deb").glob(f"{corpus_mod.CORPUS_PACKAGE}_*.deb"))
    if not have_deb and shutil.which("apt-get") is None:
        _skip(f"no apt-get to fetch {corpus_mod.CORPUS_PACKAGE} and no .deb in the cache")


@pytest.fixture(scope="module")
def smoke():
    _require_corpus()
    return real_traces.build_trace_set(smoke=True, seed=0)


@pytest.fixture(scope="module")
def smoke_workloads(smoke):
    return {wl.name: wl for wl in smoke.workloads()}


def test_smoke_traces_have_the_named_workloads(smoke, smoke_workloads):
    assert list(smoke_workloads) == [name for name, *_ in real_traces.WORKLOAD_SPECS]
    kinds = {(d, r, k) for _, d, r, k in real_traces.WORKLOAD_SPECS}
    assert {r for _, r, _ in kinds} == {"bm25", "dense", "hybrid"}
    assert {k for _, _, k in kinds} == {10, 20} and {d for d, _, _ in kinds} == {"open", "closed"}
    for wl in smoke_workloads.values():
        assert len(wl.requests) >= 90
        assert not wl.causal and all(r.conversation is None for r in wl.requests)
        times = [r.timestamp for r in wl.requests]
        assert times == sorted(times)


def test_chunks_are_within_the_token_range_and_counted_by_the_real_tokenizer(smoke, smoke_workloads):
    sizes = [c["tokens"] for c in smoke.chunks]
    assert all(MIN_TOKENS <= n <= MAX_TOKENS for n in sizes)
    assert smoke.manifest["corpus"]["dropped"] < 0.05 * smoke.manifest["corpus"]["chunks"]
    count = corpus_mod.load_tokenizer().count
    wl = smoke_workloads["real-open-hybrid-k10"]
    assert len(wl.chunk_tokens) == len(smoke.chunks)
    for text in list(wl.chunk_tokens)[::25]:
        assert wl.chunk_tokens[text] == count(text)


def test_every_request_retrieves_k_distinct_chunks(smoke_workloads):
    for name, _, _, k in real_traces.WORKLOAD_SPECS:
        for r in smoke_workloads[name].requests:
            assert len(r.contexts) == k and len(set(r.contexts)) == k
            assert all(c in smoke_workloads[name].chunk_tokens for c in r.contexts)


def test_contexts_are_the_retrievers_ranking(smoke, smoke_workloads):
    from contextpilot_engine.bench.retrieval import BM25Retriever

    texts = [c["text"] for c in smoke.chunks]
    wl = smoke_workloads["real-open-bm25-k10"]
    sample = wl.requests[::15]
    ranked = BM25Retriever(texts).search([r.query for r in sample], 10)
    assert [[texts[i] for i in row] for row in ranked] == [r.contexts for r in sample]


def test_no_query_is_asked_twice(smoke):
    for name, rows in smoke.rows.items():
        queries = [real_traces._normal(r["query"]) for r in rows]
        assert len(set(queries)) == len(queries), name


def test_topic_popularity_is_skewed(smoke):
    counts = np.sort(np.array(list(Counter(r["topic"] for r in smoke.rows["real-open-hybrid-k10"]).values())))[::-1]
    top = max(1, len(counts) // 10)
    assert counts[:top].sum() > 0.3 * counts.sum()
    assert counts[0] >= 5 * np.median(counts)


def test_closed_domain_requests_stay_inside_their_document(smoke):
    doc_of = [c["document"] for c in smoke.chunks]
    for name, domain, _, _ in real_traces.WORKLOAD_SPECS:
        if domain != "closed":
            continue
        rows = smoke.rows[name]
        docs = smoke.manifest["workloads"][name]["documents"]
        assert len(docs) == 3
        per_doc = Counter(r["document"] for r in rows)
        assert set(per_doc) == set(docs) and min(per_doc.values()) >= 30
        for r in rows:
            assert {doc_of[i] for i in r["chunks"]} == {r["document"]}
        switches = sum(a["document"] != b["document"] for a, b in zip(rows, rows[1:]))
        assert switches > len(rows) / 3, "documents' questions arrive interleaved"


def test_a_cache_hit_reads_the_same_bytes_without_embedding(smoke, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a cache hit must not embed or chunk")

    monkeypatch.setattr(real_traces.DenseEncoder, "encode", refuse)
    monkeypatch.setattr(real_traces, "build_chunks", refuse)
    again = real_traces.build_trace_set(smoke=True, seed=0)
    assert again.from_cache and again.path == smoke.path
    assert again.manifest == smoke.manifest and again.rows == smoke.rows and again.chunks == smoke.chunks
    for name, sha in again.manifest["outputs"].items():
        assert hashlib.sha256((again.path / name).read_bytes()).hexdigest() == sha


def test_rebuilding_from_cached_chunks_and_embeddings_is_byte_identical(smoke, tmp_path, monkeypatch):
    """A fresh trace build (as after a lost trace directory or a corrupted file) reproduces every output."""
    src = corpus_mod.corpus_dir()
    dst = tmp_path / "corpus"
    dst.mkdir()
    for sub in ("deb", "chunks", "embeddings"):
        os.symlink(src / sub, dst / sub)
    monkeypatch.setenv("CONTEXTPILOT_CACHE", str(tmp_path))
    calls = []
    original = real_traces.DenseEncoder.encode
    monkeypatch.setattr(real_traces.DenseEncoder, "encode", lambda self, texts: calls.append(len(texts))
                        or original(self, texts))
    fresh = real_traces.build_trace_set(smoke=True, seed=0)
    assert not fresh.from_cache
    assert fresh.manifest["outputs"] == smoke.manifest["outputs"]
    assert max(calls) < len(smoke.chunks), "only queries are embedded; chunk embeddings come from the cache"

    victim = fresh.path / "real-closed-bm25-k20.jsonl"
    victim.write_text(victim.read_text().replace('"query":"', '"query":"X', 1))
    repaired = real_traces.build_trace_set(smoke=True, seed=0)
    assert not repaired.from_cache, "an output that fails its hash is rebuilt"
    assert hashlib.sha256(victim.read_bytes()).hexdigest() == smoke.manifest["outputs"][victim.name]


def test_another_seed_asks_other_questions(smoke):
    other = real_traces.build_trace_set(smoke=True, seed=1)
    assert other.path != smoke.path
    assert other.manifest["inputs"]["embedder"] == smoke.manifest["inputs"]["embedder"]
    a = {r["query"] for r in smoke.rows["real-open-bm25-k10"]}
    b = {r["query"] for r in other.rows["real-open-bm25-k10"]}
    assert len(a & b) < 0.5 * len(a)
