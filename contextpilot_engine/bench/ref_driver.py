"""Drive the reference ContextPilot (``pip install contextpilot==0.5.0``) inside its own venv.

Run by :mod:`contextpilot_engine.bench.reference` as
``<ref-python> ref_driver.py IN.json OUT.json``; it must import nothing from
this project (the reference venv does not have it).  Blocks arrive as
integer ids (the reference treats documents as opaque ids; it does not
weigh them by tokens, so ids lose nothing).

Modes (``IN.json["mode"]``):

* ``offline``: one ``ContextPilot(use_gpu=False).reorder(contexts)`` call
  on the whole batch; returns its execution order and reordered contexts;
* ``offline_many``: the same on each of several small batches (fresh
  instance each);
* ``online``: one stateful instance, one ``reorder([context])`` call per
  request in arrival order (``conversation_id`` passed where the request has
  one); a failing call ends the run and is reported as
  ``crashed_after = number of requests served`` with the error text.

Times are taken inside this process around the calls only, so the
interpreter start and the reference's imports are excluded.  The reference
prints banners on stdout; they are swallowed.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import time
import traceback
import warnings


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("contextpilot")
    except Exception:  # pragma: no cover - metadata missing
        return "unknown"


def _peak_rss_mb() -> float | None:
    """This process's peak RSS (VmHWM; ru_maxrss would include the parent's peak, carried over exec)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _quiet():
    return contextlib.redirect_stdout(io.StringIO())


def _offline(ContextPilot, contexts, repeats: int = 1):
    """The first run's output; ``seconds`` is the median over ``repeats`` fresh instances."""
    times, first = [], None
    for _ in range(max(1, repeats)):
        pilot = ContextPilot(use_gpu=False)
        start = time.perf_counter()
        with _quiet():
            reordered, order = pilot.reorder([list(c) for c in contexts])
        times.append(time.perf_counter() - start)
        if first is None:
            first = (reordered, order)
    reordered, order = first
    times.sort()
    return {
        "order": [int(i) for i in order],
        "reordered": [[int(x) for x in c] for c in reordered],
        "seconds": times[len(times) // 2],
        "all_seconds": times,
    }


def _online(ContextPilot, contexts, conversations):
    pilot = ContextPilot(use_gpu=False)
    out, latencies = [], []
    error = None
    for i, ctx in enumerate(contexts):
        cid = conversations[i] if conversations else None
        start = time.perf_counter()
        try:
            with _quiet():
                if cid is None:
                    reordered, _ = pilot.reorder([list(ctx)])
                else:
                    reordered, _ = pilot.reorder([list(ctx)], conversation_id=cid)
        except Exception as exc:  # the reference's known crash, or any other
            error = f"{type(exc).__name__}: {exc}"
            tb = traceback.format_exc().strip().splitlines()
            error += " | " + " / ".join(line.strip() for line in tb[-3:])
            break
        latencies.append(time.perf_counter() - start)
        out.append([int(x) for x in reordered[0]])
    return {
        "reordered": out,
        "latencies": latencies,
        "crashed_after": None if error is None else len(out),
        "error": error,
        "seconds": sum(latencies),
    }


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: ref_driver.py IN.json OUT.json", file=sys.stderr)
        return 2
    with open(argv[1]) as fh:
        job = json.load(fh)
    warnings.simplefilter("ignore")
    with _quiet():
        from contextpilot.server.live_index import ContextPilot
    mode = job["mode"]
    if mode == "offline":
        result = _offline(ContextPilot, job["contexts"], int(job.get("repeats", 1)))
    elif mode == "offline_many":
        result = {"results": [_offline(ContextPilot, b) for b in job["batches"]]}
    elif mode == "online":
        result = _online(ContextPilot, job["contexts"], job.get("conversations"))
    else:
        print(f"unknown mode {mode!r}", file=sys.stderr)
        return 2
    result["version"] = _version()
    result["max_rss_mb"] = _peak_rss_mb()
    with open(argv[2], "w") as fh:
        json.dump(result, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
