"""``/v1/chat/completions`` and ``/v1/completions`` through the proxy: the integration layer's request path.

A chat request goes through exactly the steps of the engine plugins
(:mod:`contextpilot_engine.integration.rewriting`), with the backend in the
engine's place:

1. the ``contextpilot`` body field and the ``X-ContextPilot-*`` headers are
   parsed by :func:`~contextpilot_engine.integration.requests.spec_from_http`
   (a malformed field is HTTP 400 naming it); neither is forwarded;
2. :meth:`.cache_view.CacheView.settle` lets the previous request's KV events
   arrive (bounded; only when nothing else is in flight);
3. :func:`~contextpilot_engine.integration.rewriting.prepare` rewrites the
   conversation against the index the view trusts;
4. with a mirrored index, the rewritten messages are rendered to the tokens
   the engine will run (:mod:`.tokenization`), and
   :func:`~contextpilot_engine.integration.rewriting.finish` binds them to
   the index and sets the tenant's cache salt, which is sent as the body's
   ``cache_salt`` (vLLM and SGLang namespace their page hashes by it);
5. the backend answers; the report is added as the response's
   ``contextpilot`` field (the first chunk when streaming, chunks passed on
   as they come).  If the backend refuses the rewritten prompt (400/422)
   the request is sent as the client sent it, and the failure is ours
   (:func:`~contextpilot_engine.integration.rewriting.rejected`); if that
   is refused too, the backend's answer is the client's.

Planning runs on the event loop: it is the integration layer's request
path (sub-millisecond, with binding handed to the state's binder thread),
and a thread hop per request would cost more than it saves.  The time each
request spends in the proxy's own work is measured (:mod:`.work_clock`).

``/v1/completions`` (raw prompts) is passed through: a tenant named by the
body field or header still gets its cache salt; context blocks are only
rewritten in chat requests, so ``contexts`` there is a 400.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from contextpilot_engine.integration import rewriting
from contextpilot_engine.integration.failopen import report_failure
from contextpilot_engine.integration.reports import merge_reports
from contextpilot_engine.integration.requests import ContextPilotRequestError, RequestSpec, spec_from_http
from contextpilot_engine.integration.state import EngineState

from . import metrics
from .backend import HOP_HEADERS, Backend, BackendError
from .cache_view import CacheView
from .evictions import ServedPath, ServedPaths
from .page_hits import cached_prompt_tokens
from .sse import find_usage, sse_events, with_report
from .tokenization import PromptRenderer
from .work_clock import WorkClock

__all__ = ["ChatPath", "ProxyCounters", "RANK_HEADER", "error_response", "forward_headers", "seconds_summary"]

#: vLLM's header that pins a request to one data-parallel rank (the proxy sets it when the engine has several)
RANK_HEADER = "X-data-parallel-rank"
log = logging.getLogger("contextpilot.proxy")
#: the status counted for a request whose client disconnected before its answer (nginx's name for it)
CLIENT_GONE = 499


def error_response(status: int, message: str, param: str | None = None, kind: str | None = None) -> JSONResponse:
    """An OpenAI-style error body (what vLLM answers, so the ``openai`` client raises the usual errors)."""
    kind = kind or {400: "BadRequestError", 502: "BadGateway", 504: "GatewayTimeout"}.get(status, "Error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}},
                        status_code=status)


def forward_headers(headers: Any) -> dict[str, str | bytes]:
    """The client's headers minus hop-by-hop ones and ours.

    HTTP allows bytes past ASCII in a header value; the server decoded them
    as latin-1 and the client would encode them as ASCII, so such a value
    goes on as its original bytes instead of failing the request.
    """
    return {k: v if v.isascii() else v.encode("latin-1") for k, v in headers.items()
            if k.lower() not in HOP_HEADERS and not k.lower().startswith("x-contextpilot-")}


def response_headers(headers: Any) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in HOP_HEADERS}


@dataclass
class ProxyCounters:
    """Per-proxy figures for ``/stats`` (Prometheus has the process-wide ones)."""

    requests: int = 0
    rewritten: int = 0
    client_errors: int = 0
    backend_errors: int = 0
    #: requests whose client disconnected before the answer began (any answer, before its first byte,
    #: streamed or not): the backend call was dropped
    client_gone: int = 0
    rejected_rewrites: int = 0
    #: rewritten requests whose page-exact expected hit differed from the block tree's estimate
    tree_differs: int = 0
    #: rewritten requests whose usage reported cached tokens, and how many of them the index predicted exactly
    compared: int = 0
    exact: int = 0
    expected_tokens: int = 0
    reported_tokens: int = 0
    overhead: deque = field(default_factory=lambda: deque(maxlen=100_000))
    #: the CPU time of the same stretches, on the event-loop thread (without other processes' turns)
    overhead_cpu: deque = field(default_factory=lambda: deque(maxlen=100_000))
    #: (expected, reported) of the most recent rewritten requests
    recent: deque = field(default_factory=lambda: deque(maxlen=1000))

    def overhead_summary(self, cpu: bool = False, last: int | None = None) -> dict:
        """p50, p99 and max of the own work per request (CPU time with ``cpu``), of the ``last`` requests only."""
        samples = self.overhead_cpu if cpu else self.overhead
        if last is not None:
            samples = list(samples)[-last:] if last > 0 else []
        return seconds_summary(samples)


def seconds_summary(samples: Any) -> dict:
    """``n``, p50, p99 and max in milliseconds of durations in seconds (``{"n": 0}`` when there are none)."""
    data = sorted(samples)
    if not data:
        return {"n": 0}

    def pct(p: float) -> float:
        return data[min(len(data) - 1, int(p * len(data)))]

    return {"n": len(data), "p50_ms": pct(0.5) * 1e3, "p99_ms": pct(0.99) * 1e3, "max_ms": data[-1] * 1e3}


class _Json(Exception):
    def __init__(self, response: Response):
        self.response = response


def _parse_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise _Json(error_response(400, f"the request body is not JSON: {exc}")) from None
    if not isinstance(body, dict):
        raise _Json(error_response(400, "the request body must be a JSON object"))
    return body


@dataclass
class _Planned:
    """One request as it will be sent, and what its answer needs."""

    body: dict
    prepared: rewriting.Prepared | None = None
    state: EngineState | None = None
    spec: RequestSpec | None = None
    original_messages: list | None = None
    reports: list = field(default_factory=list)
    path: ServedPath | None = None


class ChatPath:
    """The two generation routes (see the module docstring)."""

    def __init__(self, view: CacheView, backend: Backend, renderer: PromptRenderer | None, tokenizer: Any,
                 lora_names: set[str], counters: ProxyCounters, served: ServedPaths, rank: int | None = None,
                 peers: list[CacheView] | None = None, engine: str | None = None):
        self.view = view
        #: the data-parallel rank this path pins its requests to (None: the engine has one rank)
        self.rank = rank
        #: every rank's view: a backend that went away took all of them along
        self.peers = peers or [view]
        #: the backend's engine, when known (how a rank is named: vLLM's header, SGLang's body field)
        self.engine = engine
        self.backend = backend
        self.renderer = renderer
        self.tokenizer = tokenizer
        self.lora_names = lora_names
        self.counters = counters
        self.served = served

    # ---------------------------------------------------------------- intake
    async def _accept(self, request: Request) -> tuple[WorkClock, dict, Any, RequestSpec | None]:
        """Count the request and read its body and its ``contextpilot`` fields, on a new work clock.

        Raises :class:`_Json` or :class:`ContextPilotRequestError` for a
        client's mistake; :meth:`_rejected` answers either.
        """
        self.counters.requests += 1
        raw = await request.body()
        clock = WorkClock()
        with clock:
            body = _parse_body(raw)
            state = self.view.active()
            spec = spec_from_http(body.pop("contextpilot", None), request.headers,
                                  state.options.pilot.max_blocks_per_context)
            rewriting.check_client_salt(state, body.get("cache_salt"))
        return clock, body, state, spec

    def _rejected(self, exc: Exception, endpoint: str) -> Response:
        """The client error for a request :meth:`_accept` or planning refused."""
        if isinstance(exc, _Json):
            return self._client_error(exc.response, endpoint)
        return self._client_error(error_response(400, str(exc), param="contextpilot"), endpoint)

    # ------------------------------------------------------------------ chat
    async def chat(self, request: Request) -> Response:
        try:
            clock, body, _, spec = await self._accept(request)
        except (_Json, ContextPilotRequestError) as exc:
            return self._rejected(exc, "chat")
        settled = await self.view.settle()
        if settled:
            metrics.observe_settle(settled)
        try:
            planned = await self._plan(body, spec, clock)
        except ContextPilotRequestError as exc:
            return self._rejected(exc, "chat")
        return await self._send("/v1/chat/completions", "chat", planned, request, clock)

    async def _plan(self, body: dict, spec: RequestSpec | None, clock: WorkClock) -> _Planned:
        """Plan, render and bind; ``clock`` counts the synchronous parts (not a backend round trip)."""
        with clock:
            return await self._plan_timed(body, spec, clock)

    async def _plan_timed(self, body: dict, spec: RequestSpec | None, clock: WorkClock) -> _Planned:
        messages = body.get("messages")
        if not isinstance(messages, list):
            return _Planned(body)  # the backend's own validation answers it
        state = self.view.active()
        mirrored = state is self.view.mirrored
        planned = _Planned(body, state=state, spec=spec, original_messages=messages)
        prepared = rewriting.prepare(state, [messages], spec, self.tokenizer, planned.reports)
        if prepared is None:
            return planned
        planned.prepared = prepared
        conv = prepared.conversations[0]
        client_salt = body.get("cache_salt")
        model = body.get("model")
        lora = model if isinstance(model, str) and model in self.lora_names else None
        tokens = None
        plan = prepared.plans[0]
        renderer = self.renderer
        if mirrored and plan is not None and plan.preamble is not None and renderer is not None:
            rendered = None
            if renderer.can_render(conv, body):
                try:
                    if renderer.local:
                        rendered = await renderer.render(conv, body, prepared.wants_offsets)
                    else:
                        with clock.paused():
                            rendered = await renderer.render(conv, body, prepared.wants_offsets)
                except Exception as exc:  # fail open: the prompt is served, only unbound
                    report_failure("tokenize_error", exc)
            if rendered is not None:
                tokens = rewriting.ServedTokens(rendered.text, rendered.token_ids, rendered.offsets, client_salt,
                                                lora)
        rewriting.finish(prepared, [tokens], planned.reports)
        if tokens is not None:
            self._exact_expected(planned, tokens)
        salt = tokens.cache_salt if tokens is not None else rewriting.tenant_cache_salt(
            state, prepared.tenants[0], client_salt)
        planned.body = dict(body, messages=conv)
        if salt is not None:
            planned.body["cache_salt"] = salt
        if plan is not None and plan.preamble is not None:
            planned.path = ServedPath(plan.tenant, (plan.preamble.key, *(b.key for b in plan.ordered)),
                                      modelled=not mirrored, rank=self.rank or 0)
        return planned

    def _exact_expected(self, planned: _Planned, tokens: rewriting.ServedTokens) -> None:
        """Replace the tree's estimate by the page-exact count of what the engine holds (see :mod:`.page_hits`)."""
        if len(planned.reports) != 1 or not planned.reports[0].get("applied"):
            return
        view = self.view
        assert view.page_size is not None
        exact = cached_prompt_tokens(view.cached_pages, tokens.token_ids, view.page_size, tokens.cache_salt,
                                     tokens.lora_name)
        report = planned.reports[0]
        if exact != report.get("expected_cached_tokens"):
            self.counters.tree_differs += 1
        planned.reports[0] = dict(report, expected_cached_tokens=exact)

    # ------------------------------------------------------------ completions
    async def completions(self, request: Request) -> Response:
        try:
            clock, body, state, spec = await self._accept(request)
            with clock:
                salt = rewriting.completion_salt(state, spec, body.get("cache_salt"))
                planned = _Planned(body if salt == body.get("cache_salt") else dict(body, cache_salt=salt))
        except (_Json, ContextPilotRequestError) as exc:
            return self._rejected(exc, "completions")
        return await self._send("/v1/completions", "completions", planned, request, clock)

    # ------------------------------------------------------------------ send
    def _client_error(self, response: Response, endpoint: str) -> Response:
        self.counters.client_errors += 1
        metrics.count_request(endpoint, response.status_code)
        return response

    def _backend_error(self, exc: BackendError, endpoint: str) -> Response:
        if exc.kind == "unreachable":
            for view in self.peers:
                view.backend_lost(exc.message)
        self.counters.backend_errors += 1
        metrics.count_backend_error(exc.kind)
        metrics.count_request(endpoint, exc.status)
        return error_response(exc.status, exc.message)

    async def _open(self, path: str, body: dict | bytes, headers: dict) -> Any:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return await self.backend.open("POST", path, headers={**headers, "content-type": "application/json"},
                                       content=content)

    async def _send(self, path: str, endpoint: str, planned: _Planned, request: Request,
                    clock: WorkClock) -> Response:
        with clock:
            headers = forward_headers(request.headers)
            if self.rank is not None:
                headers = {k: v for k, v in headers.items() if k.lower() != RANK_HEADER.lower()}
                headers[RANK_HEADER] = str(self.rank)  # vLLM
                if self.engine == "sglang":
                    planned.body = dict(planned.body, routed_dp_rank=self.rank)  # SGLang reads the body
            stream = bool(planned.body.get("stream"))
            content = json.dumps(planned.body).encode()
        self.view.request_started()
        done = False
        try:
            exchange = asyncio.ensure_future(self._exchange(path, content, headers, planned, stream))
            gone = asyncio.ensure_future(_client_gone(request))
            try:
                await asyncio.wait((exchange, gone), return_when=asyncio.FIRST_COMPLETED)
            finally:
                gone.cancel()
                if not exchange.done():  # the client left (or we are cancelled): so does the backend call
                    exchange.cancel()
                    await asyncio.gather(exchange, return_exceptions=True)
            if exchange.cancelled():
                self.counters.client_gone += 1
                metrics.count_request(endpoint, CLIENT_GONE)
                return Response(status_code=CLIENT_GONE)  # nobody reads it
            response, raw = exchange.result()
            if raw is None:
                done = True  # the stream's end marks the request done
                return self._stream(response, planned, endpoint, clock)
        except BackendError as exc:
            return self._backend_error(exc, endpoint)
        finally:
            if not done:
                self.view.request_done()
        with clock:
            out = self._finish_json(raw, response, planned)
        self._observe(clock)
        metrics.count_request(endpoint, response.status_code)
        return out

    async def _exchange(self, path: str, content: bytes, headers: dict, planned: _Planned,
                        stream: bool) -> tuple[Any, bytes | None]:
        """The backend's response and its body; the body is None for a stream to pass on as it comes."""
        response = await self._open(path, content, headers)
        for view in self.peers:
            view.backend_back()
        if response.status_code in (400, 422) and self._rewrote(planned):
            response = await self._retry_as_sent(path, planned, headers, response)
        if stream and response.status_code == 200:
            return response, None
        return response, await self.backend.read(response)

    @staticmethod
    def _rewrote(planned: _Planned) -> bool:
        prepared = planned.prepared
        return prepared is not None and any(p is not None for p in prepared.plans)

    async def _retry_as_sent(self, path: str, planned: _Planned, headers: dict, refused: Any) -> Any:
        """The backend refused the rewritten prompt: send the conversation as the client meant it."""
        detail = (await self.backend.read(refused)).decode("utf-8", "replace")[:500]
        prepared = planned.prepared
        assert prepared is not None and planned.state is not None
        as_sent = rewriting.as_sent([planned.original_messages], planned.spec,
                                    planned.state.options.pilot.instruction)[0]
        body = dict(planned.body, messages=as_sent)
        response = await self._open(path, body, headers)
        if response.status_code == 200:
            self.counters.rejected_rewrites += 1
            planned.reports.clear()
            rewriting.rejected(prepared, RuntimeError(f"the backend refused the rewritten prompt "
                                                      f"({refused.status_code}): {detail}"), planned.reports)
            planned.path = None
        else:
            planned.reports.clear()  # the client's own error: the backend's answer, nothing of ours
        planned.body = body
        return response

    def _report(self, planned: _Planned) -> dict | None:
        state = planned.state
        if not planned.reports or state is None or not state.options.report:
            return None
        return merge_reports(planned.reports)

    def _finish_json(self, raw: bytes, response: Any, planned: _Planned) -> Response:
        report = self._report(planned)
        if response.status_code != 200:
            return Response(raw, status_code=response.status_code, headers=response_headers(response.headers))
        try:
            data = json.loads(raw)
        except ValueError:
            return Response(raw, status_code=response.status_code, headers=response_headers(response.headers))
        if isinstance(data, dict):
            self._learn(planned, data.get("id"), data.get("usage"))
            if report is not None:
                data["contextpilot"] = report
        headers = {k: v for k, v in response_headers(response.headers).items() if k.lower() != "content-type"}
        return JSONResponse(data, status_code=200, headers=headers)

    def _learn(self, planned: _Planned, response_id: Any, usage: Any) -> None:
        """Remember the served sequence by id (for ``/evict``) and compare expected with reported cache hits."""
        if planned.path is not None:
            for rid in (response_id, planned.body.get("request_id")):
                if isinstance(rid, str):
                    self.served.remember(rid, planned.path)
        if len(planned.reports) != 1 or not planned.reports[0].get("applied"):
            return
        c = self.counters
        c.rewritten += 1
        if not isinstance(usage, dict):
            return
        details = usage.get("prompt_tokens_details")
        reported = details.get("cached_tokens") if isinstance(details, dict) else None
        if not isinstance(reported, int):
            return
        expected = int(planned.reports[0].get("expected_cached_tokens") or 0)
        if planned.state is self.view.modelled and isinstance(planned.reports[0].get("tenant"), str):
            self.view.calibrate(planned.reports[0]["tenant"], expected, reported)
        c.compared += 1
        c.exact += int(expected == reported)
        c.expected_tokens += expected
        c.reported_tokens += reported
        c.recent.append((expected, reported))
        metrics.count_cached(expected, reported)

    def _observe(self, clock: WorkClock) -> None:
        self.counters.overhead.append(clock.seconds)
        self.counters.overhead_cpu.append(clock.cpu_seconds)
        metrics.observe_overhead(clock.seconds)

    def _stream(self, response: Any, planned: _Planned, endpoint: str, clock: WorkClock) -> StreamingResponse:
        report = self._report(planned)
        backend = self.backend
        view = self.view
        learn: Callable[[Any, Any], None] = lambda rid, usage: self._learn(planned, rid, usage)
        observe = self._observe

        async def events() -> AsyncIterator[bytes]:
            first = True
            rid = None
            usage = None
            try:
                async for event in with_report(sse_events(response.aiter_text()), report):
                    if first:
                        first = False
                        observe(clock)
                        rid = _chunk_id(event)
                    found = find_usage(event)
                    if found is not None:
                        usage = found
                    yield event.encode("utf-8")
            except Exception as exc:  # the backend dropped or stalled mid-stream: end it with an error event
                err = backend.error(exc) if not isinstance(exc, BackendError) else exc
                metrics.count_backend_error(err.kind)
                yield ("data: " + json.dumps({"error": {"message": err.message, "code": err.status}}) + "\n\n"
                       ).encode()
            finally:
                await response.aclose()
                view.request_done()
                learn(rid, usage)

        metrics.count_request(endpoint, 200)
        return StreamingResponse(events(), status_code=200, headers=response_headers(response.headers),
                                 media_type="text/event-stream")


async def _client_gone(request: Request) -> None:
    """Return once the client has disconnected (its body is read by then, so nothing else can arrive).

    The server does not cancel a handler whose client left, and an engine
    stops generating only when its own client (the proxy) goes away, so the
    proxy has to notice and drop the backend call itself.
    """
    try:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    except Exception as exc:  # a failed receive says nothing about the client: keep serving it
        log.debug("contextpilot proxy: cannot watch the client for a disconnect: %s", exc)
        await asyncio.Event().wait()


def _chunk_id(event: str) -> str | None:
    if not event.startswith("data: {"):
        return None
    try:
        obj = json.loads(event[len("data: "):])
    except ValueError:
        return None
    rid = obj.get("id") if isinstance(obj, dict) else None
    return rid if isinstance(rid, str) else None
