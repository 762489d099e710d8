"""The served prompt's tokens, as the backend engine will see them, for binding a prompt to its pages.

Binding a rewritten prompt to the engine's pages needs its token ids
exactly as the engine computes them: the engine's chat template applied to
the messages, then its tokenizer.  Two ways, chosen once at start:

* :class:`LocalTemplate`: the backend model's own tokenizer and chat
  template, loaded from a local path (``--model-path``, or the path the
  backend reports it loaded the model from, when it exists here).  It costs
  no round trip.  vLLM renders a chat as ``apply_chat_template(messages,
  add_generation_prompt=True)`` tokenized without added special tokens;
  :func:`verify` checks at start, on a sample in the proxy's own layout,
  that this gives the backend's own ``/tokenize`` answer token for token.
* :class:`BackendTokenize`: the backend's ``POST /tokenize`` with the
  messages (vLLM), one round trip per request.  The text is rebuilt from
  the token strings of a byte-level BPE vocabulary, so offsets are exact.
  Used when no local tokenizer is available, or when the local one did not
  pass :func:`verify`.

The local path tokenizes a prompt line by line, each distinct line once
(:class:`LineTokenCache`), since the same lines recur across requests.

A request whose rendering the local template might not reproduce (tools, a
chat template or its arguments of its own, message parts that are not
plain text) is rendered by the backend when it can, and otherwise left
unbound (its report says ``bound: false``; it is still rewritten).
"""

from __future__ import annotations

import logging
import os
import re
from abc import ABC, abstractmethod
from bisect import bisect_right
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

from contextpilot_engine.integration.binding import _byte_alphabet

from .backend import Backend

__all__ = ["BackendTokenize", "LocalTemplate", "PromptRenderer", "RenderedPrompt", "load_tokenizer",
           "template_fields", "verify"]

log = logging.getLogger("contextpilot.proxy")

#: request fields that change how the engine renders a chat; the local template renders only their defaults
TEMPLATE_FIELDS = ("add_generation_prompt", "continue_final_message", "chat_template", "chat_template_kwargs",
                   "tools", "documents", "add_special_tokens", "mm_processor_kwargs")
_DEFAULTS = {"add_generation_prompt": True, "continue_final_message": False, "add_special_tokens": False}


@dataclass(frozen=True)
class RenderedPrompt:
    text: str
    token_ids: list[int]
    #: per-token (start, end) character offsets into ``text`` (None: not computed)
    offsets: list[tuple[int, int]] | None


def template_fields(body: dict) -> dict:
    """The body's fields that change the rendering, when they differ from the defaults."""
    return {k: body[k] for k in TEMPLATE_FIELDS if k in body and body[k] is not None and body[k] != _DEFAULTS.get(k)}


def _plain(messages: Sequence[Any]) -> bool:
    return all(isinstance(m, dict) and isinstance(m.get("content"), str) and set(m) <= {"role", "content", "name"}
               for m in messages)


class PromptRenderer(ABC):
    """Renders chat messages to the tokens the backend will run."""

    name: str = ""
    #: renders without a round trip (may run on the event loop)
    local: bool = False

    @abstractmethod
    def can_render(self, messages: Sequence[Any], body: dict) -> bool:
        """Whether :meth:`render` reproduces the backend's rendering for this request."""

    @abstractmethod
    async def render(self, messages: Sequence[Any], body: dict, want_offsets: bool) -> RenderedPrompt | None:
        """The prompt's text and tokens (None: could not be rendered)."""


#: where a prompt may be cut for tokenizing its pieces apart: after a single line break between two
#: non-space characters, and between a block label's "]" and the space after it (byte-level BPE
#: pre-tokenizers split there anyway; a piece ending in a run of blanks would not tokenize alike;
#: LineTokenCache checks it on the first prompts).  The pattern finds the candidate characters and
#: :func:`_pieces` checks the one before a line break: a lookbehind would be tried at every position
#: of the prompt, which made splitting cost most of a cached prompt's tokenizing.
_CUT = re.compile(r"\n(?=\S)|\](?= \S)")


def _pieces(text: str) -> list[str]:
    """``text`` cut after each line break between two non-space characters and after each ``"] x"``'s ``]``."""
    out = []
    start = 0
    for m in _CUT.finditer(text):
        at = m.start()
        if text[at] == "\n" and (at == 0 or text[at - 1].isspace()):  # \s and str.isspace agree
            continue
        out.append(text[start:at + 1])
        start = at + 1
    out.append(text[start:])
    return out


class LineTokenCache:
    """Token ids of a prompt from the ids of its pieces, each piece tokenized once (bounded LRU).

    Prompts of one workload repeat the same pieces (the template's markers,
    the instruction, each document's text after its label); tokenizing a
    3k-token prompt whole costs more than the rest of the request path.  A
    prompt cut at line starts and after block labels tokenizes to the
    concatenation of its pieces' tokens for byte-level BPE vocabularies,
    whose pre-tokenizers split there anyway.
    That is checked, not assumed: the first :attr:`CHECKS` prompts are also
    tokenized whole, and one difference turns the cache off for good.  The
    check runs on a thread of its own (the Rust tokenizer releases the GIL
    while it works), so the first prompts cost the event loop what every
    later one does; the few prompts served before a failed check are bound
    with the cache's ids.  Only the binding to the engine's pages reads
    them: what is sent to the engine is the text.
    """

    CHECKS = 16
    #: approximate resident bytes of one cached token id (its slot in the list and, past the small
    #: integers Python shares, its int object) and of one entry's own overhead
    TOKEN_BYTES = 36
    ENTRY_BYTES = 200

    def __init__(self, tokenizer: Any, max_entries: int = 20_000, max_bytes: int = 32 << 20):
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._encode_batch = None
        if backend is not None:
            self._encode_batch = getattr(backend, "encode_batch_fast", None) or backend.encode_batch
        self._tokenizer = tokenizer
        self.max_entries = max_entries
        #: the cache's size bound in bytes: a piece can be a whole one-line document, so a count of
        #: entries alone bounds nothing; a piece past a sixty-fourth of it is never kept
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._ids: OrderedDict[str, list[int]] = OrderedDict()
        self.enabled = self._encode_batch is not None
        self.checked = 0
        self._checker: ThreadPoolExecutor | None = None
        #: the checks submitted (a test waits on them)
        self.checks: list[Future] = []

    def whole(self, text: str) -> list[int]:
        """``text`` tokenized in one piece (the Rust tokenizer directly, when there is one: the same ids
        as the Hugging Face wrapper's call, without its per-call Python work)."""
        if self._encode_batch is not None:
            return list(self._encode_batch([text], add_special_tokens=False)[0].ids)
        return list(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode(self, text: str) -> list[int]:
        if not self.enabled:
            return self.whole(text)
        lines = _pieces(text)
        cache = self._ids
        missing = [line for line in dict.fromkeys(lines) if line not in cache]
        fresh: dict[str, list[int]] = {}
        if missing:
            assert self._encode_batch is not None
            largest = self.max_bytes // 64
            for line, enc in zip(missing, self._encode_batch(missing, add_special_tokens=False)):
                ids = fresh[line] = list(enc.ids)
                size = self._size(line, ids)
                if size <= largest:
                    cache[line] = ids
                    self.nbytes += size
        out: list[int] = []
        for line in lines:  # nothing is dropped before the loop ends: each line is cached, or fresh
            ids = cache.get(line)
            if ids is not None:
                cache.move_to_end(line)
            else:  # too large to keep
                ids = fresh[line]
            out.extend(ids)
        while cache and (len(cache) > self.max_entries or self.nbytes > self.max_bytes):
            line, ids = cache.popitem(last=False)
            self.nbytes -= self._size(line, ids)
        if self.checked < self.CHECKS:
            self.checked += 1
            if self._checker is None:
                self._checker = ThreadPoolExecutor(1, thread_name_prefix="contextpilot-line-check")
            self.checks.append(self._checker.submit(self._check, text, list(out)))
        return out

    @classmethod
    def _size(cls, line: str, ids: list[int]) -> int:
        return cls.ENTRY_BYTES + len(line) + cls.TOKEN_BYTES * len(ids)

    def _check(self, text: str, ids: list[int]) -> bool:
        """Whether ``ids`` (the cache's) are ``text`` tokenized whole; turns the cache off if not."""
        if self.whole(text) == ids:
            return True
        self.enabled = False
        log.info("contextpilot proxy: this tokenizer joins tokens across lines; prompts are tokenized whole")
        return False


class LocalTemplate(PromptRenderer):
    """The model's tokenizer and chat template in this process."""

    name = "local"
    local = True

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.lines = LineTokenCache(tokenizer)

    def can_render(self, messages: Sequence[Any], body: dict) -> bool:
        return not template_fields(body) and _plain(messages)

    def render_now(self, messages: Sequence[Any], want_offsets: bool) -> RenderedPrompt:
        tok = self.tokenizer
        text = tok.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        if not want_offsets:
            return RenderedPrompt(text, self.lines.encode(text), None)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return RenderedPrompt(text, list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]])

    async def render(self, messages: Sequence[Any], body: dict, want_offsets: bool) -> RenderedPrompt | None:
        return self.render_now(messages, want_offsets)


class BackendTokenize(PromptRenderer):
    """The backend's ``POST /tokenize`` (vLLM) with the request's messages and template fields."""

    name = "backend"

    def __init__(self, backend: Backend, model: str | None):
        self.backend = backend
        self.model = model
        self._alphabet = _byte_alphabet()

    def can_render(self, messages: Sequence[Any], body: dict) -> bool:
        return True

    async def render(self, messages: Sequence[Any], body: dict, want_offsets: bool) -> RenderedPrompt | None:
        payload = {"model": body.get("model") or self.model, "messages": list(messages),
                   "add_generation_prompt": True, "return_token_strs": True, **template_fields(body)}
        try:
            r = await self.backend.next_lane().post("/tokenize", json=payload)
            data = r.json() if r.status_code == 200 else None
        except Exception:  # the request itself will tell the client if the backend is down
            return None
        if not isinstance(data, dict):
            return None
        return self.from_pieces(data.get("tokens"), data.get("token_strs"))

    def from_pieces(self, ids: Any, pieces: Any) -> RenderedPrompt | None:
        """Text and character offsets from a byte-level BPE vocabulary's token strings."""
        if not isinstance(ids, list) or not isinstance(pieces, list) or len(ids) != len(pieces):
            return None
        alphabet = self._alphabet
        raw: list[bytes] = []
        for piece in pieces:
            if not isinstance(piece, str) or any(c not in alphabet for c in piece):
                return None  # not a byte-level vocabulary: the text cannot be rebuilt exactly
            raw.append(bytes(alphabet[c] for c in piece))
        try:
            text = b"".join(raw).decode("utf-8")
        except UnicodeDecodeError:
            return None
        # byte offset -> character offset (a token that starts inside a character starts at that character)
        char_starts: list[int] = []
        pos = 0
        for ch in text:
            char_starts.append(pos)
            pos += len(ch.encode("utf-8"))
        offsets = []
        at = 0
        for b in raw:
            start = bisect_right(char_starts, at) - 1 if char_starts else 0
            at += len(b)
            end = bisect_right(char_starts, at - 1) if b else start
            offsets.append((max(0, start), end))
        return RenderedPrompt(text, [int(i) for i in ids], offsets)


def load_tokenizer(path: str | None) -> Any:
    """The Hugging Face tokenizer at ``path`` (None when there is none, or transformers is missing)."""
    if not path or not os.path.isdir(path):
        return None
    try:
        from transformers import AutoTokenizer
    except ImportError:
        log.info("contextpilot proxy: transformers is not installed; the model's tokenizer cannot be loaded here")
        return None
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # a path without a tokenizer, or one transformers cannot read
        log.warning("contextpilot proxy: cannot load a tokenizer from %s: %s", path, exc)
        return None


#: a conversation in the proxy's own layout (documents in the system message), to compare renderings
SAMPLE = [
    {"role": "system", "content": "Answer the question using the documents below.\n<documents>\n"
                                  "[1] The river Alpha runs north; caf\u00e9 owners fish there.\n"
                                  "[2] Mount Beta is 2,301 m high.\n</documents>\n"
                                  "Importance ranking of the documents, most relevant first: [2] > [1]"},
    {"role": "user", "content": "Which document is about rivers?"},
]


async def verify(local: LocalTemplate, backend: Backend, model: str | None) -> str:
    """``"verified"``, ``"mismatch"`` (the local rendering differs from the backend's) or ``"unchecked"``."""
    try:
        mine = local.render_now(SAMPLE, False).token_ids
    except Exception as exc:
        log.warning("contextpilot proxy: the local chat template failed on a sample: %s", exc)
        return "mismatch"
    try:
        r = await backend.client.post("/tokenize", json={"model": model, "messages": SAMPLE,
                                                          "add_generation_prompt": True}, timeout=10.0)
        theirs = r.json().get("tokens") if r.status_code == 200 else None
    except Exception:
        theirs = None
    if not isinstance(theirs, list):
        return "unchecked"
    return "verified" if list(theirs) == mine else "mismatch"
