"""Input checks for the public API.

Every public call validates *all* of its input before it touches any state, so a
rejected call leaves the index exactly as it was.  Errors are ``TypeError`` for
a wrong type and ``ValueError`` for a wrong value, and the message names the
argument and the index of the offending element (``all_contexts[3][7]``), which
is what a caller needs to find the bad record in a batch of thousands.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from .blocks import MAX_CONTEXT_TOKENS, Block, block_fields, block_keys, checked_count, count_texts

__all__ = [
    "UnknownIdError",
    "parse_context",
    "parse_contexts",
    "parse_queries",
    "parse_messages",
    "check_name",
    "check_int",
]


class UnknownIdError(ValueError):
    """An id (conversation, tenant, node) that the index has never seen."""


def _is_sequence(obj: Any) -> bool:
    return isinstance(obj, (list, tuple))


class _BlockMaker:
    """Builds blocks for one call: each distinct text validated, hashed and counted once.

    Batches repeat the same popular chunks many times; hashing and counting each
    text once per call keeps a 100k-context batch fast, and every repeat of a
    text is the *same* :class:`Block` object (batch algorithms intern by it).
    The texts not seen before in the call are counted together, in one batched
    tokenizer call where the counter offers one.
    """

    def __init__(self, count_tokens: Callable[[str], int]):
        self.count_tokens = count_tokens
        self.by_text: dict[str, Block] = {}  # plain-string blocks
        self.by_dict: dict[tuple, Block] = {}  # dict blocks, by (text, label)

    def make_all(self, context: Sequence[Any], name: str) -> list[Block]:
        # fast path: strings already seen in this call are one dict lookup each
        get = self.by_text.get
        try:
            out: list[Any] = list(map(get, context))
        except TypeError:  # an unhashable item (a dict block, or bad input)
            out = [None] * len(context)
        if None not in out:
            return out
        pending: dict[tuple, list[int]] = {}  # memo key -> positions still to build
        fields: dict[tuple, tuple[str, str | None]] = {}
        for i, item in enumerate(context):
            if out[i] is not None and type(item) is str:
                continue
            text, label = block_fields(item, f"{name}[{i}]")
            memo = (text, None) if isinstance(item, str) else (text, label, "dict")
            known = self.by_text.get(text) if isinstance(item, str) else self.by_dict.get((text, label))
            if known is not None:
                out[i] = known if type(item) is str or known.source is item else Block(
                    known.key, text, known.tokens, label, item
                )
                continue
            pending.setdefault(memo, []).append(i)
            fields[memo] = (text, label)
        if pending:
            memos = list(pending)
            texts = [fields[m][0] for m in memos]
            keys = block_keys(texts, [f"{name}[{pending[m][0]}]" for m in memos])
            counts = count_texts(self.count_tokens, texts, keys)
            for memo, key, n in zip(memos, keys, counts):
                text, label = fields[memo]
                first = pending[memo][0]
                block = Block(key, text, checked_count(n, f"{name}[{first}]"), label, context[first])
                if len(memo) == 2:
                    self.by_text[text] = block
                else:
                    self.by_dict[(text, label)] = block
                for i in pending[memo]:
                    item = context[i]
                    same = len(memo) == 2 or block.source is item  # equal strings share one Block
                    out[i] = block if same else Block(key, text, block.tokens, label, item)
        return out


def parse_context(
    context: Any,
    name: str,
    count_tokens: Callable[[str], int],
    max_blocks: int,
    maker: _BlockMaker | None = None,
) -> list[Block]:
    """Validate one context (a list of blocks) and normalise it."""
    if context is None:
        raise TypeError(f"{name}: expected a list of blocks, got None")
    if isinstance(context, (str, dict)) or not _is_sequence(context):
        raise TypeError(f"{name}: expected a list of blocks, got {type(context).__name__}")
    if len(context) == 0:
        raise ValueError(f"{name}: the context is empty (it needs at least one block)")
    if len(context) > max_blocks:
        raise ValueError(
            f"{name}: {len(context)} blocks is more than the limit of {max_blocks} per context "
            "(raise max_blocks_per_context if this is intended)"
        )
    blocks = (maker or _BlockMaker(count_tokens)).make_all(context, name)
    total = sum(b.tokens for b in blocks)
    if total > MAX_CONTEXT_TOKENS:  # the overlap kernels count a context's tokens in 32 bits
        raise ValueError(f"{name}: {total} tokens in one context is more than the limit of {MAX_CONTEXT_TOKENS}")
    return blocks


def parse_contexts(
    contexts: Any,
    name: str,
    count_tokens: Callable[[str], int],
    max_blocks: int,
    allow_single: bool = True,
) -> tuple[list[list[Block]], bool]:
    """Validate a batch of contexts.

    With ``allow_single`` a flat list of blocks is accepted as a batch of one
    (the reference API allows both shapes).  Returns the parsed batch and
    whether the input was a single flat context.
    """
    if contexts is None:
        raise TypeError(f"{name}: expected a list of contexts, got None")
    if isinstance(contexts, (str, dict)) or not _is_sequence(contexts):
        raise TypeError(f"{name}: expected a list of contexts, got {type(contexts).__name__}")
    if len(contexts) == 0:
        raise ValueError(f"{name}: the list is empty")
    maker = _BlockMaker(count_tokens)
    single = allow_single and not _is_sequence(contexts[0]) and contexts[0] is not None
    if single:
        return [parse_context(contexts, name, count_tokens, max_blocks, maker)], True
    return [parse_context(c, f"{name}[{i}]", count_tokens, max_blocks, maker) for i, c in enumerate(contexts)], False


def parse_queries(queries: Any, name: str, expected: int, contexts_name: str) -> list[str]:
    """Validate a list of query strings that must match the contexts one to one."""
    if queries is None:
        raise TypeError(f"{name}: expected a list of str, got None")
    if isinstance(queries, str) or not _is_sequence(queries):
        raise TypeError(f"{name}: expected a list of str, got {type(queries).__name__}")
    if len(queries) != expected:
        raise ValueError(
            f"{name} has {len(queries)} entries but {contexts_name} has {expected}; they must match one to one"
        )
    for i, q in enumerate(queries):
        check_query(q, f"{name}[{i}]")
    return list(queries)


def parse_messages(messages: Any, name: str) -> list[dict]:
    """Validate chat messages (a list of ``{"role": str, "content": str or parts}``); returns a list copy."""
    if isinstance(messages, (str, dict)) or not _is_sequence(messages):
        raise TypeError(f"{name}: expected a list of chat messages, got {type(messages).__name__}")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise TypeError(f"{name}[{i}]: expected a dict with 'role' and 'content', got {type(msg).__name__}")
        if not isinstance(msg.get("role"), str) or not msg["role"]:
            raise ValueError(f"{name}[{i}]: 'role' must be a non-empty string")
        content = msg.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise TypeError(f"{name}[{i}]['content']: expected str or a list of parts, got {type(content).__name__}")
    return list(messages)


def check_query(query: Any, name: str) -> str:
    if not isinstance(query, str):
        raise TypeError(f"{name}: expected str, got {type(query).__name__}")
    if not query.strip():
        raise ValueError(f"{name}: the query is empty")
    return query


#: longest identifier (tenant, conversation id) accepted anywhere
MAX_NAME_CHARS = 256


def check_name(value: Any, name: str, allow_none: bool = False) -> str | None:
    """Validate an identifier such as a conversation id or a tenant name (the one rule for every caller)."""
    if value is None and allow_none:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected a non-empty string of at most {MAX_NAME_CHARS} characters, "
                        f"got {type(value).__name__}")
    if not value or len(value) > MAX_NAME_CHARS:
        raise ValueError(f"{name}: expected a non-empty string of at most {MAX_NAME_CHARS} characters, "
                         f"got {len(value)} characters")
    return value


def check_int(value: Any, name: str, minimum: int = 0, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name}: expected int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {value}")
    return value


def check_optional_str(value: Any, name: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected str or None, got {type(value).__name__}")
    return value


def ensure_sequence_of(values: Sequence[Any], name: str, kind: type) -> None:
    for i, v in enumerate(values):
        if not isinstance(v, kind) or isinstance(v, bool):
            raise TypeError(f"{name}[{i}]: expected {kind.__name__}, got {type(v).__name__}")
