"""The Ray Serve application: N vLLM replicas with KV events, behind an OpenAI ingress and the router.

Two deployments:

* :class:`EngineReplica` (``num_replicas`` of them): each starts one vLLM
  OpenAI server with its KV events on (:mod:`.engine_server`) and
  publishes its endpoints as Ray Serve replica metadata; or, given the
  URLs of engine servers the user already runs, each replica stands for
  one of them (by replica rank).  Its health check is the engine's
  ``/health``: a dead engine makes Ray Serve replace the replica.
* :class:`Ingress`: the OpenAI-compatible HTTP front (``/v1/chat/completions``,
  ``/v1/completions``, every other path passed to an engine) with the same
  request fields, headers, response field and errors as the engine
  plugins and the proxy.  Each chat request is routed by the engine
  deployment's router (:class:`~.router.ContextPilotRouter` by default,
  chosen with Ray Serve's ``choose_replica``), rewritten for the replica
  chosen against that replica's mirror, and sent to that replica's engine.

**Failures.**  A request whose engine cannot be reached or drops the
connection before answering (the proxy's 502/504, naming the engine), or
whose replica cannot be mirrored, is retried once on another replica, and
the failed replica is avoided until Ray Serve replaces it.  If the retry fails too, the client gets that 502/504.
A streamed answer that already started cannot be retried: it ends with an
error event.  With another router than ours (the benchmark's baselines) the
request goes through Ray to the replica, which forwards it unchanged.

:func:`build_app` assembles the application in Python; :func:`app_builder`
is the same for ``serve run`` and Serve config files (``docs/ray.md``).
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from typing import Any, Mapping, Sequence

from ray import serve
from ray.serve.config import RequestRouterConfig
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from contextpilot_engine.integration.requests import ContextPilotRequestError, spec_from_http

from .engine_server import EngineServer, ServerEndpoints
from .query import RouteQuery
from .replica_set import ReplicaSet, register_replica_set

__all__ = ["EngineReplica", "Ingress", "ROUTER_PATH", "app_builder", "build_app"]

log = logging.getLogger("contextpilot.routing")

ROUTER_PATH = "contextpilot_engine.routing.router:ContextPilotRouter"
#: the header naming the replica that served a request
REPLICA_HEADER = "x-contextpilot-replica"
#: the response field with the routing decision (non-streamed responses)
ROUTE_FIELD = "contextpilot_route"

#: settings every engine process gets unless the caller says otherwise (CPU-friendly, no hub access)
_ENGINE_ENV = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false"}


def _error(status: int, message: str) -> JSONResponse:
    kind = {400: "BadRequestError", 502: "BadGateway", 503: "ServiceUnavailable", 504: "GatewayTimeout"}.get(
        status, "Error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": status}},
                        status_code=status)


# ---------------------------------------------------------------------------------------------------- engine
class EngineReplica:
    """One engine: a vLLM server this replica starts, or one the user runs (see the module docstring).

    ``engine`` is a dict:

    * managed: ``{"model": PATH, "args": [engine arguments...], "env": {...}, "served_model_name": NAME}``
      (the server always gets ``--kv-events-config``; pass ``--block-size`` in ``args`` to set the page size);
    * external: ``{"servers": [{"url": ..., "kv_events": "tcp://host:port", "kv_replay": ...,
      "block_size": ..., "model_path": ...}, ...]}``; replica rank ``i`` stands for ``servers[i]``.
    """

    def __init__(self, engine: Mapping[str, Any]):
        self.server: EngineServer | None = None
        self._client: Any = None
        if "servers" in engine:
            servers = engine["servers"]
            if not isinstance(servers, Sequence) or not servers:
                raise ValueError("engine.servers: expected a non-empty list of engine servers")
            rank = serve.get_replica_context().rank
            index = getattr(rank, "rank", rank) or 0
            entry = servers[int(index) % len(servers)]
            self.endpoints = ServerEndpoints(**entry) if isinstance(entry, Mapping) else ServerEndpoints(str(entry))
        elif "model" in engine:
            env = dict(_ENGINE_ENV, **dict(engine.get("env") or {}))
            self.server = EngineServer(
                str(engine["model"]), list(engine.get("args") or []), env=env,
                served_model_name=engine.get("served_model_name"),
                startup_timeout_s=float(engine.get("startup_timeout_s", 600)),
            ).start()
            self.endpoints = self.server.endpoints()
        else:
            raise ValueError("engine: expected 'model' (a vLLM server per replica) or 'servers' (servers you run)")
        log.info("contextpilot routing: replica engine at %s (KV events %s)", self.endpoints.url,
                 self.endpoints.kv_events or "off")

    def record_replica_metadata(self) -> dict:
        """What the router needs to mirror this replica and rewrite for it (published once, at start)."""
        return self.endpoints.to_metadata()

    async def check_health(self) -> None:
        """Ray Serve's health check: the engine must answer ``/health`` (else the replica is replaced)."""
        import httpx

        if self.server is not None and not self.server.running:
            raise RuntimeError(f"the engine server at {self.endpoints.url} exited "
                               f"({self.server.proc.returncode if self.server.proc else '?'})")
        try:
            async with httpx.AsyncClient(timeout=5.0) as client:
                r = await client.get(self.endpoints.url + "/health")
        except httpx.HTTPError as exc:
            raise RuntimeError(f"the engine at {self.endpoints.url} is unreachable: {exc}") from None
        if r.status_code != 200:
            raise RuntimeError(f"the engine at {self.endpoints.url} answered /health with {r.status_code}")

    async def __call__(self, query: RouteQuery) -> dict:
        """Forward a request unchanged (routers that send requests through Ray): ``{"status", "body", "replica"}``."""
        import httpx

        if self._client is None:
            self._client = httpx.AsyncClient(base_url=self.endpoints.url, timeout=httpx.Timeout(600.0, connect=5.0))
        path = "/v1/chat/completions" if query.messages is not None else "/v1/completions"
        try:
            r = await self._client.post(path, json=query.body)
        except httpx.HTTPError as exc:
            return {"status": 502, "body": json.dumps({"error": {
                "message": f"engine {self.endpoints.url} is unreachable: {type(exc).__name__}: {exc}",
                "type": "BadGateway", "code": 502}}).encode(), "replica": self._replica_id()}
        return {"status": r.status_code, "body": r.content, "replica": self._replica_id()}

    @staticmethod
    def _replica_id() -> str:
        return serve.get_replica_context().replica_id.unique_id

    def __del__(self) -> None:
        if self.server is not None:
            self.server.stop()


# --------------------------------------------------------------------------------------------------- ingress
class Ingress:
    """The OpenAI-compatible front of the application (see the module docstring).

    ``options``: contextpilot options for every replica's rewrite (as the
    engine plugins' ``--contextpilot-*``); ``ours``: the engine deployment
    uses :class:`~.router.ContextPilotRouter` (False: another router, whose
    replicas receive requests unchanged through Ray).
    """

    def __init__(self, engine: Any, options: Mapping[str, Any] | None = None, ours: bool = True,
                 retry: bool = True, suspect_s: float = 30.0, tokenizer: str = "auto"):
        self.engine = engine
        self.ours = ours
        self.retry = retry
        dep = engine.deployment_id
        self.replicas = ReplicaSet(f"{dep.app_name}/{dep.name}", options, suspect_s, tokenizer)
        register_replica_set((dep.app_name, dep.name), self.replicas)
        self.recent: deque[dict] = deque(maxlen=1000)
        self.started = time.time()

    async def __call__(self, request: Request) -> Response:
        path, method = request.url.path, request.method
        if method == "POST" and path == "/v1/chat/completions":
            return await self._generate(request, chat=True)
        if method == "POST" and path == "/v1/completions":
            return await self._generate(request, chat=False)
        if method == "GET" and path == "/contextpilot/routing":
            return JSONResponse(self.stats())
        if method == "GET" and path == "/health":
            return await self._health()
        return await self._passthrough(request)

    # ------------------------------------------------------------ generation
    async def _generate(self, request: Request, chat: bool) -> Response:
        try:
            body = json.loads(await request.body())
        except ValueError as exc:
            return _error(400, f"the request body is not JSON: {exc}")
        if not isinstance(body, dict):
            return _error(400, "the request body must be a JSON object")
        try:
            spec = spec_from_http(body.get("contextpilot"), request.headers)
        except ContextPilotRequestError as exc:
            return _error(400, str(exc))
        query = RouteQuery(body.get("messages") if chat else None, body=body, spec=spec)
        if not self.ours:
            return await self._through_ray(query)
        await self.replicas.refresh()
        await self._settle()
        response: Response | None = None
        unmirrored = False
        while True:
            async with self.engine.choose_replica(query) as selection:
                replica = selection.replica_id
                cache = await self.replicas.ensure(replica, selection.replica_metadata)
                if cache is None:
                    unmirrored = self.replicas.cannot_open(replica)
                    response = _error(503, f"replica {replica}: " + (
                        "its engine cannot be mirrored now (see the router's log)" if unmirrored else
                        "it publishes no engine endpoints this router can use "
                        "(deploy contextpilot_engine.routing.deployment:EngineReplica)"))
                else:
                    handler = cache.proxy.chat.chat if chat else cache.proxy.chat.completions
                    response = await handler(request)
            failed = response.status_code in (502, 504) or cache is None
            self._record(query, replica, response.status_code)
            if failed and self.retry and query.attempt == 1 and len(self.replicas.members()) > 1:
                if cache is not None or unmirrored:  # a replica still starting up is not suspect
                    self.replicas.suspect(replica, f"HTTP {response.status_code}")
                query = query.retry_without(replica)
                continue
            return self._annotate(response, query, replica)

    async def _settle(self) -> None:
        """Let each replica's mirror take the events of requests that just finished (bounded, see the proxy)."""
        for replica in self.replicas.members():
            cache = self.replicas.cache(replica)
            if cache is not None:
                await cache.proxy.view.settle()

    async def _through_ray(self, query: RouteQuery) -> Response:
        result = await self.engine.remote(query)
        self._record(query, result.get("replica"), result["status"])
        headers = {REPLICA_HEADER: str(result.get("replica"))}
        return Response(result["body"], status_code=result["status"], headers=headers,
                        media_type="application/json")

    def _record(self, query: RouteQuery, replica: str | None, status: int) -> None:
        entry = {"replica": replica, "status": status, "attempt": query.attempt, "t": time.time()}
        if query.decision is not None:
            entry["decision"] = query.decision.as_dict()
        self.recent.append(entry)

    @staticmethod
    def _annotate(response: Response, query: RouteQuery, replica: str) -> Response:
        response.headers[REPLICA_HEADER] = replica
        if not isinstance(response, JSONResponse) or response.status_code != 200:
            return response
        try:
            data = json.loads(response.body)
        except ValueError:
            return response
        if not isinstance(data, dict):
            return response
        route = {"replica": replica, "attempt": query.attempt}
        if query.decision is not None:
            route.update(query.decision.as_dict(), replica=replica)
        data[ROUTE_FIELD] = route
        headers = {k: v for k, v in response.headers.items() if k.lower() not in ("content-length", "content-type")}
        return JSONResponse(data, status_code=200, headers=headers)

    # ----------------------------------------------------------------- other
    async def _any_cache(self):
        await self.replicas.refresh()
        for replica in self.replicas.members():
            cache = self.replicas.cache(replica)
            if cache is not None and not self.replicas.is_suspect(replica):
                return cache
        return None

    async def _passthrough(self, request: Request) -> Response:
        cache = await self._any_cache()
        if cache is None:
            return _error(503, "no engine replica is ready yet")
        return await cache.proxy.passthrough(request)

    async def _health(self) -> Response:
        cache = await self._any_cache()
        ok = cache is not None
        return JSONResponse({"status": "ok" if ok else "no_replica", "replicas": self.replicas.members()},
                            status_code=200 if ok else 503)

    def stats(self) -> dict:
        return {"router": "contextpilot" if self.ours else "other", "replica_set": self.replicas.stats(),
                "recent": list(self.recent)[-200:], "uptime_s": round(time.time() - self.started, 3)}

    async def __del__(self) -> None:  # Serve awaits an async __del__ at shutdown
        await self.replicas.close()


# ----------------------------------------------------------------------------------------------- assembling
def build_app(
    engine: Mapping[str, Any],
    *,
    num_replicas: int = 2,
    router: Any = ROUTER_PATH,
    router_kwargs: Mapping[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
    engine_actor_options: Mapping[str, Any] | None = None,
    max_ongoing_requests: int = 64,
    health_check_period_s: float = 10.0,
    retry: bool = True,
    name: str = "EngineReplica",
) -> Any:
    """The application: ``num_replicas`` engine replicas behind the router and the ingress (see the module docstring).

    ``router`` is the engine deployment's ``request_router_class`` (ours by
    default; any Ray Serve ``RequestRouter``); ``router_kwargs`` its
    ``request_router_kwargs`` (ours: :class:`~.policy.RoutingPolicy`'s
    options).  With external ``servers`` the replica count is their number.
    ``engine_actor_options`` are the engine replicas' ``ray_actor_options``
    (default: no CPU reserved, since vLLM's own threads are the engine's load).
    """
    if "servers" in engine:
        num_replicas = len(engine["servers"])
    ours = router in (ROUTER_PATH, ROUTER_PATH.replace(":", ".")) or getattr(router, "__name__", "") == \
        "ContextPilotRouter"
    if ours:
        from .policy import RoutingPolicy

        RoutingPolicy.from_dict(router_kwargs, "router_kwargs")  # fail here, not inside a replica
    if ours and options is not None:
        from contextpilot_engine.integration.options import PluginOptions

        PluginOptions.from_dict(dict(options, channel="off"), "options")
    engine_dep = serve.deployment(
        EngineReplica,
        name=name,
        num_replicas=num_replicas,
        max_ongoing_requests=max_ongoing_requests,
        health_check_period_s=health_check_period_s,
        ray_actor_options=dict(engine_actor_options or {"num_cpus": 0}),
        request_router_config=RequestRouterConfig(
            request_router_class=router, request_router_kwargs=dict(router_kwargs or {})),
    ).bind(dict(engine))
    ingress = serve.deployment(Ingress, name="Ingress", num_replicas=1, max_ongoing_requests=1024,
                               ray_actor_options={"num_cpus": 0})
    return ingress.bind(engine_dep, dict(options or {}), ours, retry)


def app_builder(args: dict) -> Any:
    """``serve run contextpilot_engine.routing.deployment:app_builder model=PATH num_replicas=2 ...``.

    Arguments (strings from the command line, or values from a config file's ``args``):
    ``model`` (managed vLLM servers) or ``servers`` (a JSON list, or comma-separated URLs with
    ``kv_events`` to match); ``engine_args`` (a JSON list or one string split on spaces);
    ``num_replicas``; ``router_kwargs`` and ``options`` (JSON objects); ``env`` (a JSON object).
    """
    def js(key: str, default: Any) -> Any:
        value = args.get(key, default)
        return json.loads(value) if isinstance(value, str) and value[:1] in "[{" else value

    if "servers" in args:
        servers = js("servers", [])
        if isinstance(servers, str):
            urls = [u for u in servers.split(",") if u]
            events = [e for e in str(args.get("kv_events", "")).split(",") if e]
            servers = [{"url": u, "kv_events": events[i] if i < len(events) else None} for i, u in enumerate(urls)]
        engine: dict = {"servers": servers}
    elif "model" in args:
        engine_args = js("engine_args", [])
        if isinstance(engine_args, str):
            engine_args = engine_args.split()
        engine = {"model": args["model"], "args": engine_args, "env": js("env", {}),
                  "served_model_name": args.get("served_model_name")}
    else:
        raise ValueError("app_builder: pass model=PATH (vLLM servers started per replica) or servers=URL,URL")
    return build_app(engine, num_replicas=int(args.get("num_replicas", 2)),
                     router_kwargs=js("router_kwargs", {}), options=js("options", {}),
                     health_check_period_s=float(args.get("health_check_period_s", 10.0)))
