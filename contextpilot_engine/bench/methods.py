"""The methods compared side by side, each producing the prompts it would send.

* ``retrieval order``: blocks as retrieved, requests as they arrived;
* ``frequency sort``: :func:`.baselines.frequency_sort`;
* ``ours offline``: ``ContextPilot.optimize_batch`` on the whole batch;
* ``ours online``: ``ContextPilot.optimize`` one request at a time, in
  arrival order, its index capacity set to the simulated cache's, each
  request with its ``conversation_id`` (the reference gets them too) and
  deduplication off;
* ``ours online+dedup`` (conversation workloads): the same after the
  library's ``deduplicate`` (the reference API's conversation memory, which
  assumes the caller keeps the earlier turns in its prompt, as the
  reference's own dedup does): blocks sent earlier in the conversation
  become hints;
* ``reference offline`` / ``reference online``: ContextPilot 0.5.0's
  ``reorder`` on the batch / once per request (:mod:`.reference`).

Every method's prompts are rendered in the same layout
(:mod:`contextpilot_engine.prompts`), so only block order and execution
order differ.  For *causal* workloads (chat and agent turns) every method
executes in arrival order and only reorders blocks inside a request.

Block conservation: each result records, per request, which input
positions were sent (in prompt order), replaced by a dedup hint, rewritten
(repeated chunks replaced), or **dropped**: missing from the method's output.
The reference drops repeated blocks; for scoring, a dropped block is
appended after the method's own blocks, so its tokens still count as prompt
tokens (almost always uncached) and no method gains hits by deleting
content.

Reading a prompt back: the layout numbers block lines ``[1] ``, ``[2] ``,
..., and real documents can hold such a line themselves (the PostgreSQL
manual's footnotes read ``[2] While SELECT * is ...``), so a prompt cannot be
split on labels alone.  :func:`split_known` splits it with the request's own
block texts, which every method here knows, and each result keeps those
splits for scoring (:meth:`MethodResult.prompts`).
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

from .. import ContextPilot
from ..blocks import make_block
from ..prompts import position_labels, render_messages
from .baselines import frequency_sort, retrieval_order
from .prompt_model import SplitPrompt, segments, split_prompt
from .reference import ReferenceRunner
from .simulator import Segment
from .workloads import Workload

__all__ = [
    "MethodResult",
    "run_retrieval",
    "run_frequency",
    "run_ours_offline",
    "run_ours_online",
    "run_reference_offline",
    "run_reference_online",
    "block_ids",
    "match_positions",
    "split_known",
]


@dataclass
class MethodResult:
    name: str
    kind: str  # "offline" or "online"
    order: list[int]  # execution order of the requests
    messages: dict[int, list[dict]]  # request -> messages sent (dropped blocks re-appended)
    served: dict[int, list[int]]  # request -> input positions of the sent blocks, in prompt order
    hinted: dict[int, list[int]] = field(default_factory=dict)
    rewritten: dict[int, list[int]] = field(default_factory=dict)
    dropped: dict[int, list[int]] = field(default_factory=dict)
    invented: int = 0  # output blocks that match no input block
    seconds: float | None = None  # the method's own planning time, all calls
    latencies: list[float] | None = None  # per call (online)
    dedup_tokens_saved: int = 0
    crashed_after: int | None = None
    error: str | None = None
    note: str = ""
    splits: dict[int, SplitPrompt] = field(default_factory=dict)  # request -> its prompt, read back

    @property
    def dropped_blocks(self) -> int:
        return sum(len(v) for v in self.dropped.values())

    @property
    def requests_with_drops(self) -> int:
        return sum(1 for v in self.dropped.values() if v)

    def conserved(self) -> bool:
        return self.dropped_blocks == 0 and self.invented == 0

    def prompts(self, count: Callable[[str], int]) -> list[list[Segment]]:
        """Simulator segments of the prompts in execution order, from the splits made with known blocks."""
        return [segments(self.splits[i], count, i) for i in self.order]

    def sequences(self, wl: Workload) -> list[list[str]]:
        """Per request, the block texts as finally placed (dropped ones appended), for trie reuse."""
        out = []
        for i, r in enumerate(wl.requests):
            pos = self.served.get(i, []) + self.dropped.get(i, [])
            out.append([r.contexts[p] for p in pos])
        return out


class _Renderer:
    """Renders any block order in the shared prompt layout."""

    def __init__(self, count: Callable[[str], int]):
        self.pilot = ContextPilot(tokenizer=count)
        self.count = count
        self.preamble = self.pilot.layout.preamble(None, count)
        self._blocks: dict[str, object] = {}

    def _block(self, text: str):
        b = self._blocks.get(text)
        if b is None:
            b = self._blocks[text] = make_block(text, self.count, "block")
        return b

    def render(self, texts: Sequence[str], order: Sequence[int], query: str) -> list[dict]:
        """Messages for ``texts`` placed in ``order`` (input positions)."""
        blocks = [self._block(texts[j]) for j in order]
        return render_messages(self.pilot.layout, self.preamble, blocks, position_labels(list(order)), query)


def match_positions(texts: Sequence[str], output: Sequence[str]) -> tuple[list[int], list[int], int]:
    """Map output blocks to input positions (multiset matching, earliest copy first).

    Returns (positions of the output blocks that matched, input positions
    never output, number of output blocks that matched nothing).
    """
    slots: dict[str, deque] = defaultdict(deque)
    for j, t in enumerate(texts):
        slots[t].append(j)
    matched, invented = [], 0
    for t in output:
        q = slots.get(t)
        if q:
            matched.append(q.popleft())
        else:
            invented += 1
    left = sorted(j for q in slots.values() for j in q)
    return matched, left, invented


def split_known(messages: Sequence[dict], texts: Sequence[str]) -> SplitPrompt:
    """:func:`.prompt_model.split_prompt` with the request's input blocks (kept for callers of this name).

    At each block line, the block is the input text (each copy used once)
    that the line continues with and that is followed by the next label or
    the closing tag; a block that is not one of ``texts`` (a dedup hint, a
    rewritten block) ends at the next label.  So a document that holds a
    line like ``[3] ...`` stays one block.
    """
    return split_prompt(messages, texts)


def _from_orders(name: str, kind: str, wl: Workload, renderer: _Renderer, perms, order, seconds=None) -> MethodResult:
    messages, served, splits = {}, {}, {}
    for i, r in enumerate(wl.requests):
        messages[i] = renderer.render(r.contexts, perms[i], r.query)
        served[i] = list(perms[i])
        splits[i] = split_known(messages[i], r.contexts)
    return MethodResult(name, kind, list(order), messages, served, seconds=seconds, splits=splits)


def _arrival(wl: Workload) -> list[int]:
    return list(range(len(wl.requests)))


def run_retrieval(wl: Workload, renderer: _Renderer) -> MethodResult:
    perms, order = retrieval_order(wl.contexts)
    return _from_orders("retrieval order", "offline", wl, renderer, perms, order)


def run_frequency(wl: Workload, renderer: _Renderer) -> MethodResult:
    start = time.perf_counter()
    perms, order = frequency_sort(wl.contexts)
    seconds = time.perf_counter() - start
    if wl.causal:
        order = _arrival(wl)
    return _from_orders("frequency sort", "offline", wl, renderer, perms, order, seconds)


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2]


def run_ours_offline(wl: Workload, count: Callable[[str], int], repeats: int = 1) -> MethodResult:
    """``optimize_batch`` on the whole batch; ``seconds`` is the median over ``repeats`` fresh instances."""
    times = []
    for _ in range(max(1, repeats)):
        pilot = ContextPilot(tokenizer=count)
        start = time.perf_counter()
        batch_messages, schedule = pilot.optimize_batch(wl.contexts, wl.queries)
        times.append(time.perf_counter() - start)
    seconds = _median(times)
    messages, served, dropped, splits, invented = {}, {}, {}, {}, 0
    for msgs, i in zip(batch_messages, schedule):
        texts = wl.requests[i].contexts
        splits[i] = split_known(msgs, texts)
        pos, left, extra = match_positions(texts, splits[i].blocks)
        messages[i], served[i], dropped[i] = msgs, pos, left
        invented += extra
    order = _arrival(wl) if wl.causal else list(schedule)
    note = "per-request orders from the batch plan, executed in arrival order" if wl.causal else ""
    return MethodResult(
        "ours offline",
        "offline",
        order,
        messages,
        served,
        dropped=dropped,
        invented=invented,
        seconds=seconds,
        note=note,
        splits=splits,
    )


def run_ours_online(
    wl: Workload, count: Callable[[str], int], capacity_tokens: int | None, dedup: bool = False
) -> MethodResult:
    """``optimize`` per request; ``capacity_tokens`` is told to the index (None: effectively unlimited).

    Requests carry their conversation id (as the reference's do), which
    informs the order; ``dedup`` first runs each turn through ``deduplicate``
    (a separate instance, so each turn is recorded once per instance) and
    sends only its new blocks, with the hints after the documents.
    """
    pilot = ContextPilot(tokenizer=count, capacity_tokens=capacity_tokens or 10**12)
    memory = ContextPilot(tokenizer=count) if dedup else None
    messages, served, hinted, rewritten, dropped, splits = {}, {}, {}, {}, {}, {}
    latencies, saved, invented = [], 0, 0
    for i, r in enumerate(wl.requests):
        cid = r.conversation
        start = time.perf_counter()
        positions, docs, hints = list(range(len(r.contexts))), list(r.contexts), []
        if memory is not None and cid:
            (turn,) = memory.deduplicate([r.contexts], cid)
            hints = turn["reference_hints"]
            hint_set = set(hints)
            positions = [p for p, d in enumerate(turn["deduplicated_docs"]) if d not in hint_set or d == r.contexts[p]]
            docs = [turn["deduplicated_docs"][p] for p in positions]
            saved += turn["tokens_saved"]
        if docs:
            msgs, report = pilot.optimize_with_report(docs, r.query, conversation_id=cid)
            sent_pos = [positions[j] for j in report["order"]]
        else:  # every block was sent before: an empty documents section, then the hints
            msgs = render_messages(pilot.layout, pilot.layout.preamble(None, count), [], [], r.query)
            sent_pos = []
        if hints:
            msgs[0] = dict(msgs[0], content=msgs[0]["content"] + "\n" + "\n".join(hints))
        latencies.append(time.perf_counter() - start)
        splits[i] = split_known(msgs, r.contexts)
        sent = splits[i].blocks
        if len(sent) != len(sent_pos):
            raise AssertionError(f"request {i}: {len(sent)} block lines but the report lists {len(sent_pos)}")
        changed = [p for p, t in zip(sent_pos, sent) if t != r.contexts[p]]
        all_pos = Counter(range(len(r.contexts)))
        all_pos.subtract(sent_pos)
        rest = sorted(p for p, c in all_pos.items() if c > 0)
        invented += sum(-c for c in all_pos.values() if c < 0)
        n_hint = len(hints)
        messages[i], served[i], rewritten[i] = msgs, sent_pos, changed
        hinted[i], dropped[i] = rest[:n_hint], rest[n_hint:]
    name = "ours online+dedup" if dedup else "ours online"
    return MethodResult(
        name,
        "online",
        _arrival(wl),
        messages,
        served,
        hinted=hinted,
        rewritten=rewritten,
        dropped=dropped,
        invented=invented,
        seconds=sum(latencies),
        latencies=latencies,
        dedup_tokens_saved=saved,
        splits=splits,
    )


def block_ids(wl: Workload) -> tuple[list[list[int]], dict[int, str]]:
    """Integer ids for block texts (first appearance order), for the reference driver."""
    ids: dict[str, int] = {}
    out = [[ids.setdefault(t, len(ids)) for t in r.contexts] for r in wl.requests]
    return out, {v: k for k, v in ids.items()}


def _reference_result(name, kind, wl, renderer, outputs: dict[int, list[int]], id_text, order, **extra):
    messages, served, dropped, splits, invented = {}, {}, {}, {}, 0
    for i, r in enumerate(wl.requests):
        if i in outputs:
            pos, left, bad = match_positions(r.contexts, [id_text.get(x, f"<unknown {x}>") for x in outputs[i]])
        else:  # never served by the reference (it crashed first): retrieval order
            pos, left, bad = list(range(len(r.contexts))), [], 0
        served[i], dropped[i] = pos, left
        invented += bad
        messages[i] = renderer.render(r.contexts, pos + left, r.query)
        splits[i] = split_known(messages[i], r.contexts)
    return MethodResult(name, kind, order, messages, served, dropped=dropped, invented=invented, splits=splits,
                        **extra)


def run_reference_offline(
    wl: Workload, renderer: _Renderer, runner: ReferenceRunner, repeats: int = 1
) -> MethodResult:
    ids, id_text = block_ids(wl)
    res = runner.offline(ids, repeats)
    order = [int(i) for i in res["order"]]
    outputs = {i: c for i, c in zip(order, res["reordered"])}
    exec_order = _arrival(wl) if wl.causal else order
    return _reference_result(
        "reference offline", "offline", wl, renderer, outputs, id_text, exec_order, seconds=res["seconds"]
    )


def run_reference_online(wl: Workload, renderer: _Renderer, runner: ReferenceRunner) -> MethodResult:
    ids, id_text = block_ids(wl)
    res = runner.online(ids, [r.conversation for r in wl.requests])
    outputs = {i: c for i, c in enumerate(res["reordered"])}
    note = ""
    if res["crashed_after"] is not None:
        note = (
            f"crashed after {res['crashed_after']} requests ({res['error']}); "
            "the remaining requests are scored in retrieval order"
        )
    return _reference_result(
        "reference online",
        "online",
        wl,
        renderer,
        outputs,
        id_text,
        _arrival(wl),
        seconds=res["seconds"],
        latencies=res["latencies"],
        crashed_after=res["crashed_after"],
        error=res["error"],
        note=note,
    )
