"""The request path every adapter runs: plan the rewrite, let the engine tokenize, bind the result.

An adapter calls, around the engine's own chat rendering:

1. :func:`prepare` with the conversations about to be rendered: each is
   rewritten (:func:`.conversation.plan_conversation`); None means "render
   them exactly as sent".  Malformed client data raises
   :class:`~.requests.ContextPilotRequestError` (the adapter answers 400);
   any other exception is ours and fails open: the conversations come back
   as the client meant them, and the report says so.
2. the engine renders and tokenizes :attr:`Prepared.conversations`,
   returning character offsets when :attr:`Prepared.wants_offsets`;
3. :func:`finish` with what the engine produced (:class:`ServedTokens`),
   which binds each prompt's blocks to the index and records the reports;
4. or, if the engine rejected the rewritten prompt, :func:`rejected`, which
   gives back the conversations as sent to try again.

Reports go to the engine state (recent history) and, when the adapter passes
one, to a per-request list that it turns into the response field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from .binding import bind_served_prompt
from .conversation import Plan, fallback_conversation, plan_conversation
from .engine_keys import page_salt
from .failopen import call_safely, report_failure
from .requests import ContextPilotRequestError, RequestSpec
from .state import EngineState

__all__ = ["Prepared", "ServedTokens", "prepare", "finish", "rejected", "as_sent"]


@dataclass
class Prepared:
    """The conversations to render, and what binding them afterwards needs."""

    state: EngineState
    conversations: list
    plans: list  # Plan | None per conversation
    #: some prompt must be bound: ask the engine's tokenizer for character offsets
    wants_offsets: bool


@dataclass
class ServedTokens:
    """One rendered prompt as the engine will run it."""

    prompt_text: str
    token_ids: Sequence[int]
    #: per-token (start, end) character offsets into ``prompt_text``, when the tokenizer gave them
    offsets: Sequence[tuple[int, int]] | None
    cache_salt: Any = None
    lora_name: str | None = None


def _record(state: EngineState, sink: list | None, report: dict) -> None:
    state.reports.append(report)
    if sink is not None:
        sink.append(report)


def as_sent(conversations: Sequence[Any], spec: RequestSpec | None) -> list:
    """Each conversation as the client meant it (see :func:`.conversation.fallback_conversation`)."""
    return [call_safely("request fallback", fallback_conversation, conv, spec, default=conv) for conv in conversations]


def prepare(
    state: EngineState,
    conversations: Sequence[Any],
    spec: RequestSpec | None,
    tokenizer: Any,
    sink: list | None = None,
) -> Prepared | None:
    """Plan every conversation; None means "render them unchanged"."""
    if spec is not None and not spec.enabled:
        return None
    try:
        pilot = state.pilot_for(tokenizer)
        state.ensure_channel()
        implicit = state.options.implicit_documents
        plans = [plan_conversation(pilot, conv, spec, implicit) for conv in conversations]
    except ContextPilotRequestError:
        raise
    except Exception as exc:  # fail open: the request goes through as the client sent it
        report_failure("request rewrite", exc)
        _record(state, sink, {"applied": False, "error": "internal error; request served unmodified"})
        return Prepared(state, as_sent(conversations, spec), [None] * len(conversations), False)
    if not any(p is not None for p in plans):
        return None
    new_convs = [p.messages if p is not None else conv for p, conv in zip(plans, conversations)]
    wants = any(p is not None and p.preamble is not None for p in plans)
    return Prepared(state, new_convs, plans, wants)


def finish(
    prepared: Prepared,
    served: Sequence[ServedTokens | None],
    retokenize: Callable[[str], tuple[list[int], list[tuple[int, int]]]] | None = None,
    sink: list | None = None,
) -> None:
    """Bind each rendered prompt to the index and record what was done."""
    state = prepared.state
    for plan, tokens in zip(prepared.plans, served):
        if plan is None:
            continue
        report = plan.report
        if tokens is not None and plan.preamble is not None and plan.ordered:
            plan.salt = page_salt(tokens.cache_salt, tokens.lora_name)
            ok = call_safely(
                "request binding",
                bind_served_prompt,
                state.index,
                plan,
                tokens.prompt_text,
                tokens.token_ids,
                tokens.offsets,
                retokenize,
                default=False,
            )
            report = dict(report, bound=bool(ok))
        if report:
            _record(state, sink, report)


def rejected(
    prepared: Prepared, conversations: Sequence[Any], spec: RequestSpec | None, exc: BaseException,
    sink: list | None = None,
) -> list:
    """The engine rejected the rewritten prompt: log it and return the conversations to retry with."""
    report_failure("request render (rewritten prompt)", exc, "retrying with the request as sent")
    _record(prepared.state, sink, {"applied": False, "error": "the rewritten prompt failed; request served unmodified"})
    return as_sent(conversations, spec)


