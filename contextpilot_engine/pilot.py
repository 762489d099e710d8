"""The public entry point: ``ContextPilot`` with the reference API.

``optimize`` (online, one request), ``optimize_batch`` (offline, a whole
batch), ``reorder`` (orders only) and ``deduplicate`` (conversation dedup)
have the reference README's names, arguments and return shapes, so a caller
switches by changing the import.  Differences a caller can notice are
deliberate and documented on each method: outputs are always permutations
of the inputs (repeated blocks are kept), hints never contain block text, and
every call validates all input before it changes any state.

State (prefix trees, popularity, conversations) is per *tenant*; the default
tenant comes from the config and every method takes ``tenant=`` to override
it.  One instance is safe to share between threads.

The class is a facade: it validates input and holds the lock; the work of
one online request is :mod:`.request_pipeline`'s, the batch policy
:mod:`.batch_policy`'s.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Sequence

from .batch_policy import plan_and_record
from .blocks import Block, estimate_tokens
from .config import PilotConfig
from .dedup import ConversationStore
from .index import ContextIndex
from .kernels import OverlapBackend, select_backend
from .prompt_copies import PromptCopies
from .prompts import Preamble, PromptLayout, position_labels, render_messages
from .request_pipeline import GroupRequest, PendingRequest, ServedPrompt, serve_group, serve_request
from .validation import (
    check_int,
    check_name,
    check_optional_str,
    check_query,
    ensure_sequence_of,
    parse_context,
    parse_contexts,
    parse_messages,
    parse_queries,
)

__all__ = ["ContextPilot", "ServedPrompt"]


class ContextPilot:
    """Reorders and deduplicates context blocks for prefix-cache reuse.

    Args:
        alpha, linkage_method, batch_size: accepted for compatibility with the
            reference constructor and ignored (they tune its all-pairs
            clustering, which this implementation does not use).
        use_gpu: run the overlap kernel as Triton on a CUDA GPU.  Without a
            usable GPU a warning is logged once and the numpy path is used
            (pass ``strict_gpu=True`` to get an error instead).
        tokenizer: a callable ``text -> token count`` or an object with
            ``encode`` (a Hugging Face tokenizer).  Default: a fast estimate.
        config: a :class:`PilotConfig`; keyword arguments not listed here are
            forwarded to it (for example ``capacity_tokens=...``).
        index: share an existing :class:`ContextIndex` (an engine plugin's).
    """

    def __init__(
        self,
        alpha: float = 0.001,
        use_gpu: bool = False,
        linkage_method: str = "average",
        batch_size: int = 10000,
        *,
        tokenizer: Any = None,
        config: PilotConfig | None = None,
        index: ContextIndex | None = None,
        strict_gpu: bool = False,
        **options: Any,
    ):
        if not isinstance(use_gpu, bool):
            raise TypeError(f"use_gpu: expected bool, got {type(use_gpu).__name__}")
        if config is not None and options:
            raise TypeError("pass either config= or individual options, not both")
        PilotConfig.check_names(options, "ContextPilot() got unexpected keyword argument(s)", TypeError)
        self.config = config or PilotConfig(**options)
        self.count_tokens = _token_counter(tokenizer)
        self.backend: OverlapBackend = select_backend(use_gpu, strict=strict_gpu)
        self.index = index or ContextIndex(self.config.index_limits)
        self._owns_index = index is None  # reset() gives an index it made back to the memory budget
        self.conversations = self._new_conversations()
        self.layout = PromptLayout(self.config.instruction)
        self._lock = threading.RLock()

    # ------------------------------------------------------------- helpers
    def _new_conversations(self) -> ConversationStore:
        cfg = self.config
        return ConversationStore(
            cfg.max_conversations,
            cfg.max_conversation_entries,
            cfg.hint_template,
            cfg.chunk_hint_template,
            cfg.chunk_min_tokens,
            cfg.chunk_target_words,
            budget=self.index.budget,
        )

    def _tenant(self, tenant: str | None) -> str:
        return self.config.tenant if tenant is None else check_name(tenant, "tenant")  # type: ignore[return-value]

    def _preamble(self, system_instruction: str | None) -> Preamble:
        return self.layout.preamble(system_instruction, self.count_tokens)

    # -------------------------------------------------------------- online
    def optimize(
        self,
        docs: Sequence[Any],
        query: str,
        *,
        conversation_id: str | None = None,
        system_instruction: str | None = None,
        tenant: str | None = None,
        messages: Sequence[dict] | None = None,
    ) -> list[dict]:
        """Reorder ``docs`` against the live index and return ``[system, user]`` messages.

        The cached (or most shareable) blocks come first; an importance
        ranking after the blocks restates the retrieval order.  With a
        ``conversation_id``, blocks the conversation is likely to drop before
        its next turn go after the others.

        ``messages`` is the conversation so far (chat messages), served
        between the system message and the query: the result is then
        ``[system, *messages, user]``.  With a ``conversation_id`` (and config
        ``deduplicate`` on), a block whose full text is already in one of
        those messages becomes a short hint naming that message, unless it is
        part of the cached prefix.  A block is never replaced by a reference
        to anything the returned prompt does not contain; to deduplicate
        against turns you keep yourself, use :meth:`deduplicate`.
        """
        out, _ = self.optimize_with_report(
            docs, query, conversation_id=conversation_id, system_instruction=system_instruction, tenant=tenant,
            messages=messages,
        )
        return out

    def optimize_with_report(
        self,
        docs: Sequence[Any],
        query: str,
        *,
        conversation_id: str | None = None,
        system_instruction: str | None = None,
        tenant: str | None = None,
        messages: Sequence[dict] | None = None,
    ) -> tuple[list[dict], dict]:
        """:meth:`optimize`, plus a report of what was done (blocks moved, tokens saved, expected hits)."""
        blocks = self.parse_docs(docs, "docs")
        check_query(query, "query")
        history = parse_messages(messages, "messages") if messages is not None else []
        copies = PromptCopies.from_messages([*history, {"role": "user", "content": query}], first_number=2)
        served = self.serve(
            blocks, query, conversation_id=conversation_id, system_instruction=system_instruction, tenant=tenant,
            copies=copies,
        )
        system, user = served.messages
        return [system, *history, user], served.report

    def parse_docs(self, docs: Sequence[Any], name: str = "docs") -> list[Block]:
        """Validate and normalise one context; errors name ``name`` and the offending index."""
        return parse_context(docs, name, self.count_tokens, self.config.max_blocks_per_context)

    def serve(
        self,
        blocks: Sequence[Block],
        query: str,
        *,
        conversation_id: str | None = None,
        system_instruction: str | None = None,
        tenant: str | None = None,
        copies: PromptCopies | None = None,
    ) -> "ServedPrompt":
        """Reorder, deduplicate and render one request whose blocks are already parsed (:meth:`parse_docs`).

        This is :meth:`optimize` for callers that build the final prompt
        themselves (the engine plugins): besides the messages it returns the
        blocks in prompt order and the preamble, which is what binding the
        served prompt to the engine's pages needs.  ``copies`` is the rest of
        the prompt the caller serves (:class:`PromptCopies`), the only place a
        deduplicated block may refer to.
        """
        cid = check_name(conversation_id, "conversation_id", allow_none=True)
        check_optional_str(system_instruction, "system_instruction")
        _check_parsed(blocks, query, copies, "")
        name = self._tenant(tenant)
        with self._lock:
            turn = (
                self.conversations.check(name, cid, blocks, self.count_tokens, deduplicate=False) if cid else None
            )
            return serve_request(
                self.index, self.conversations, self.layout, self.config, self.count_tokens, name,
                self._preamble(system_instruction), list(blocks), query, turn, copies,
            )

    def serve_group(self, requests: Sequence[PendingRequest]) -> tuple[list["ServedPrompt"], list[int]]:
        """:meth:`serve` for requests that arrived together; returns them (input order) and an admission order.

        Requests without a conversation are planned jointly, like
        :meth:`optimize_batch` (each keeps its cached prefix first), and the
        admission order (input indices) runs those that share a prefix back
        to back; submitting them to the engine in that order is what lets
        each reuse the KV of the one before.  Requests in a conversation are
        served one by one, first, as :meth:`serve` would.  Every request is
        validated before any is served: a bad one raises and changes nothing.
        """
        checked = []
        for n, r in enumerate(requests):
            if not isinstance(r, PendingRequest):
                raise TypeError(f"requests[{n}]: expected a PendingRequest, got {type(r).__name__}")
            cid = check_name(r.conversation_id, f"requests[{n}].conversation_id", allow_none=True)
            check_optional_str(r.system_instruction, f"requests[{n}].system_instruction")
            _check_parsed(r.blocks, r.query, r.copies, f"requests[{n}].")
            checked.append((cid, self._tenant(r.tenant)))
        with self._lock:
            served: list = [None] * len(requests)
            admission: list[int] = []
            grouped: list[int] = []
            for n, (r, (cid, name)) in enumerate(zip(requests, checked)):
                if cid is None:
                    grouped.append(n)
                    continue
                turn = self.conversations.check(name, cid, r.blocks, self.count_tokens, deduplicate=False)
                served[n] = serve_request(
                    self.index, self.conversations, self.layout, self.config, self.count_tokens, name,
                    self._preamble(r.system_instruction), list(r.blocks), r.query, turn, r.copies,
                )
                admission.append(n)
            group = [
                GroupRequest(checked[n][1], self._preamble(requests[n].system_instruction), list(requests[n].blocks),
                             requests[n].query)
                for n in grouped
            ]
            group_served, group_order = serve_group(
                self.index, self.conversations, self.layout, self.config, self.count_tokens, self.backend, group
            )
            for g, n in enumerate(grouped):
                served[n] = group_served[g]
            admission.extend(grouped[g] for g in group_order)
        return served, admission

    # ------------------------------------------------------------- offline
    def optimize_batch(
        self,
        all_docs: Sequence[Sequence[Any]],
        all_queries: Sequence[str],
        *,
        system_instruction: str | None = None,
        tenant: str | None = None,
    ) -> tuple[list[list[dict]], list[int]]:
        """Reorder a whole batch and schedule it; ``messages_batch[i]`` answers ``all_queries[order[i]]``."""
        batch, _ = parse_contexts(
            all_docs, "all_docs", self.count_tokens, self.config.max_blocks_per_context, allow_single=False
        )
        queries = parse_queries(all_queries, "all_queries", len(batch), "all_docs")
        check_optional_str(system_instruction, "system_instruction")
        name = self._tenant(tenant)
        with self._lock:
            preamble = self._preamble(system_instruction)
            orders, schedule = self._plan(name, batch, preamble, 0)
        layout = self.layout
        messages = []
        for c in schedule:
            blocks, order = batch[c], orders[c]
            ordered = [blocks[j] for j in order]
            messages.append(render_messages(layout, preamble, ordered, position_labels(order), queries[c]))
        return messages, schedule

    def reorder(
        self,
        contexts: Sequence[Any],
        initial_tokens_per_context: int = 0,
        conversation_id: str | None = None,
        *,
        tenant: str | None = None,
    ) -> tuple[list[list[Any]], list[int]]:
        """Reorder one context or a batch; returns ``(reordered_contexts, order)``.

        ``reordered_contexts[i]`` is ``contexts[order[i]]`` with its blocks in
        the new order (the caller's own objects), listed in execution order.
        A single flat list of blocks is a batch of one.
        ``initial_tokens_per_context`` counts tokens the caller places before
        the blocks (its own system prompt).  With ``conversation_id`` the
        blocks are recorded as sent in that conversation, so a later
        :meth:`deduplicate` recognises them.
        """
        batch, _ = parse_contexts(contexts, "contexts", self.count_tokens, self.config.max_blocks_per_context)
        check_int(initial_tokens_per_context, "initial_tokens_per_context", minimum=0)
        cid = check_name(conversation_id, "conversation_id", allow_none=True)
        name = self._tenant(tenant)
        with self._lock:
            preamble = self._preamble(None)
            orders, schedule = self._plan(name, batch, preamble, initial_tokens_per_context)
            if cid:
                for c in schedule:
                    self.conversations.commit(name, cid, [(batch[c][j], p + 1) for p, j in enumerate(orders[c])])
        return [[batch[c][j].source for j in orders[c]] for c in schedule], schedule

    def _plan(self, tenant: str, batch: list[list[Block]], preamble: Preamble, extra_tokens: int):
        """Block orders and execution order for a batch (:mod:`.batch_policy`)."""
        return plan_and_record(self.index, self.config, self.backend, tenant, batch, preamble, extra_tokens)

    # --------------------------------------------------------------- dedup
    def deduplicate(
        self,
        contexts: Sequence[Any],
        conversation_id: str,
        hint_template: str | None = None,
        *,
        tenant: str | None = None,
    ) -> list[dict]:
        """Deduplicate each context (one turn each, in order) against the conversation so far.

        This is the reference API's conversation memory: a hint stands for a
        block *sent in an earlier turn*, so the caller must keep those earlier
        turns (with the blocks' text) in the prompt it sends; a hint to a turn
        the prompt no longer holds hides that document from the model.  To
        deduplicate only against what the served prompt really contains, pass
        the conversation's messages to :meth:`optimize` instead.

        Returns one dict per context:

        * ``new_docs``: blocks to send (the caller's objects; a long block
          with repeated chunks comes back as its rewritten text),
        * ``overlapping_docs``: blocks already sent earlier, and
          ``reference_hints``: the hint replacing each of them,
        * ``deduplicated_docs``: the context in its original order with
          repeats replaced by their hints, ready to send,
        * ``turn`` and ``tokens_saved``.
        """
        batch, _ = parse_contexts(contexts, "contexts", self.count_tokens, self.config.max_blocks_per_context)
        cid = check_name(conversation_id, "conversation_id")
        if hint_template is not None:
            check_optional_str(hint_template, "hint_template")
            PilotConfig(hint_template=hint_template)  # validates the template's fields
        name = self._tenant(tenant)
        results = []
        with self._lock:
            for blocks in batch:
                plan = self.conversations.check(name, cid, blocks, self.count_tokens, hint_template)  # type: ignore[arg-type]
                new_docs, overlapping, hints, dedup_docs = [], [], [], []
                for b, fate in zip(blocks, plan.fates):
                    if fate.kind == "repeat":
                        overlapping.append(b.source)
                        hints.append(fate.hint)
                        dedup_docs.append(fate.hint)
                    else:
                        out = b.source if fate.kind == "new" else fate.block.text
                        new_docs.append(out)
                        dedup_docs.append(out)
                self.conversations.commit(name, cid, [(b, i + 1) for i, b in enumerate(blocks)])  # type: ignore[arg-type]
                results.append(
                    {
                        "new_docs": new_docs,
                        "overlapping_docs": overlapping,
                        "reference_hints": hints,
                        "deduplicated_docs": dedup_docs,
                        "turn": plan.turn,
                        "tokens_saved": plan.tokens_saved,
                    }
                )
        return results

    def end_conversation(self, conversation_id: str, *, tenant: str | None = None) -> None:
        """Forget a conversation (unknown ids raise ``ValueError``)."""
        cid = check_name(conversation_id, "conversation_id")
        name = self._tenant(tenant)
        with self._lock:
            self.conversations.forget(name, cid)  # type: ignore[arg-type]

    def conversation_turns(self, conversation_id: str, *, tenant: str | None = None) -> int:
        """Turns recorded so far in a conversation (unknown ids raise ``ValueError``)."""
        cid = check_name(conversation_id, "conversation_id")
        name = self._tenant(tenant)
        with self._lock:
            return self.conversations.get(name, cid).turns  # type: ignore[arg-type]

    # ------------------------------------------------------------ lifecycle
    def reset(self, *, tenant: str | None = None) -> None:
        """Forget the index and conversations of one tenant (or of all, when ``tenant`` is None)."""
        with self._lock:
            if tenant is None:
                self.conversations.close()
                if self._owns_index:
                    self.index.close()
                    self.index = ContextIndex(self.config.index_limits, budget=self.index.budget)
                else:  # a shared index (an engine's mirror feeds it): keep it, forget what its tenants learned
                    for shared in list(self.index.tenant_names()):
                        self.index.drop_tenant(shared)
                self.conversations = self._new_conversations()
                return
            name = check_name(tenant, "tenant")
            if name in self.index.tenant_names():
                self.index.drop_tenant(name)  # type: ignore[arg-type]
            self.conversations.forget_tenant(name)  # type: ignore[arg-type]

    def stats(self) -> dict:
        """Index and conversation counts, and ``memory``: the process budget's limits, use per
        structure and evictions by reason (:meth:`.memory_budget.MemoryBudget.stats`)."""
        with self._lock:
            return {
                **self.index.stats(),
                "conversations": len(self.conversations),
                "backend": self.backend.name,
                "memory": self.index.budget.stats(),
            }


def _check_parsed(blocks: Any, query: Any, copies: Any, where: str) -> None:
    """The shape of a request whose blocks are already parsed, checked before anything is served.

    The query may be empty (a conversation whose last user turn is not
    text), but it is a string.
    """
    if not isinstance(blocks, (list, tuple)):
        raise TypeError(f"{where}blocks: expected a list of Block (from parse_docs), got {type(blocks).__name__}")
    ensure_sequence_of(blocks, f"{where}blocks", Block)
    if not isinstance(query, str):
        raise TypeError(f"{where}query: expected str, got {type(query).__name__}")
    if copies is not None and not isinstance(copies, PromptCopies):
        raise TypeError(f"{where}copies: expected PromptCopies or None, got {type(copies).__name__}")


def _token_counter(tokenizer: Any) -> Callable[[str], int]:
    if tokenizer is None:
        return estimate_tokens
    if hasattr(tokenizer, "encode"):
        from .blocks import tokenizer_counter

        return tokenizer_counter(tokenizer)
    if callable(tokenizer):
        return tokenizer
    raise TypeError(f"tokenizer: expected a callable or an object with encode(), got {type(tokenizer).__name__}")
