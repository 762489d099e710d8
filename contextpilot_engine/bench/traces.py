"""Import and export of request traces: ``{query, contexts}`` JSONL and the Mooncake format.

**Requests JSONL** (:func:`save_requests` / :func:`load_requests`): one JSON
object per line, ``{"query": str, "contexts": [str, ...]}`` plus optional
``"conversation"``, ``"timestamp"`` (seconds), ``"output_tokens"`` and
``"context_tokens"`` (token length of each context; synthetic workloads
carry them so a round trip keeps their weights).  This is how a real
retrieval log enters the suite.

**Mooncake** (:func:`save_mooncake` / :func:`load_mooncake`): the trace format
of Mooncake and NVIDIA Dynamo's data generator, one object per line,
``{"timestamp": ms, "input_length": tokens, "output_length": tokens,
"hash_ids": [...]}``, where the prompt is cut into blocks of
``block_tokens`` (512 by convention) and ``hash_ids[i]`` names block ``i``
*together with everything before it* (two requests share an id exactly when
they share the prompt up to that block's end).  Export takes prompts as
simulator segments, in the order to write them; ids are dense integers in
first-seen order.  Import turns each hash id into a block of
``block_tokens`` tokens (the last one shorter), so the simulator replays a
Mooncake trace directly; such a workload is *causal* (its blocks are
already prefix-chained, reordering them has no meaning).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

from .simulator import Segment
from .workloads import Request, Workload

__all__ = ["save_requests", "load_requests", "save_mooncake", "load_mooncake", "mooncake_rows", "MOONCAKE_BLOCK"]

MOONCAKE_BLOCK = 512


def save_requests(wl: Workload, path: str | Path, with_tokens: bool = True) -> None:
    count = wl.token_counter()
    with open(path, "w") as fh:
        for r in wl.requests:
            row: dict = {"query": r.query, "contexts": list(r.contexts)}
            if r.conversation is not None:
                row["conversation"] = r.conversation
            if r.timestamp is not None:
                row["timestamp"] = r.timestamp
            row["output_tokens"] = r.output_tokens
            if with_tokens:
                row["context_tokens"] = [count(t) for t in r.contexts]
            fh.write(json.dumps(row) + "\n")


def load_requests(path: str | Path, name: str | None = None, causal: bool | None = None) -> Workload:
    """Read a requests JSONL; ``causal`` defaults to "some request has a conversation"."""
    requests: list[Request] = []
    tokens: dict[str, int] = {}
    with open(path) as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not JSON ({exc})") from None
            if not isinstance(row, dict) or not isinstance(row.get("contexts"), list) or "query" not in row:
                raise ValueError(f"{path}:{n}: expected an object with 'query' and a 'contexts' list")
            contexts = row["contexts"]
            if not all(isinstance(c, str) for c in contexts):
                raise ValueError(f"{path}:{n}: every context must be a string")
            lengths = row.get("context_tokens")
            if lengths is not None:
                if len(lengths) != len(contexts):
                    raise ValueError(
                        f"{path}:{n}: context_tokens has {len(lengths)} entries for {len(contexts)} contexts"
                    )
                for text, t in zip(contexts, lengths):
                    if tokens.setdefault(text, int(t)) != int(t):
                        raise ValueError(f"{path}:{n}: context {text[:40]!r} has two token lengths")
            requests.append(
                Request(
                    contexts,
                    str(row["query"]),
                    row.get("conversation"),
                    row.get("timestamp"),
                    int(row.get("output_tokens", 128)),
                )
            )
    if causal is None:
        causal = any(r.conversation is not None for r in requests)
    return Workload(name or Path(path).stem, requests, tokens, {"source": str(path)}, causal)


def mooncake_rows(
    prompts: Sequence[Sequence[Segment]],
    timestamps_ms: Sequence[int] | None = None,
    output_lengths: Sequence[int] | None = None,
    block_tokens: int = MOONCAKE_BLOCK,
) -> list[dict]:
    """Mooncake rows for prompts given as segments (see the module docstring)."""
    trie: dict = {}
    next_node = 0
    ids: dict = {}
    rows = []
    for i, segs in enumerate(prompts):
        node = trie
        total = 0
        ends: list[tuple[int, int]] = []  # (node id, token position) at every block end
        for key, tokens in segs:
            child = node.get(key)
            if child is None:
                next_node += 1
                child = node[key] = {None: next_node}
            start, total = total, total + tokens
            for end in range((start // block_tokens + 1) * block_tokens, total + 1, block_tokens):
                ends.append((child[None], end))
            node = child
        if total % block_tokens:
            ends.append((node[None], total))  # the last, partial block
        hash_ids = [ids.setdefault(e, len(ids)) for e in ends]
        rows.append(
            {
                "timestamp": int(timestamps_ms[i]) if timestamps_ms is not None else i,
                "input_length": total,
                "output_length": int(output_lengths[i]) if output_lengths is not None else 128,
                "hash_ids": hash_ids,
            }
        )
    return rows


def save_mooncake(
    path: str | Path,
    prompts: Sequence[Sequence[Segment]],
    timestamps_ms: Sequence[int] | None = None,
    output_lengths: Sequence[int] | None = None,
    block_tokens: int = MOONCAKE_BLOCK,
) -> None:
    with open(path, "w") as fh:
        for row in mooncake_rows(prompts, timestamps_ms, output_lengths, block_tokens):
            fh.write(json.dumps(row) + "\n")


def _read_rows(path: str | Path) -> Iterable[dict]:
    with open(path) as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            missing = {"timestamp", "input_length", "hash_ids"} - set(row)
            if missing:
                raise ValueError(f"{path}:{n}: Mooncake row lacks {sorted(missing)}")
            yield row


def load_mooncake(path: str | Path, block_tokens: int = MOONCAKE_BLOCK, name: str | None = None) -> Workload:
    """A Mooncake trace as a workload of ``block_tokens``-token blocks named by hash id."""
    requests: list[Request] = []
    tokens: dict[str, int] = {}
    for i, row in enumerate(_read_rows(path)):
        ids = [int(h) for h in row["hash_ids"]]
        length = int(row["input_length"])
        if not ids:
            raise ValueError(f"{path}: request {i} has no hash_ids")
        if length > len(ids) * block_tokens or length <= (len(ids) - 1) * block_tokens:
            raise ValueError(
                f"{path}: request {i}: input_length {length} does not fit {len(ids)} blocks of {block_tokens}"
            )
        labels = []
        for j, h in enumerate(ids):
            size = block_tokens if j < len(ids) - 1 else length - block_tokens * (len(ids) - 1)
            label = f"mooncake block {h}"
            if tokens.setdefault(label, size) != size:
                label = f"mooncake block {h} ({size} tokens)"
                tokens[label] = size
            labels.append(label)
        requests.append(
            Request(
                labels, f"mooncake request {i}", None, int(row["timestamp"]) / 1000.0, int(row.get("output_length", 0))
            )
        )
    return Workload(name or Path(path).stem, requests, tokens, {"source": str(path), "block_tokens": block_tokens},
                    causal=True)
