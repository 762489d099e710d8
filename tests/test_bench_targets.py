"""The targets on hand-made suite results: which bar applies where, and what a gap note blames.

Real-corpus workloads carry issue 11's bars (online 1.3x the reference's
online mode; ours online 0.7x ours offline, 0.8x as an uncounted stretch
line); synthetic ones keep 1.08x.  A missed online target names the share of
the online bound each side reaches, and says whether arrival order itself
caps the ratio.
"""

from __future__ import annotations

from contextpilot_engine.bench.targets import evaluate_targets


def _method(kind: str, hits: dict[str, float], prompt: int = 10_000, arrival: bool = True, **extra) -> dict:
    sim = {"page16": {cap: {"hit_ratio": h, "cached": int(h * prompt), "prompt": prompt} for cap, h in hits.items()}}
    return {"kind": kind, "sim": sim, "arrival_order": arrival, "seconds": extra.pop("seconds", None), **extra}


def _workload(source: str, online_bound: int, ours_on, ours_off, ref_on, ref_off) -> dict:
    return {
        "source": source,
        "stats": {"requests": 100},
        "bounds": {"online_hits": {"page16": online_bound}},
        "methods": {
            "ours offline": _method("offline", ours_off, arrival=False, share_nested=0.85, seconds=0.1),
            "ours online": _method("online", ours_on),
            "reference offline": _method("offline", ref_off, arrival=False, share_nested=0.8, seconds=3.0),
            "reference online": _method("online", ref_on),
        },
    }


def _checks(result: dict, workload: str) -> dict:
    return {c["target"]: c for c in evaluate_targets(result) if c["workload"] == workload}


def test_real_corpus_bars_and_stretch_lines():
    hits = dict(ours_on={"unlimited": 0.30, "25%": 0.20}, ours_off={"unlimited": 0.40, "25%": 0.40},
                ref_on={"unlimited": 0.25, "25%": 0.10}, ref_off={"unlimited": 0.36, "25%": 0.36})
    result = {"meta": {}, "workloads": {"real-x": _workload("real corpus", 5_000, **hits),
                                         "syn": _workload("synthetic", 5_000, **hits)}}
    real, syn = _checks(result, "real-x"), _checks(result, "syn")
    # online 0.30 / 0.25 = 1.2x: enough for the synthetic bar, not for the real-corpus one
    assert syn["hit ratio >= 1.08x reference (online, unlimited cache)"]["pass"]
    online = real["hit ratio >= 1.3x reference (online, unlimited cache)"]
    assert not online["pass"] and "online bound" in online["note"]
    assert "ours online reaches 60% of the online bound (page 16), the reference 50%" in online["note"]
    assert "1.3x needs ours at 65% of the bound" in online["note"]
    assert real["hit ratio >= 1.3x reference (online, 25% cache)"]["pass"]  # 0.20 / 0.10
    assert real["hit ratio >= 1.08x reference (offline, unlimited cache)"]["pass"]  # 0.40 / 0.36 = 1.11x
    # ours online over ours offline: 0.75x passes 0.7x, misses the 0.8x stretch
    assert real["ours online >= 0.7x ours offline (unlimited cache)"]["pass"]
    stretch = real["ours online >= 0.8x ours offline (unlimited cache) (stretch)"]
    assert stretch["stretch"] and not stretch["pass"] and stretch["status"] == "fail"
    assert "the gap is in the online order" in stretch["note"]  # the bound is 5000 / 4000 = 1.25x offline
    low = real["ours online >= 0.7x ours offline (25% cache)"]
    assert not low["pass"] and "against the unlimited-cache bound" in low["note"]
    assert not any("ours offline" in t and "ours online" in t for t in syn)  # real-corpus only


def test_when_arrival_order_itself_caps_the_ratio_the_note_says_so():
    hits = dict(ours_on={"unlimited": 0.20}, ours_off={"unlimited": 0.40}, ref_on={"unlimited": 0.10},
                ref_off={"unlimited": 0.36})
    result = {"meta": {}, "workloads": {"real-y": _workload("real corpus", 2_400, **hits)}}
    check = _checks(result, "real-y")["ours online >= 0.7x ours offline (unlimited cache)"]
    assert not check["pass"]
    assert "the bound is 0.60x ours offline's cached tokens" in check["note"]
    assert "no arrival-order method reaches 0.7x the batch plan" in check["note"]
