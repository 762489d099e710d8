"""The request path every adapter runs: plan the rewrite, let the engine tokenize, bind the result.

An adapter calls, around the engine's own chat rendering:

1. :func:`prepare` with the conversations about to be rendered: each is
   rewritten (:func:`.conversation.plan_conversations`); None means "render
   them exactly as sent".  Malformed client data raises
   :class:`~.requests.ContextPilotRequestError` (the adapter answers 400);
   any other exception is ours and fails open: the conversations come back
   as the client meant them, and the report says so.
2. the engine renders and tokenizes :attr:`Prepared.conversations`,
   returning character offsets when :attr:`Prepared.wants_offsets`;
3. :func:`finish` with what the engine produced (:class:`ServedTokens`),
   which sets each prompt's cache salt (tenant isolation), binds its blocks
   to the index and records the reports;
4. or, if the engine rejected the rewritten prompt, the adapter renders
   :func:`as_sent` instead.  If that succeeds, the failure was ours
   (:func:`rejected` records it); if it fails too, the error is the client's
   and goes back to the client as the engine's own, with nothing logged.

Reports go to the engine state (recent history), to the metrics and, when
the adapter passes one, to a per-request list that it turns into the
response field.  The time spent in :func:`prepare` and :func:`finish` is the
request path's overhead (the ``contextpilot:request_overhead_seconds``
histogram and :attr:`.state.EngineState.overhead`).
"""

from __future__ import annotations

import time
from array import array
from dataclasses import dataclass
from typing import Any, Sequence

from . import metrics
from .binding import bind_served_prompt, locate_blocks
from .conversation import Plan, conversation_tenant, fallback_conversation, plan_conversations
from .engine_keys import page_salt
from .failopen import call_safely, logger, report_failure
from .reports import make_report
from .requests import ContextPilotRequestError, RequestSpec
from .state import EngineState

__all__ = ["Arrival", "Prepared", "ServedTokens", "prepare", "prepare_group", "finish", "rejected", "as_sent",
           "failed_open", "tenant_cache_salt", "check_client_salt", "completion_salt", "TENANT_MARK"]


@dataclass
class Prepared:
    """The conversations to render, and what binding them afterwards needs."""

    state: EngineState
    spec: RequestSpec | None
    conversations: list
    plans: list  # Plan | None per conversation
    #: some prompt must be bound: ask the engine's tokenizer for character offsets
    wants_offsets: bool
    #: the tenant of each conversation (None: the default tenant), for its cache salt
    tenants: list
    #: time spent in prepare() and finish() so far
    seconds: float = 0.0


@dataclass
class ServedTokens:
    """One rendered prompt as the engine will run it."""

    prompt_text: str
    token_ids: Sequence[int]
    #: per-token (start, end) character offsets into ``prompt_text``, when the tokenizer gave them
    offsets: Sequence[tuple[int, int]] | None
    #: the request's cache salt; :func:`finish` replaces it by the effective one (tenant isolation)
    cache_salt: Any = None
    lora_name: str | None = None


#: what every tenant's cache salt holds (:func:`tenant_cache_salt`), and no client's may
TENANT_MARK = "contextpilot-tenant="


def check_client_salt(state: EngineState, client_salt: Any) -> None:
    """Refuse a client's ``cache_salt`` that could spell a tenant's KV namespace.

    A tenant's salt is built from a fixed mark and its name, so without this
    check a client could send that salt itself and hit (or time) the
    tenant's pages.  Every request is checked, rewritten or not.
    """
    if state.options.tenant_isolation and isinstance(client_salt, str) and TENANT_MARK in client_salt:
        raise ContextPilotRequestError(
            f"cache_salt: {client_salt!r:.80} contains {TENANT_MARK!r}, which is reserved for tenant namespaces; "
            "name the tenant with the X-ContextPilot-Tenant header (or contextpilot.tenant) instead"
        )


def tenant_cache_salt(state: EngineState, tenant: str | None, client_salt: Any) -> Any:
    """The cache salt a request of ``tenant`` is served with.

    With ``tenant_isolation`` each tenant other than the configured default
    gets a KV namespace of its own (combined with any salt the client gave),
    so no tenant can hit, or time, another tenant's pages.
    """
    options = state.options
    if not options.tenant_isolation or tenant is None or tenant == options.pilot.tenant:
        return client_salt
    mark = f"{TENANT_MARK}{tenant}"
    return f"{client_salt}|{mark}" if client_salt else mark


def completion_salt(state: EngineState, spec: RequestSpec | None, client_salt: Any) -> Any:
    """The cache salt of a raw-prompt request (``/v1/completions``): sent as given, but salted by its tenant.

    Context blocks are rewritten in chat requests only, so ``contexts``
    there is the client's error (:class:`ContextPilotRequestError`).
    """
    if spec is not None and spec.contexts is not None:
        raise ContextPilotRequestError(
            "contextpilot.contexts: context blocks are rewritten in /v1/chat/completions requests only; "
            "/v1/completions sends its prompt as given")
    return tenant_cache_salt(state, spec.tenant if spec is not None else None, client_salt)


def _record(state: EngineState, sink: list | None, report: dict) -> None:
    state.reports.append(report)
    if sink is not None:
        sink.append(report)
    if report.get("applied"):
        metrics.count_rewrite(report)
    else:
        outcome = "skipped" if report.get("reason") in ("disabled_by_request", "system_not_text") else "failed_open"
        metrics.count_request(outcome, report.get("reason") or "")


def as_sent(conversations: Sequence[Any], spec: RequestSpec | None, instruction: str) -> list:
    """Each conversation as the client meant it (see :func:`.conversation.fallback_conversation`)."""
    return [
        call_safely("fallback_error", fallback_conversation, conv, spec, instruction, default=conv)
        for conv in conversations
    ]


@dataclass
class Arrival:
    """One render call's conversations, waiting to be planned with others (:func:`prepare_group`)."""

    conversations: Sequence[Any]
    spec: RequestSpec | None
    #: the per-request report list the adapter turns into the response field
    sink: list | None = None


def prepare(
    state: EngineState,
    conversations: Sequence[Any],
    spec: RequestSpec | None,
    tokenizer: Any,
    sink: list | None = None,
) -> Prepared | None:
    """Plan every conversation; None means "render them unchanged".

    The conversations of one call are planned jointly, like the arrivals of
    :func:`prepare_group`, but keep their order (the engine answers them in
    the order given).
    """
    result = prepare_group(state, [Arrival(conversations, spec, sink)], tokenizer)[0][0]
    if isinstance(result, ContextPilotRequestError):
        raise result
    return result


def prepare_group(
    state: EngineState, arrivals: Sequence[Arrival], tokenizer: Any
) -> tuple[list, list[int]]:
    """Plan render calls that arrived together; their results and an admission order.

    All their conversations are planned jointly
    (:func:`.conversation.plan_conversations`), so blocks shared across
    requests form a common prefix.  Each arrival's result is what
    :func:`prepare` returns for it (a :class:`Prepared` or None), or the
    :class:`ContextPilotRequestError` its client data raised (the adapter
    answers that request with 400; the others go on).  The admission order
    (indices into ``arrivals``) runs the requests that share a prefix back
    to back: submitting them to the engine in that order lets each reuse
    the KV of the one before.  Any other exception fails the whole group
    open: every request goes through as sent, and each report says so.
    """
    start = time.perf_counter()
    items = [(conv, a.spec) for a in arrivals for conv in a.conversations]
    owner = [n for n, a in enumerate(arrivals) for _ in a.conversations]
    try:
        state.binder.drain()  # the prompts served before these are in the index before they are planned
        pilot = state.pilot_for(tokenizer)
        state.ensure_channel()
        plans, order = plan_conversations(pilot, items, state.options.implicit_documents)
    except ContextPilotRequestError as exc:  # raised outside any one item: every arrival's
        return [exc] * len(arrivals), list(range(len(arrivals)))
    except Exception as exc:  # fail open: the requests go through as the clients sent them
        return failed_open(state, arrivals, exc, time.perf_counter() - start), list(range(len(arrivals)))
    seconds = (time.perf_counter() - start) / max(1, len(arrivals))
    results = []
    first = 0
    for a in arrivals:
        mine = plans[first : first + len(a.conversations)]
        first += len(a.conversations)
        error = next((p for p in mine if isinstance(p, ContextPilotRequestError)), None)
        results.append(error if error is not None else _prepared(state, a, mine, seconds))
    admission = list(dict.fromkeys(owner[i] for i in order))
    return results, admission


def failed_open(
    state: EngineState, arrivals: Sequence[Arrival], exc: BaseException, seconds: float = 0.0,
    reason: str = "rewrite_error",
) -> list:
    """Our code failed planning ``arrivals``: each goes through as its client sent it, and its report says so.

    Logged and counted once, under ``reason``.  The conversations keep
    their documents (explicit contexts are placed as given) and their
    tenants, so a failure of ours never hides a document or changes whose
    KV namespace a request runs in.
    """
    report_failure(reason, exc)
    seconds /= max(1, len(arrivals))
    results = []
    for a in arrivals:
        _record(state, a.sink, make_report(reason=reason, error=f"{type(exc).__name__}: {exc}"))
        convs = as_sent(a.conversations, a.spec, state.options.pilot.instruction)
        n = len(a.conversations)
        tenants = [call_safely("fallback_error", conversation_tenant, conv, a.spec, default=None)
                   for conv in a.conversations]
        results.append(Prepared(state, a.spec, convs, [None] * n, False, tenants, seconds))
    return results


def _prepared(state: EngineState, arrival: Arrival, plans: list, seconds: float) -> Prepared | None:
    spec_tenant = arrival.spec.tenant if arrival.spec is not None else None
    tenants = [p.tenant if p is not None and p.tenant else spec_tenant for p in plans]
    if not any(p is not None for p in plans) and all(tenant_cache_salt(state, t, None) is None for t in tenants):
        return None
    new_convs = [p.messages if p is not None else conv for p, conv in zip(plans, arrival.conversations)]
    binds = any(p is not None and p.preamble is not None for p in plans)
    wants = binds and not (state.token_table is not None and state.token_table_verified)
    return Prepared(state, arrival.spec, new_convs, plans, wants, tenants, seconds)


def _bind(state: EngineState, plan: Plan, tokens: ServedTokens) -> bool:
    """Locate one prompt's blocks now and queue its binding; False when it cannot be located.

    The first prompt located with the tokenizer's offsets also checks the
    byte-length table against them: from then on prompts are located from
    their token ids alone (no offsets asked), or never, if the table disagreed.
    The binding itself (page keys, the prefix tree) and teaching the pilot
    the blocks' token counts run on the state's binder (:mod:`.binder`).
    """
    table = state.token_table
    ids = array("q", tokens.token_ids)  # one copy, shared by the byte table and the page keys
    located = locate_blocks(plan, tokens.prompt_text, ids, tokens.offsets, table)
    if located is None:
        return False
    if table is not None and not state.token_table_verified and tokens.offsets is not None:
        if locate_blocks(plan, tokens.prompt_text, ids, None, table) == located:
            state.token_table_verified = True
        else:
            state.token_table = None
            logger.info("contextpilot: the vocabulary's byte lengths do not locate tokens exactly; using offsets")

    def bind() -> None:
        bind_served_prompt(state.index, plan, ids, located)
        learn = getattr(state.pilot.count_tokens if state.pilot is not None else None, "learn", None)
        if learn is not None:
            for block, n in zip(plan.ordered, located.text_tokens):
                learn(block.key, n)

    state.binder.submit(bind)
    return True


def finish(
    prepared: Prepared,
    served: Sequence[ServedTokens | None],
    sink: list | None = None,
) -> None:
    """Salt, bind and report each rendered prompt (``served[i]`` for ``prepared.plans[i]``)."""
    start = time.perf_counter()
    state = prepared.state
    for tenant, tokens in zip(prepared.tenants, served):  # every salt first: isolation never waits on binding
        if tokens is not None:
            tokens.cache_salt = tenant_cache_salt(state, tenant, tokens.cache_salt)
    for plan, tokens in zip(prepared.plans, served):
        if plan is None:
            continue
        report = plan.report
        if tokens is not None and plan.preamble is not None and plan.ordered:
            plan.salt = page_salt(tokens.cache_salt, tokens.lora_name)
            ok = call_safely("bind_error", _bind, state, plan, tokens, default=False)
            report = dict(report, bound=bool(ok))
        if report:
            _record(state, sink, report)
    prepared.seconds += time.perf_counter() - start
    state.overhead.append(prepared.seconds)
    metrics.observe_overhead(prepared.seconds)


def rejected(prepared: Prepared, exc: BaseException, sink: list | None = None) -> None:
    """The engine refused the rewritten prompt but took the one sent: our failure, recorded.

    The prompts now being served are the ones sent, so nothing is bound;
    :func:`finish` still salts them by tenant.
    """
    prepared.plans = [None] * len(prepared.plans)
    prepared.wants_offsets = False
    report_failure("rewrite_rejected", exc, "served the request as sent")
    _record(
        prepared.state,
        sink,
        make_report(reason="rewrite_rejected", error=f"{type(exc).__name__}: {exc}"),
    )
