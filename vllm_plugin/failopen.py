"""Fail-open helpers and careful monkeypatching.

The plugin runs inside somebody else's inference server.  Whatever goes wrong
in *our* code must never fail a request or stop the engine: the request is
served as if the plugin were absent, and the problem is logged.  Two tools
implement that here:

* :func:`report_failure` logs an exception with its traceback the first time
  a *kind* of failure happens (later ones are only counted, so a bug hit on
  every request cannot flood the log); :func:`failure_counts` exposes the
  counters for tests and monitoring.
* :func:`patch_method` replaces a vLLM method only after checking that its
  signature is the one the wrapper was written against.  A vLLM release that
  changed the signature gets a clear warning and keeps its original method,
  instead of a wrapper that would misread the arguments.  Patching is
  idempotent (a marker on the wrapper), and the original stays reachable for
  tests (:func:`original`).
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
from collections import Counter
from typing import Any, Callable, Sequence

__all__ = [
    "logger",
    "report_failure",
    "failure_counts",
    "reset_failure_counts",
    "patch_method",
    "is_patched",
    "original",
    "SignatureMismatch",
]

#: a child of vLLM's "vllm" logger, so messages follow vLLM's format and VLLM_LOGGING_LEVEL
logger = logging.getLogger("vllm.contextpilot")

_lock = threading.Lock()
_counts: Counter = Counter()
_MARK = "__contextpilot_original__"


def report_failure(kind: str, exc: BaseException, detail: str = "") -> None:
    """Record a failure of our code; the first of each kind is logged with its traceback."""
    with _lock:
        _counts[kind] += 1
        first = _counts[kind] == 1
    if first:
        logger.error(
            "contextpilot: %s failed (%s: %s)%s; continuing without contextpilot for this %s. "
            "Further failures of this kind are counted, not logged.",
            kind,
            type(exc).__name__,
            exc,
            f" [{detail}]" if detail else "",
            "request" if kind.startswith("request") else "operation",
            exc_info=exc,
        )


def failure_counts() -> dict[str, int]:
    with _lock:
        return dict(_counts)


def reset_failure_counts() -> None:
    with _lock:
        _counts.clear()


class SignatureMismatch(RuntimeError):
    """A vLLM method's signature is not the one a wrapper expects."""


def _parameter_names(func: Callable) -> list[str]:
    return list(inspect.signature(func).parameters)


def is_patched(owner: type, name: str) -> bool:
    return hasattr(owner.__dict__.get(name), _MARK) or hasattr(
        getattr(owner.__dict__.get(name), "__func__", None), _MARK
    )


def original(owner: type, name: str) -> Callable:
    """The method as vLLM defined it (unwrapping our patch if present)."""
    attr = owner.__dict__[name]
    func = getattr(attr, "__func__", attr)
    return getattr(func, _MARK, func)


def patch_method(
    owner: type,
    name: str,
    make_wrapper: Callable[[Callable], Callable],
    expected_params: Sequence[str],
    *,
    prefix_only: bool = False,
) -> bool:
    """Replace ``owner.name`` by ``make_wrapper(original)`` if its signature matches.

    ``expected_params`` lists the parameter names (``self``/``cls`` included
    for plain and class methods).  With ``prefix_only`` the method may have
    further parameters after them, which the wrapper must pass through
    untouched.  Static and class methods keep their kind.  Returns True when the wrapper is (already) in place, False
    when the signature did not match (a warning is logged).
    """
    raw = owner.__dict__.get(name)
    if raw is None:
        logger.warning("contextpilot: %s.%s does not exist in this vLLM; that hook is disabled", owner.__name__, name)
        return False
    func = getattr(raw, "__func__", raw)
    if hasattr(func, _MARK):
        return True
    params = _parameter_names(func)
    expected = list(expected_params)
    ok = params[: len(expected)] == expected if prefix_only else params == expected
    if not ok:
        logger.warning(
            "contextpilot: %s.%s has parameters %s, expected %s%s; this vLLM version is not supported by "
            "that hook, which stays disabled (vLLM behaves as without contextpilot there)",
            owner.__name__,
            name,
            params,
            expected,
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


def call_safely(kind: str, func: Callable[..., Any], *args: Any, default: Any = None, **kwargs: Any) -> Any:
    """``func(*args, **kwargs)``, or ``default`` after :func:`report_failure` if it raises."""
    try:
        return func(*args, **kwargs)
    except Exception as exc:  # fail open: never let our code break the engine
        report_failure(kind, exc)
        return default
