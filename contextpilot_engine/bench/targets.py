"""The issues' acceptance targets, evaluated on a suite result.

* hit ratio: ours at least 1.08x the reference on every workload, at page
  16 with an unlimited and with the small cache, compared mode for mode
  (ours offline vs reference offline, ours online vs reference online);
  on the real-corpus workloads the online bar is 1.3x (issue 11: the
  engine plugin is online by nature, so the online gap is the product's);
* online against our own batch plan (real-corpus workloads): ours online at
  least 0.7x ours offline on the same trace, at both cache sizes, and a
  stretch line at 0.8x that is reported but not counted with the targets;
* speed: ``optimize_batch`` at least 20x faster than the reference's batch
  reorder on the same batch;
* engine: the real engine ranks the methods as the simulator does.

Each check carries the measured numbers, a ``status`` (``pass``, ``fail``,
or ``not meaningful at this size``: speed ratios of the tiny batches of a
``--smoke`` run measure fixed costs, not the algorithms) and, when it fails,
where the gap is: for the offline checks how close the reference already
is to the nested bound (which caps the ratio any method can reach); for the
online ones how much of the online bound (:func:`.bounds.online_bound`,
arrival order, page 16; with the small cache, the bound for an LRU cache of
that size, :func:`.bounds.online_lru_overlaps`) each side reaches, which
says whether the gap is in our online order or in what arrival order allows
at all.
"""

from __future__ import annotations

__all__ = [
    "evaluate_targets",
    "HIT_TARGET",
    "REAL_ONLINE_TARGET",
    "ONLINE_OF_OFFLINE_TARGET",
    "ONLINE_OF_OFFLINE_STRETCH",
    "SPEED_TARGET",
    "NOT_MEANINGFUL",
]

NOT_MEANINGFUL = "not meaningful at this size"

HIT_TARGET = 1.08
#: ours online over the reference's online mode, on the real-corpus workloads
REAL_ONLINE_TARGET = 1.3
#: ours online over ours offline on the same real-corpus trace, and the stretch goal
ONLINE_OF_OFFLINE_TARGET = 0.7
ONLINE_OF_OFFLINE_STRETCH = 0.8
SPEED_TARGET = 20.0
PAGE = "page16"
#: the ``source`` of real-corpus entries (set by the suite)
REAL_SOURCE = "real corpus"


def _hit(entry: dict, cap: str) -> float | None:
    try:
        return entry["sim"][PAGE][cap]["hit_ratio"]
    except KeyError:
        return None


def _gap_note(wl: dict, ours: str, ref: str, cap: str, target: float) -> str:
    """Where an ours-vs-reference gap is: the nested bound for batch plans, the online bound for online runs."""
    m = wl["methods"]
    if m[ours].get("kind") == "online" and _online_share(wl, ref) is not None:
        return _online_gap(wl, ours, ref, cap, target)
    share = m[ref].get("share_nested")
    ours_share = m[ours].get("share_nested")
    parts = []
    if share is not None:
        ceiling = 1.0 / share if share else float("inf")
        parts.append(
            f"the reference already reaches {share:.0%} of the nested bound (ours {ours_share:.0%}), "
            f"so no method can beat it by more than {ceiling:.2f}x in block reuse"
        )
        if ceiling >= target and ours_share is not None:
            parts.append(f"{target}x needs ours at about {target * share:.0%} of it")
    ours_hit, ref_hit = _hit(m[ours], cap), _hit(m[ref], cap)
    if ours_hit is not None and ref_hit is not None and ours_hit < ref_hit:
        parts.append("ours is below the reference here")
    return "; ".join(parts)


def _online_share(wl: dict, method: str, cap: str = "unlimited") -> float | None:
    """``method``'s cached tokens at page 16 (``cap`` cache) over the page-16 online bound."""
    bound = wl.get("bounds", {}).get("online_hits", {}).get(PAGE)
    entry = wl["methods"].get(method, {})
    if not bound or not entry.get("arrival_order"):
        return None
    try:
        return entry["sim"][PAGE][cap]["cached"] / bound
    except KeyError:
        return None


def _cache_words(cap: str) -> str:
    return "" if cap == "unlimited" else f" (at the {cap} cache, against the unlimited-cache bound)"


def _online_gap(wl: dict, ours: str, ref: str, cap: str, target: float) -> str:
    o, r = _online_share(wl, ours, cap), _online_share(wl, ref, cap)
    if o is None or r is None:
        return ""
    ceiling = 1.0 / r if r else float("inf")
    note = (f"ours online reaches {o:.0%} of the online bound (page 16), the reference {r:.0%}"
            f"{_cache_words(cap)}, so no arrival-order method can beat the reference by more than {ceiling:.2f}x")
    if ceiling >= target:
        note += f"; {target}x needs ours at {target * r:.0%} of the bound"
    return note


def _offline_gap(wl: dict, cap: str, target: float) -> str:
    """Why ours online is short of ``target`` x ours offline: the online bound against the batch plan.

    With the small cache the bound is the one for an LRU cache of that size
    (:func:`.bounds.online_lru_overlaps`) where the result has it.
    """
    m = wl["methods"]
    bounds = wl.get("bounds", {})
    lru = bounds.get("online_lru_hits", {}).get(cap, {}).get(PAGE) if cap != "unlimited" else None
    bound = lru or bounds.get("online_hits", {}).get(PAGE)
    try:
        offline = m["ours offline"]["sim"][PAGE][cap]["cached"]
        online = m["ours online"]["sim"][PAGE][cap]["cached"] if m["ours online"].get("arrival_order") else None
    except KeyError:
        return ""
    if online is None or not bound or not offline:
        return ""
    ceiling = bound / offline
    which = f"the online bound for an LRU cache of this size (page 16, {cap})" if lru else \
        f"the online bound (page 16){_cache_words(cap)}"
    note = f"ours online reaches {online / bound:.0%} of {which}; the bound is {ceiling:.2f}x ours offline's cached tokens"
    if ceiling < target:
        return note + f", so no arrival-order method reaches {target}x the batch plan here"
    return note + f", so the gap is in the online order: {target}x needs {target / ceiling:.0%} of the bound"


def evaluate_targets(result: dict) -> list[dict]:
    checks = _checks(result)
    smoke = bool(result.get("meta", {}).get("smoke"))
    for c in checks:
        if smoke and "faster" in c["target"]:
            c["status"], c["pass"] = NOT_MEANINGFUL, None
        else:
            c["status"] = "pass" if c["pass"] else "fail"
    return checks


def _checks(result: dict) -> list[dict]:
    checks: list[dict] = []
    for name, wl in result.get("workloads", {}).items():
        m = wl["methods"]
        real = wl.get("source") == REAL_SOURCE
        caps = [c for c in next(iter(m.values()))["sim"][PAGE]]
        for ours, ref in (("ours offline", "reference offline"), ("ours online", "reference online")):
            if ours not in m or ref not in m:
                continue
            target = REAL_ONLINE_TARGET if real and ours == "ours online" else HIT_TARGET
            for cap in caps:
                o, r = _hit(m[ours], cap), _hit(m[ref], cap)
                if o is None or r is None:
                    continue
                crash = m[ref].get("crashed_after")
                before = m[ref].get("sim_before_crash")
                like_for_like = crash is not None and bool(before) and "sim_before_crash" in m[ours]
                if like_for_like:
                    # both online runs on the requests the reference served
                    o = m[ours]["sim_before_crash"][cap]["hit_ratio"]
                    r = before[cap]["hit_ratio"]
                # no reuse at all on either side is no evidence of being better
                ratio = o / r if r else (float("inf") if o else None)
                ok = ratio is not None and ratio >= target
                note = "" if ok else _gap_note(wl, ours, ref, cap, target)
                if ratio is None:
                    note = "neither method reuses anything here"
                if like_for_like:
                    note = (note + "; " if note else "") + (
                        f"the reference crashed after {crash} requests; compared on those {crash}"
                    )
                checks.append(
                    {
                        "target": f"hit ratio >= {target}x reference ({ours.split()[1]}, {cap} cache)",
                        "workload": name,
                        "ours": o,
                        "reference": r,
                        "ratio": ratio,
                        "pass": ok,
                        "note": note,
                    }
                )
        if real and "ours online" in m and "ours offline" in m:
            for cap in caps:
                o, b = _hit(m["ours online"], cap), _hit(m["ours offline"], cap)
                if o is None or not b:
                    continue
                for target, stretch in ((ONLINE_OF_OFFLINE_TARGET, False), (ONLINE_OF_OFFLINE_STRETCH, True)):
                    ok = o / b >= target
                    checks.append(
                        {
                            "target": f"ours online >= {target}x ours offline ({cap} cache)"
                            + (" (stretch)" if stretch else ""),
                            "workload": name,
                            "ours": o,
                            "reference": b,
                            "ratio": o / b,
                            "pass": ok,
                            "stretch": stretch,
                            "note": "" if ok else _offline_gap(wl, cap, target),
                        }
                    )
        if "ours offline" in m and "reference offline" in m:
            a, b = m["ours offline"]["seconds"], m["reference offline"]["seconds"]
            if a and b:
                checks.append(
                    {
                        "target": f"optimize_batch >= {SPEED_TARGET:.0f}x faster than reference",
                        "workload": f"{name} ({wl['stats']['requests']} requests)",
                        "ours": a,
                        "reference": b,
                        "ratio": b / a,
                        "pass": b / a >= SPEED_TARGET,
                        "note": "",
                    }
                )
    for row in result.get("overhead", {}).get("speedup", []):
        checks.append(
            {
                "target": f"optimize_batch >= {SPEED_TARGET:.0f}x faster than reference",
                "workload": f"rag-top20 overhead batch ({row['contexts']} requests)",
                "ours": row["ours_seconds"],
                "reference": row["reference_seconds"],
                "ratio": row["speedup"],
                "pass": row["speedup"] >= SPEED_TARGET,
                "note": "",
            }
        )
    for name, variants in result.get("engine", {}).get("agreement", {}).items():
        for variant, agree in variants.items():
            checks.append(
                {
                    "target": "engine ranks methods as the simulator does",
                    "workload": f"{name} ({variant} cache)",
                    "ours": None,
                    "reference": None,
                    "ratio": None,
                    "pass": not agree["discordant"],
                    "note": "; ".join(agree["discordant"]),
                }
            )
    return checks
