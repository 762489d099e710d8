"""The proxy: an OpenAI-compatible HTTP server in front of one engine, with its start-up checks.

:meth:`Proxy.open` does everything that can fail before the first request,
so a misconfiguration is one clear error at start rather than a wrong
answer later:

* the options are validated (the integration layer's record, the same
  ``--contextpilot-*`` options as the engine plugins);
* the backend is probed (:func:`.backend.probe`); the page size is the
  engine's block size, and a ``--block-size`` that disagrees with what the
  engine reports is refused; KV events without a known page size are
  refused too;
* the tokenizer is chosen (:mod:`.tokenization`) and the local chat
  template, when there is one, checked against the backend's ``/tokenize``;
* the KV-event subscription starts (:mod:`.kv_events`).

Routes: ``POST /v1/chat/completions`` and ``POST /v1/completions``
(:mod:`.chat`); ``POST /reorder`` (:mod:`.reorder`); ``POST /evict``,
``POST /reset``, ``GET /stats``, ``GET /metrics``, ``GET /health``; every
other path and method is passed to the backend unchanged (``/v1/models``,
``/tokenize``, ...), with the response streamed back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Mapping

from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from contextpilot_engine.integration.failopen import failure_counts
from contextpilot_engine.integration.options import OptionError, PluginOptions

from . import metrics
from .backend import Backend, BackendError, BackendInfo, BackendTimeouts, probe
from .cache_view import CacheView, SettlePolicy
from .chat import (RANK_HEADER, ChatPath, ProxyCounters, error_response, forward_headers, response_headers,
                   seconds_summary)
from .evictions import ServedPaths
from contextpilot_engine.integration.kv_events import EventSource, KvEventSubscriber
from .reorder import reorder_endpoint
from .tokenization import SAMPLE, BackendTokenize, LocalTemplate, PromptRenderer, load_tokenizer, verify

__all__ = ["Proxy", "ProxyConfig", "ProxyStartError"]

log = logging.getLogger("contextpilot.proxy")

_ALL_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]


class ProxyStartError(RuntimeError):
    """The proxy cannot start as configured (the message says what to change)."""


@dataclass(frozen=True)
class ProxyConfig:
    """Everything ``contextpilot serve`` takes."""

    backend: str
    #: the engine's KV events (None: the modelled cache only)
    events: EventSource | None = None
    #: the engine's block size (None: read from the engine)
    block_size: int | None = None
    #: the model's tokenizer directory (None: the path the backend reports, when it exists here)
    model_path: str | None = None
    #: ``auto`` (local when available, else the backend's /tokenize), ``local``, ``backend`` or ``none``
    tokenizer: str = "auto"
    #: contextpilot options (the ``--contextpilot-*`` flags), as in ``additional_config["contextpilot"]``
    options: Mapping[str, Any] = field(default_factory=dict)
    timeouts: BackendTimeouts = BackendTimeouts()
    settle: SettlePolicy = SettlePolicy()
    max_connections: int = 1024
    #: the engine's data-parallel ranks: one KV-event subscription and one mirror per rank, and each
    #: request pinned to the rank it was planned for (vLLM's ``X-data-parallel-rank`` header)
    data_parallel_size: int = 1


def _options(values: Mapping[str, Any]) -> PluginOptions:
    values = dict(values)
    if values.get("channel", "off") != "off":
        log.info("contextpilot proxy: the channel option is for engine plugins; the proxy mirrors KV events")
    values["channel"] = "off"
    try:
        return PluginOptions.from_dict(values, "contextpilot options")
    except OptionError as exc:
        raise ProxyStartError(str(exc)) from None


def _page_size(config: ProxyConfig, info: BackendInfo) -> int | None:
    given, found = config.block_size, info.block_size
    if given is not None and found is not None and given != found:
        raise ProxyStartError(f"--block-size {given} disagrees with the backend's block size {found} "
                              f"({config.backend}); give the engine's block size or leave it out")
    page = given or found
    if config.events is not None and page is None:
        raise ProxyStartError(f"the engine's block size is unknown ({config.backend} reports none): pass "
                              "--block-size with the engine's --block-size")
    if config.events is not None and given is not None and found is None:
        log.warning("contextpilot proxy: the backend does not report its block size; using --block-size %d "
                    "unchecked (KV events of another size are refused)", given)
    return page


async def _renderer(config: ProxyConfig, backend: Backend, info: BackendInfo) -> tuple[PromptRenderer | None, Any,
                                                                                       str]:
    """The renderer, the local tokenizer (for token counts) and how the renderer was checked."""
    mode = config.tokenizer
    if mode not in ("auto", "local", "backend", "none"):
        raise ProxyStartError(f"--tokenizer: expected auto, local, backend or none, got {mode!r}")
    model = info.models[0] if info.models else None
    tokenizer = None
    if mode in ("auto", "local"):
        path = config.model_path or info.model_root
        tokenizer = await asyncio.to_thread(load_tokenizer, path)
        if tokenizer is None and mode == "local":
            raise ProxyStartError(f"--tokenizer local: no tokenizer could be loaded from {path!r}; pass --model-path "
                                  "with the model's directory")
    if tokenizer is not None:
        local = LocalTemplate(tokenizer)
        status = await verify(local, backend, model) if info.tokenize else "unchecked"
        if status != "mismatch":
            if status == "unchecked":
                log.info("contextpilot proxy: the backend has no /tokenize to check the local chat template against")
            return local, tokenizer, status
        if info.tokenize:
            log.warning("contextpilot proxy: the local tokenizer and chat template render prompts differently from "
                        "the backend; prompts are tokenized by the backend's /tokenize instead (one round trip)")
            return BackendTokenize(backend, model), tokenizer, "mismatch: using the backend's /tokenize"
        return None, tokenizer, "mismatch"
    if mode in ("auto", "backend") and info.tokenize:
        return BackendTokenize(backend, model), None, "backend"
    return None, None, "none"


def _warm_up(views: list[CacheView], renderer: PromptRenderer | None, tokenizer: Any) -> None:
    """Do now what the request path would otherwise do once, in the first requests' own work.

    Each state's ContextPilot (made with the tokenizer's byte table, a pass
    over the whole vocabulary), its binder thread, and the compiled chat
    template.  Made here, they are part of the start-up heap that
    :func:`.collector.tune` freezes, and the first requests cost what every
    later one does.
    """
    for view in views:
        for state in view.states():
            state.pilot_for(tokenizer)
            state.binder  # noqa: B018 (starts its thread)
    if isinstance(renderer, LocalTemplate):
        try:
            renderer.render_now(SAMPLE, False)
        except Exception as exc:  # verify() reports a template that fails; here it only stays cold
            log.debug("contextpilot proxy: the chat template failed on the warm-up sample: %s", exc)


class Proxy:
    """The running proxy: its components and its Starlette app (``proxy.app``)."""

    def __init__(self, config: ProxyConfig, backend: Backend, info: BackendInfo, views: list[CacheView],
                 renderer: PromptRenderer | None, tokenizer: Any, renderer_status: str,
                 subscribers: list[KvEventSubscriber]):
        self.config = config
        self.backend = backend
        self.info = info
        #: one cache view per data-parallel rank (rank 0's is :attr:`view`)
        self.views = views
        self.view = views[0]
        self.renderer = renderer
        self.tokenizer = tokenizer
        self.renderer_status = renderer_status
        self.subscribers = subscribers
        self.subscriber = subscribers[0] if subscribers else None
        self.counters = ProxyCounters()
        self.served = ServedPaths()
        ranked = len(views) > 1
        #: one request path per rank; with several ranks each pins its requests to its rank
        self.lanes = [ChatPath(view, backend, renderer, tokenizer, info.lora_names, self.counters, self.served,
                               rank=rank if ranked else None, peers=views, engine=info.engine)
                      for rank, view in enumerate(views)]
        self.chat = self.lanes[0]
        #: requests on their way to each rank, from the choice until they are answered
        self._assigned = [0] * len(views)
        self.loop_lag: deque[float] = deque(maxlen=20_000)
        self.started_at = time.time()
        self._watch: asyncio.Task | None = None
        self.app = Starlette(routes=[
            Route("/v1/chat/completions", self.route_chat, methods=["POST"]),
            Route("/v1/completions", self.route_completions, methods=["POST"]),
            Route("/reorder", self.reorder, methods=["POST"]),
            Route("/evict", self.evict, methods=["POST"]),
            Route("/reset", self.reset, methods=["POST"]),
            Route("/stats", self.stats, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/{path:path}", self.passthrough, methods=_ALL_METHODS),
        ])

    # -------------------------------------------------------------- lifecycle
    @classmethod
    async def open(cls, config: ProxyConfig) -> "Proxy":
        """Check the configuration against the backend and start (raises :class:`ProxyStartError`)."""
        options = _options(config.options)
        ranks = config.data_parallel_size
        if not isinstance(ranks, int) or ranks < 1:
            raise ProxyStartError(f"--data-parallel-size: expected a positive integer, got {ranks!r}")
        backend = Backend(config.backend, config.timeouts, config.max_connections)
        try:
            info = await probe(backend)
            if not info.reachable:
                log.warning("contextpilot proxy: the backend %s is not reachable now (%s); requests get 502 until it "
                            "is", backend.url, info.error)
            page = _page_size(config, info)
            renderer, tokenizer, status = await _renderer(config, backend, info)
            if config.events is not None and renderer is None:
                log.warning("contextpilot proxy: no tokenizer for the backend's model (pass --model-path); served "
                            "prompts cannot be bound to the engine's pages, so reordering uses popularity only")
            try:
                sources = [config.events.for_rank(r) for r in range(ranks)] if config.events is not None else []
            except ValueError as exc:
                raise ProxyStartError(f"--kv-events {config.events.endpoint}: {exc}") from None
            views = [CacheView(options, page, config.events is not None, config.settle,
                               sources[r].endpoint if sources else "") for r in range(ranks)]
            subscribers: list[KvEventSubscriber] = []
            try:
                for view, source in zip(views, sources):
                    subscribers.append(KvEventSubscriber(source, view).start())
            except Exception as exc:
                for sub in subscribers:
                    sub.close()
                raise ProxyStartError(f"--kv-events {source.endpoint}: {type(exc).__name__}: {exc}") from None
        except BaseException:
            await backend.aclose()
            raise
        for view, sub in zip(views, subscribers):
            view.request_resync = sub.request_resync
        _warm_up(views, renderer, tokenizer)
        proxy = cls(config, backend, info, views, renderer, tokenizer, status, subscribers)
        proxy._watch = asyncio.get_running_loop().create_task(proxy._watch_loop())
        log.info("contextpilot proxy: backend %s, page size %s, tokenizer %s (%s), KV events %s%s", backend.url, page,
                 renderer.name if renderer else "none", status,
                 ", ".join(s.endpoint for s in sources) if sources else "off (modelled cache)",
                 f", {ranks} data-parallel ranks" if ranks > 1 else "")
        return proxy

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        for sub in self.subscribers:
            await asyncio.to_thread(sub.close)
        await self.backend.aclose()

    # ------------------------------------------------------- generation routes
    def lane(self, request: Request) -> ChatPath:
        """The rank a request goes to: the client's ``X-data-parallel-rank``, else the least busy (lowest first).

        Requests sent one at a time all go to rank 0, so they share its cache; under load they spread.
        """
        lanes = self.lanes
        if len(lanes) == 1:
            return lanes[0]
        asked = (request.headers.get(RANK_HEADER) or "").strip()
        if asked.isascii() and asked.isdecimal() and int(asked) < len(lanes):
            return lanes[int(asked)]
        return min(lanes, key=lambda lane: lane.view.in_flight + self._assigned[lane.rank or 0])

    async def _route(self, request: Request, completions: bool) -> Response:
        lane = self.lane(request)
        rank = lane.rank or 0
        self._assigned[rank] += 1  # counted from the choice on, before the request reaches the backend
        try:
            return await (lane.completions(request) if completions else lane.chat(request))
        finally:
            self._assigned[rank] -= 1

    async def route_chat(self, request: Request) -> Response:
        return await self._route(request, completions=False)

    async def route_completions(self, request: Request) -> Response:
        return await self._route(request, completions=True)

    async def _watch_loop(self, period: float = 0.05) -> None:
        """How late the event loop wakes up: the time something held it (for ``/stats``)."""
        while True:
            t = time.perf_counter()
            await asyncio.sleep(period)
            self.loop_lag.append(max(0.0, time.perf_counter() - t - period))

    # ------------------------------------------------------------ admin routes
    async def reorder(self, request: Request) -> Response:
        state = self.view.active()
        response = await reorder_endpoint(request, state.options.pilot, self.tokenizer)
        metrics.count_request("reorder", response.status_code)
        return response

    async def evict(self, request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            body = None
        ids = body.get("request_ids") if isinstance(body, dict) else None
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            metrics.count_request("evict", 400)
            return JSONResponse({"detail": "request_ids: expected a list of strings"}, status_code=400)
        removed, missing = self.served.evict(ids, [view.modelled.index for view in self.views])
        events = self.view.mode == "events"
        metrics.count_request("evict", 200)
        return JSONResponse({
            "status": "success",
            "removed_count": removed,
            "not_found": missing,
            "conversations_cleared": 0,
            "normalized_request_ids": ids,
            "message": ("the engine's KV events keep the index exact; evictions by request id change the modelled "
                        "cache only") if events else "evicted from the modelled cache",
        })

    async def reset(self, request: Request) -> Response:
        for view in self.views:
            view.reset()
        metrics.count_request("reset", 200)
        return JSONResponse({"status": "success", "message": "Index reset to initial state",
                             "conversation_tracker": "reset"})

    def stats_dict(self, last: int | None = None) -> dict:
        c = self.counters
        return {
            "status": "success",
            "backend": self.backend.url,
            "mode": self.view.mode,
            "page_size": self.view.page_size,
            "tokenizer": {"renderer": self.renderer.name if self.renderer else None, "check": self.renderer_status},
            "requests": {
                "total": c.requests, "rewritten": c.rewritten, "client_errors": c.client_errors,
                "backend_errors": c.backend_errors, "client_gone": c.client_gone,
                "rejected_rewrites": c.rejected_rewrites,
                "tree_estimate_differed": c.tree_differs,
            },
            "expected_vs_reported": {
                "compared": c.compared, "exact": c.exact, "expected_tokens": c.expected_tokens,
                "reported_tokens": c.reported_tokens,
            },
            "overhead": c.overhead_summary(last=last),
            "overhead_cpu": c.overhead_summary(cpu=True, last=last),
            "event_loop_lag": seconds_summary(self.loop_lag),
            "index": self.view.stats(),
            "kv_events": self.subscriber.stats.as_dict() if self.subscriber is not None else None,
            "data_parallel": None if len(self.views) == 1 else [
                {"rank": rank, "mode": view.mode, "in_flight": view.in_flight,
                 "engine_pages": len(view.cached_pages),
                 "kv_events": self.subscribers[rank].stats.as_dict() if self.subscribers else None}
                for rank, view in enumerate(self.views)],
            "evict_table": len(self.served),
            "failures": failure_counts(),
            "uptime_s": round(time.time() - self.started_at, 3),
        }

    async def stats(self, request: Request) -> Response:
        """The figures; ``?last=N`` summarises the own work of the last N requests only (after a warm-up)."""
        last = request.query_params.get("last")
        if last is None:
            return JSONResponse(self.stats_dict())
        try:
            n = int(last)
            if n < 1:
                raise ValueError
        except ValueError:
            return error_response(400, f"last: expected a positive number of requests, got {last!r}", param="last")
        return JSONResponse(self.stats_dict(last=n))

    async def metrics(self, request: Request) -> Response:
        out = metrics.exposition()
        if out is None:
            return Response("prometheus_client is not installed\n", status_code=503, media_type="text/plain")
        body, content_type = out
        return Response(body, media_type=content_type)

    async def health(self, request: Request) -> Response:
        backend = await self.backend.health()
        body = {
            "status": "ok" if backend["healthy"] else "backend_unavailable",
            "proxy": {"healthy": True, "mode": self.view.mode,
                      "kv_events": None if self.subscriber is None else
                      {"endpoint": self.subscriber.source.endpoint,
                       "linked": self.subscriber.linked, "alive": self.subscriber.alive},
                      **({} if len(self.subscribers) < 2 else {"ranks": [
                          {"rank": r, "mode": self.views[r].mode, "endpoint": sub.source.endpoint,
                           "linked": sub.linked, "alive": sub.alive} for r, sub in enumerate(self.subscribers)]})},
            "backend": backend,
        }
        return JSONResponse(body, status_code=200 if backend["healthy"] else 503)

    # ------------------------------------------------------------ passthrough
    async def passthrough(self, request: Request) -> Response:
        content = await request.body()
        try:
            response = await self.backend.open(request.method, request.url.path,
                                               headers=forward_headers(request.headers), content=content or None,
                                               params=request.query_params)
        except BackendError as exc:
            metrics.count_backend_error(exc.kind)
            if exc.kind == "unreachable":
                for view in self.views:
                    view.backend_lost(exc.message)
            return error_response(exc.status, exc.message)
        for view in self.views:
            view.backend_back()
        return StreamingResponse(response.aiter_bytes(), status_code=response.status_code,
                                 headers=response_headers(response.headers), background=BackgroundTask(response.aclose))
