"""Prometheus metrics of the integration layer, in the registry the engine already exports.

vLLM and SGLang serve ``/metrics`` from ``prometheus_client``'s default
registry (or its multiprocess collector when ``PROMETHEUS_MULTIPROC_DIR`` is
set), so metrics created here appear next to the engine's own without any
route of ours.  They are created on first use, once per process, and every
function is a no-op where ``prometheus_client`` is not installed (the library
alone never needs it).

Names follow the engines' ``prefix:name`` style:

* ``contextpilot:requests_total{outcome,reason}``: requests that carried
  context blocks, by what happened (``rewritten``, ``skipped``,
  ``failed_open``) and why;
* ``contextpilot:blocks_total``, ``..._blocks_moved_total``,
  ``..._blocks_deduplicated_total``, ``..._dedup_tokens_saved_total``,
  ``..._expected_cached_tokens_total``: what rewritten requests got;
* ``contextpilot:failures_total{reason}``: our failures, by reason code;
* ``contextpilot:mirror_events_total{op}``: page events applied to the
  request side's index (``stored``, ``removed``, ``cleared``);
* ``contextpilot:mirror_lag_seconds``: time from a cache change in the
  engine process to its application on the request side (cross-process
  mirrors only);
* ``contextpilot:request_overhead_seconds``: what the request path adds
  between receiving a request and handing its tokens to the engine;
* ``contextpilot:memory_budget_bytes`` (and ``..._budget_entries`` when an
  entry limit is set), ``contextpilot:memory_used_bytes{structure}``,
  ``contextpilot:memory_used_entries{structure}`` and
  ``contextpilot:memory_evictions_total{structure,reason}``: the process
  memory budget (:mod:`contextpilot_engine.memory_budget`), read when
  ``/metrics`` is scraped.  The ``mirror`` structure (the engine's cached
  pages) is reported but lies outside the budget.

The budget's figures are gauges of the moment, so they come from a collector
that reads the budget at scrape time rather than from values pushed on the
request path; a collector is not exported by ``prometheus_client``'s
multiprocess mode, where those metrics are absent.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Mapping

__all__ = [
    "LazyMetrics",
    "BudgetCollector",
    "count_request",
    "count_rewrite",
    "count_failure",
    "count_mirror_events",
    "observe_lag",
    "observe_overhead",
    "available",
]

_LAG_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)
_OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.01, 0.025, 0.1)


class LazyMetrics:
    """Metrics created on first use, so that importing a module registers nothing.

    ``build(prometheus_client)`` creates them (a dict by name); calling the
    object returns that dict, or None when ``prometheus_client`` is not
    installed (every metric function is then a no-op).  Thread-safe: the
    metrics are built once.
    """

    def __init__(self, build: Callable[[Any], dict[str, Any]]):
        self._build = build
        self._lock = threading.Lock()
        self._metrics: dict[str, Any] | None = None
        self._unavailable = False

    def __call__(self) -> dict[str, Any] | None:
        if self._metrics is not None or self._unavailable:
            return self._metrics
        with self._lock:
            if self._metrics is None and not self._unavailable:
                try:
                    import prometheus_client
                except ImportError:
                    self._unavailable = True
                    return None
                self._metrics = self._build(prometheus_client)
            return self._metrics


def _build(prom: Any) -> dict[str, Any]:
    Counter, Histogram = prom.Counter, prom.Histogram
    p = "contextpilot:"
    metrics = {
        "requests": Counter(p + "requests", "Requests carrying context blocks, by outcome and reason.",
                            ["outcome", "reason"]),
        "blocks": Counter(p + "blocks", "Context blocks in rewritten requests."),
        "moved": Counter(p + "blocks_moved", "Blocks placed at another position than sent."),
        "deduplicated": Counter(p + "blocks_deduplicated",
                                "Blocks replaced by a hint to their copy elsewhere in the prompt."),
        "saved": Counter(p + "dedup_tokens_saved", "Prompt tokens saved by deduplication."),
        "expected": Counter(p + "expected_cached_tokens",
                            "Prompt tokens the index expected the engine to find cached."),
        "failures": Counter(p + "failures", "Failures of contextpilot (requests served unmodified), by reason.",
                            ["reason"]),
        "events": Counter(p + "mirror_events", "Cache page events applied to the request side's index.", ["op"]),
        "lag": Histogram(p + "mirror_lag_seconds",
                         "Time from a cache change in the engine to its application on the request side.",
                         buckets=_LAG_BUCKETS),
        "overhead": Histogram(p + "request_overhead_seconds",
                              "Time the request path adds before the engine gets the prompt's tokens.",
                              buckets=_OVERHEAD_BUCKETS),
    }
    try:
        prom.REGISTRY.register(BudgetCollector())
    except ValueError:  # already registered (a module reloaded): the first collector reports
        pass
    return metrics


_get = LazyMetrics(_build)


class BudgetCollector:
    """Reads a memory budget when the registry is scraped (default: the process budget)."""

    def __init__(self, budget: Any = None):
        self._budget = budget

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        from contextpilot_engine.memory_budget import process_budget

        stats = (self._budget or process_budget()).stats()
        p = "contextpilot:"
        if stats["limit_bytes"] is not None:
            yield GaugeMetricFamily(p + "memory_budget_bytes", "The process memory budget, in bytes.",
                                    value=stats["limit_bytes"])
        if stats["limit_entries"] is not None:
            yield GaugeMetricFamily(p + "memory_budget_entries", "The process memory budget, in entries.",
                                    value=stats["limit_entries"])
        used_b = GaugeMetricFamily(p + "memory_used_bytes",
                                   "Approximate resident bytes per structure (mirror: outside the budget).",
                                   labels=["structure"])
        used_e = GaugeMetricFamily(p + "memory_used_entries",
                                   "Entries per structure (mirror: outside the budget).", labels=["structure"])
        for name, use in stats["structures"].items():
            used_b.add_metric([name], use["bytes"])
            used_e.add_metric([name], use["entries"])
        yield used_b
        yield used_e
        evictions = CounterMetricFamily(p + "memory_evictions", "Entries evicted, by structure and reason.",
                                        labels=["structure", "reason"])
        for name, reasons in stats["evictions"].items():
            for reason, count in reasons.items():
                evictions.add_metric([name, reason], count["entries"])
        yield evictions

    def describe(self) -> Any:
        return []  # names are known only when scraped; nothing to check them against at registration


def available() -> bool:
    return _get() is not None


def count_request(outcome: str, reason: str = "") -> None:
    m = _get()
    if m is not None:
        m["requests"].labels(outcome, reason).inc()


def count_rewrite(report: Mapping[str, Any]) -> None:
    """One rewritten request, with its report's block figures."""
    m = _get()
    if m is None:
        return
    m["requests"].labels("rewritten", "").inc()
    for key, name in (
        ("blocks", "blocks"),
        ("blocks_moved", "moved"),
        ("blocks_deduplicated", "deduplicated"),
        ("tokens_saved_by_dedup", "saved"),
        ("expected_cached_tokens", "expected"),
    ):
        value = report.get(key) or 0
        if value:
            m[name].inc(value)


def count_failure(reason: str) -> None:
    m = _get()
    if m is not None:
        m["failures"].labels(reason).inc()


def count_mirror_events(stored: int = 0, removed: int = 0, cleared: int = 0) -> None:
    m = _get()
    if m is None:
        return
    for op, n in (("stored", stored), ("removed", removed), ("cleared", cleared)):
        if n:
            m["events"].labels(op).inc(n)


def observe_lag(seconds: float) -> None:
    m = _get()
    if m is not None:
        m["lag"].observe(seconds)


def observe_overhead(seconds: float) -> None:
    m = _get()
    if m is not None:
        m["overhead"].observe(seconds)
