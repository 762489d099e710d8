"""Scale-out: cache- and reorder-aware routing across engine replicas on Ray Serve.

``pip install "contextpilot-engine[ray]"`` adds Ray Serve; the recipe is in
``docs/ray.md``.  The parts, one concept each:

* :mod:`.policy`: which replica serves a request (cached prefix under any
  order, queue length, bounded imbalance, stickiness); no Ray;
* :mod:`.probe`: a request's blocks as each replica's index sees them;
* :mod:`.replica_set`: one mirror and rewrite path (the proxy's) per replica;
* :mod:`.query`: the argument the router sees for a request;
* :mod:`.engine_server`: a vLLM OpenAI server with its KV events on;
* :mod:`.router`: the Ray Serve ``RequestRouter`` (imports Ray);
* :mod:`.deployment`: the Ray Serve application (imports Ray).

Importing this package does not import Ray; :class:`ContextPilotRouter`,
:func:`build_app` and :func:`app_builder` load it when first used.
"""

from __future__ import annotations

from typing import Any

from .engine_server import EngineServer, EngineServerError, ServerEndpoints
from .policy import Decision, ReplicaLoad, RoutingPolicy, decide
from .query import RouteQuery

__all__ = [
    "ContextPilotRouter",
    "Decision",
    "EngineServer",
    "EngineServerError",
    "ReplicaLoad",
    "RouteQuery",
    "RoutingPolicy",
    "ServerEndpoints",
    "app_builder",
    "build_app",
    "decide",
]

_LAZY = {"ContextPilotRouter": ".router", "build_app": ".deployment", "app_builder": ".deployment"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module, __name__), name)
