"""The proxy's own Prometheus metrics, next to the integration layer's in the default registry.

``/metrics`` of the proxy serves the default registry, so it shows the
integration layer's ``contextpilot:*`` metrics (requests rewritten, blocks,
mirror events and lag, request-path overhead) and these:

* ``contextpilot:proxy_requests_total{endpoint,status}``: requests answered, by route and status code
  (499: the client disconnected before its answer began, and the backend call was dropped);
* ``contextpilot:proxy_backend_errors_total{kind}``: ``unreachable`` (502) or ``timeout`` (504);
* ``contextpilot:proxy_overhead_seconds``: what the proxy adds to a request, its own work only
  (parsing, planning, tokenizing, serialising; not the backend's time, not the settling wait);
* ``contextpilot:proxy_settle_seconds``: time spent waiting for the previous request's KV events;
* ``contextpilot:proxy_cached_tokens_total{source}``: ``expected`` (the index) and ``reported``
  (the backend's ``cached_tokens``) on rewritten requests whose usage says, with
  ``contextpilot:proxy_expected_exact_total{exact}`` counting those requests by whether both agree;
* ``contextpilot:proxy_kv_event_batches_total``, ``contextpilot:proxy_kv_event_resyncs_total{reason}``;
* ``contextpilot:proxy_mode``: 1 while planning against the engine's KV events, 0 on the modelled cache.

Every function is a no-op without ``prometheus_client``.
"""

from __future__ import annotations

from typing import Any

from ..integration.metrics import LazyMetrics

__all__ = ["count_request", "count_backend_error", "observe_overhead", "observe_settle", "count_cached",
           "count_batch", "count_resync", "set_mode", "exposition"]

_BUCKETS = (0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.01, 0.025, 0.1)


def _build(prom: Any) -> dict[str, Any]:
    Counter, Gauge, Histogram = prom.Counter, prom.Gauge, prom.Histogram
    p = "contextpilot:proxy_"
    return {
        "requests": Counter(p + "requests", "Requests answered by the proxy, by route and status.",
                            ["endpoint", "status"]),
        "backend_errors": Counter(p + "backend_errors", "Backend failures answered 502/504.", ["kind"]),
        "overhead": Histogram(p + "overhead_seconds", "What the proxy adds to a request (its own work only).",
                              buckets=_BUCKETS),
        "settle": Histogram(p + "settle_seconds", "Waits for the previous request's KV events before planning.",
                            buckets=_BUCKETS),
        "cached": Counter(p + "cached_tokens", "Cached prompt tokens of rewritten requests, expected by the "
                          "index and reported by the backend.", ["source"]),
        "exact": Counter(p + "expected_exact", "Rewritten requests whose expected cached tokens equal the "
                         "backend's.", ["exact"]),
        "batches": Counter(p + "kv_event_batches", "KV event batches applied to the mirror."),
        "resyncs": Counter(p + "kv_event_resyncs", "Times the mirror was cleared and rebuilt.", ["reason"]),
        "mode": Gauge(p + "mode", "1: planning against the engine's KV events; 0: the modelled cache."),
    }


_get = LazyMetrics(_build)


def count_request(endpoint: str, status: int) -> None:
    m = _get()
    if m is not None:
        m["requests"].labels(endpoint, str(status)).inc()


def count_backend_error(kind: str) -> None:
    m = _get()
    if m is not None:
        m["backend_errors"].labels(kind).inc()


def observe_overhead(seconds: float) -> None:
    m = _get()
    if m is not None:
        m["overhead"].observe(seconds)


def observe_settle(seconds: float) -> None:
    m = _get()
    if m is not None:
        m["settle"].observe(seconds)


def count_cached(expected: int, reported: int) -> None:
    m = _get()
    if m is not None:
        m["cached"].labels("expected").inc(expected)
        m["cached"].labels("reported").inc(reported)
        m["exact"].labels("true" if expected == reported else "false").inc()


def count_batch() -> None:
    m = _get()
    if m is not None:
        m["batches"].inc()


def count_resync(reason: str) -> None:
    m = _get()
    if m is not None:
        m["resyncs"].labels(reason).inc()


def set_mode(mode: str) -> None:
    m = _get()
    if m is not None:
        m["mode"].set(1 if mode == "events" else 0)


def exposition() -> tuple[bytes, str] | None:
    """The default registry in Prometheus' text format and its content type (None without prometheus_client)."""
    if _get() is None:
        return None
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

    from contextpilot_engine.integration import metrics as integration_metrics

    integration_metrics.available()  # make sure the integration's metrics exist before the first request
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
