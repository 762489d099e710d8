"""Fail-open: our failures never fail a request or an engine, and never go unnoticed.

Every adapter runs inside somebody else's inference server.  Whatever goes
wrong in *our* code, the request is served as if contextpilot were absent and
the engine keeps running.  Three tools make that safe and visible:

* :func:`report_failure` records one failure under a short *reason code*
  (``rewrite_error``, ``mirror_error``, ...).  Every failure is counted (see
  :func:`failure_counts` and the ``contextpilot:failures`` metric) and logged
  as one line naming the reason; lines of one reason are rate limited, and a
  line that follows suppressed ones says how many it stands for, so a bug hit
  on every request neither floods the log nor disappears from it.  The
  traceback goes to the DEBUG level.
* Client errors are not failures: adapters pass them through as the engine's
  own errors and never call :func:`report_failure` for them.
* :func:`patch_method` replaces an engine method only after checking that its
  signature is the one the wrapper was written against; an engine release that
  changed it gets a warning and keeps its original method.  :func:`once` makes
  an install function idempotent and thread safe.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
import time
from collections import Counter
from typing import Any, Callable, Sequence, TypeVar

__all__ = [
    "logger",
    "use_logger",
    "report_failure",
    "failure_counts",
    "reset_failure_counts",
    "call_safely",
    "check_signature",
    "patch_method",
    "is_patched",
    "original",
    "once",
    "LOG_INTERVAL_S",
]

#: at most one log line per failure reason in this many seconds
LOG_INTERVAL_S = 10.0


class _Logger:
    """The logger every contextpilot module writes to; an adapter points it at the engine's own.

    Messages then follow the engine's format and its level settings (for
    vLLM, a child of the ``vllm`` logger obeys ``VLLM_LOGGING_LEVEL``).
    """

    def __init__(self) -> None:
        self.target = logging.getLogger("contextpilot")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.target, name)


logger = _Logger()


def use_logger(name: str) -> None:
    """Send contextpilot's log lines to the logger ``name`` (e.g. ``"vllm.contextpilot"``)."""
    logger.target = logging.getLogger(name)


_lock = threading.Lock()
_counts: Counter = Counter()
#: reason -> (monotonic time of the last line logged, failures suppressed since)
_last_logged: dict[str, tuple[float, int]] = {}


def report_failure(reason: str, exc: BaseException, detail: str = "") -> None:
    """Count a failure of our code under ``reason`` and log it (rate limited per reason)."""
    now = time.monotonic()
    with _lock:
        _counts[reason] += 1
        last, suppressed = _last_logged.get(reason, (-LOG_INTERVAL_S, 0))
        log_now = now - last >= LOG_INTERVAL_S
        _last_logged[reason] = (now, 0) if log_now else (last, suppressed + 1)
    from . import metrics

    metrics.count_failure(reason)
    if not log_now:
        return
    more = f" ({suppressed} more since the last line)" if suppressed else ""
    logger.warning(
        "contextpilot: %s: %s: %s%s; served without contextpilot%s",
        reason,
        type(exc).__name__,
        _one_line(str(exc)),
        f" [{detail}]" if detail else "",
        more,
    )
    logger.debug("contextpilot: %s traceback", reason, exc_info=exc)


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def failure_counts() -> dict[str, int]:
    with _lock:
        return dict(_counts)


def reset_failure_counts() -> None:
    with _lock:
        _counts.clear()
        _last_logged.clear()


def call_safely(reason: str, func: Callable[..., Any], *args: Any, default: Any = None, **kwargs: Any) -> Any:
    """``func(*args, **kwargs)``, or ``default`` after :func:`report_failure` if it raises."""
    try:
        return func(*args, **kwargs)
    except Exception as exc:  # fail open: never let our code break the engine
        report_failure(reason, exc)
        return default


# ------------------------------------------------------------------ patching
_MARK = "__contextpilot_original__"


def check_signature(
    func: Callable, expected: Sequence[str | None], *, prefix_only: bool = False
) -> list[str] | None:
    """None when ``func``'s parameter names are ``expected`` (or start with them); else the names it has.

    A ``None`` in ``expected`` matches any name at that position.
    """
    params = list(inspect.signature(func).parameters)
    want = list(expected)
    if len(params) < len(want) or (not prefix_only and len(params) != len(want)):
        return params
    return None if all(w is None or p == w for p, w in zip(params, want)) else params


def is_patched(owner: type, name: str) -> bool:
    attr = owner.__dict__.get(name)
    return hasattr(attr, _MARK) or hasattr(getattr(attr, "__func__", None), _MARK)


def original(owner: type, name: str) -> Callable:
    """The method as the engine defined it (unwrapping our patch if present)."""
    attr = owner.__dict__[name]
    func = getattr(attr, "__func__", attr)
    return getattr(func, _MARK, func)


def patch_method(
    owner: type,
    name: str,
    make_wrapper: Callable[[Callable], Callable],
    expected_params: Sequence[str | None],
    *,
    prefix_only: bool = False,
) -> bool:
    """Replace ``owner.name`` by ``make_wrapper(original)`` if its signature matches.

    ``expected_params`` lists the parameter names (``self``/``cls`` included
    for plain and class methods).  With ``prefix_only`` the method may have
    further parameters after them, which the wrapper must pass through
    untouched.  Static and class methods keep their kind.  Returns True when
    the wrapper is (already) in place, False when the method is missing or
    its signature did not match (a warning is logged).
    """
    raw = owner.__dict__.get(name)
    if raw is None:
        logger.warning("contextpilot: %s.%s does not exist in this engine; that hook is disabled", owner.__name__, name)
        return False
    func = getattr(raw, "__func__", raw)
    if hasattr(func, _MARK):
        return True
    found = check_signature(func, expected_params, prefix_only=prefix_only)
    if found is not None:
        logger.warning(
            "contextpilot: %s.%s has parameters %s, expected %s%s; this engine version is not supported by "
            "that hook, which stays disabled (the engine behaves as without contextpilot there)",
            owner.__name__,
            name,
            found,
            list(expected_params),
            " (then any others)" if prefix_only else "",
        )
        return False
    wrapper = make_wrapper(func)
    functools.update_wrapper(wrapper, func)
    setattr(wrapper, _MARK, func)
    if isinstance(raw, staticmethod):
        setattr(owner, name, staticmethod(wrapper))
    elif isinstance(raw, classmethod):
        setattr(owner, name, classmethod(wrapper))
    else:
        setattr(owner, name, wrapper)
    return True


T = TypeVar("T")


def once(install: Callable[[], T]) -> Callable[[], T]:
    """Make a no-argument install function run once per process; later calls return its first result.

    A call that raised is not remembered, so a later call tries again.
    """
    lock = threading.Lock()
    done: list[T] = []

    @functools.wraps(install)
    def wrapper() -> T:
        with lock:
            if not done:
                done.append(install())
            return done[0]

    def reset() -> None:  # for tests
        with lock:
            done.clear()

    wrapper.reset = reset  # type: ignore[attr-defined]
    return wrapper
