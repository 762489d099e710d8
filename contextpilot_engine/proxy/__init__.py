"""The contextpilot proxy: an OpenAI-compatible server in front of any engine (``contextpilot serve``).

For engines contextpilot cannot be installed into (managed images, other
versions, llama.cpp, a cloud endpoint): clients point their base URL at the
proxy and change nothing else.  Chat requests go through the integration
layer's request path, exactly as in the engine plugins (same request
fields, headers, response field, options, metrics and errors).  With the
engine's KV events (``--kv-events``), the Context Index mirrors the engine's
cache page for page, so ``expected_cached_tokens`` is what the engine
reports; without them the index models the cache.

Modules, one concept each:

* :mod:`.app`: the server, its routes and its start-up checks;
* :mod:`.chat`: the chat and completions request path;
* :mod:`.backend`: the backend over HTTP, with 502/504 that name it;
* :mod:`.tokenization`: the served prompt's tokens (local template or the backend's /tokenize);
* :mod:`.cache_view`: mirrored or modelled index, and waiting for events to settle;
* :mod:`.page_hits`: the page-exact count of a served prompt's cached tokens;
* :mod:`.work_clock`: the proxy's own time per request;
* :mod:`.collector`: the garbage collector of the proxy's process, set for short pauses;
* :mod:`.sse`: streamed chunks passed through, the report in the first;
* :mod:`.reorder`, :mod:`.evictions`: the reference proxy's ``/reorder`` and ``/evict``;
* :mod:`.metrics`: the proxy's Prometheus metrics;
* :mod:`.cli`: ``contextpilot serve``.

The engine-neutral KV-event pieces live in the integration layer, where the
Ray router (:mod:`contextpilot_engine.routing`) shares them:
:mod:`contextpilot_engine.integration.kv_wire` (the engines' wire format,
applied to a page mirror) and :mod:`contextpilot_engine.integration.kv_events`
(the subscription, with gaps, replays and restarts).

Nothing here imports an engine.
"""

from __future__ import annotations

__all__ = ["Proxy", "ProxyConfig", "ProxyStartError", "EventSource"]


def __getattr__(name: str):
    # lazily, so `contextpilot --help` and the core never import Starlette or httpx
    if name in ("Proxy", "ProxyConfig", "ProxyStartError"):
        from . import app

        return getattr(app, name)
    if name == "EventSource":
        from contextpilot_engine.integration.kv_events import EventSource

        return EventSource
    raise AttributeError(name)
