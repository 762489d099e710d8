"""One workload, every method, every cache setting: the numbers behind the report.

:func:`analyse_workload` runs the methods of :mod:`.methods` on a workload,
checks block conservation, simulates every method's prompts at each page
size with an unlimited and a small cache, computes the bounds of
:mod:`.bounds` and each method's share of them (of the page-floored online
bound only for methods that serve in arrival order, the only ones it
bounds), and measures exact optima on small sub-batches.  Everything
returned is plain JSON data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .. import ContextPilot
from .baselines import frequency_sort
from .bounds import (
    EXACT_MAX,
    dedup_bound,
    exact_optimum,
    intern,
    mst_bound,
    nested_group_bound,
    online_bound,
    online_lru_overlaps,
    online_overlaps,
    overlap_matrix,
    trie_reuse,
)
from .methods import (
    MethodResult,
    _Renderer,
    run_frequency,
    run_ours_offline,
    run_ours_online,
    run_reference_offline,
    run_reference_online,
    run_retrieval,
)
from .prompt_model import LINE_OVERHEAD
from .reference import ReferenceRunner, ReferenceUnavailable
from .scoring import block_reuse, conservation, simulate_prompts, unique_tokens
from .workloads import Workload, workload_stats

__all__ = ["Options", "analyse_workload", "run_methods", "subbatch_study"]


@dataclass
class Options:
    pages: tuple[int, ...] = (1, 16, 32)
    capacity_fraction: float = 0.25
    bound_max_n: int = 4000
    subbatches: int = 20
    subbatch_size: int = 8
    seed: int = 1
    reference: ReferenceRunner | None = None
    subbatch_reference: bool = True  # also plan the sub-batches with the reference (one more subprocess)
    timing_repeats: int = 1  # batch planning times are the median of this many runs (ours and the reference)
    progress: Callable[[str], None] = field(default=lambda msg: None)


def _cap_label(fraction: float) -> str:
    return f"{fraction:.0%}"


def run_methods(
    wl: Workload, count: Callable[[str], int], opts: Options, capacity: int | None
) -> tuple[list[MethodResult], dict[str, MethodResult], dict[str, str]]:
    """All methods on ``wl``: ``(results, capped, errors)``.

    ``results`` holds every method's run; ``capped`` the online runs that
    were told the small cache's ``capacity``, keyed by the method they stand
    in for; ``errors`` the reference runs that failed, keyed by method name.
    """
    renderer = _Renderer(count)
    say = opts.progress
    results: list[MethodResult] = []
    errors: dict[str, str] = {}
    say("retrieval order")
    results.append(run_retrieval(wl, renderer))
    say("frequency sort")
    results.append(run_frequency(wl, renderer))
    say("ours offline")
    results.append(run_ours_offline(wl, count, opts.timing_repeats))
    say("ours online")
    results.append(run_ours_online(wl, count, None))
    capped = {}
    if capacity is not None:
        say("ours online (capacity told)")
        capped["ours online"] = run_ours_online(wl, count, capacity)
    if any(r.conversation for r in wl.requests):
        say("ours online+dedup")
        results.append(run_ours_online(wl, count, None, dedup=True))
        if capacity is not None:
            capped["ours online+dedup"] = run_ours_online(wl, count, capacity, dedup=True)
    if opts.reference is not None:
        runs = (
            ("reference offline", lambda: run_reference_offline(wl, renderer, opts.reference, opts.timing_repeats)),
            ("reference online", lambda: run_reference_online(wl, renderer, opts.reference)),
        )
        for label, fn in runs:
            say(label)
            try:
                results.append(fn())
            except ReferenceUnavailable as exc:
                errors[label] = str(exc)
    return results, capped, errors


def _latency(r: MethodResult) -> dict:
    if not r.latencies:
        return {}
    lat = np.asarray(r.latencies) * 1e3
    return {"latency_p50_ms": float(np.percentile(lat, 50)), "latency_p99_ms": float(np.percentile(lat, 99))}


def subbatch_study(wl: Workload, count: Callable[[str], int], opts: Options) -> dict:
    """Exact optima on small sub-batches of related requests, against ours, the reference and the bounds.

    A sub-batch is a random request plus its ``subbatch_size - 1`` largest
    overlaps (so it has something to share); each method plans it alone.
    """
    m = min(opts.subbatch_size, EXACT_MAX, len(wl.requests))
    if opts.subbatches <= 0 or m < 2:
        return {}
    weight = lambda t: count(t) + LINE_OVERHEAD  # noqa: E731
    full = intern(wl.contexts, weight)
    rng = np.random.default_rng(opts.seed)
    batches = []
    rows = [set(r.tolist()) for r in full.rows]
    for _ in range(opts.subbatches):
        s = int(rng.integers(len(rows)))
        ov = np.array([int(full.weights[list(rows[s] & rows[j])].sum()) if j != s else -1 for j in range(len(rows))])
        nb = [s] + np.argsort(-ov, kind="stable")[: m - 1].tolist()
        batches.append([wl.requests[j].contexts for j in nb])
    sums = dict.fromkeys(("optimum", "mst", "nested", "ours", "frequency", "reference"), 0.0)
    worst_ours = 1.0
    for ctxs in batches:
        b = intern(ctxs, weight)
        W = overlap_matrix(b)
        opt = exact_optimum(b)
        sums["optimum"] += opt
        sums["mst"] += mst_bound(W)
        sums["nested"] += nested_group_bound(b, W)[0]
        reordered, _ = ContextPilot(tokenizer=count).reorder(ctxs)
        ours = trie_reuse(reordered, weight)
        sums["ours"] += ours
        perms, _ = frequency_sort(ctxs)
        sums["frequency"] += trie_reuse([[c[j] for j in p] for c, p in zip(ctxs, perms)], weight)
        if opt:
            worst_ours = min(worst_ours, ours / opt)
    out = {"subbatches": len(batches), "size": m}
    if opts.reference is not None and opts.subbatch_reference:
        try:
            ref_ids = []
            for ctxs in batches:
                ids: dict = {}
                ref_ids.append([[ids.setdefault(t, len(ids)) for t in c] for c in ctxs])
            res = opts.reference.offline_many(ref_ids)
            for ctxs, ids_batch, r in zip(batches, ref_ids, res):
                back = {}
                for c, row in zip(ctxs, ids_batch):
                    for t, x in zip(c, row):
                        back[x] = t
                seqs = [[back[x] for x in row] for row in r["reordered"]]
                sums["reference"] += trie_reuse(seqs, weight)
        except ReferenceUnavailable as exc:
            out["reference_error"] = str(exc)
            sums.pop("reference")
    else:
        sums.pop("reference")
    opt = sums["optimum"] or 1.0
    out.update({k: float(v) for k, v in sums.items()})
    out["ours_share_of_optimum"] = sums["ours"] / opt
    out["worst_ours_share_of_optimum"] = worst_ours
    out["frequency_share_of_optimum"] = sums["frequency"] / opt
    if "reference" in sums:
        out["reference_share_of_optimum"] = sums["reference"] / opt
    out["optimum_share_of_mst"] = sums["optimum"] / (sums["mst"] or 1.0)
    out["optimum_share_of_nested"] = sums["optimum"] / (sums["nested"] or 1.0)
    return out


def analyse_workload(wl: Workload, opts: Options) -> dict:
    """Run, score and bound every method on ``wl`` (see the module docstring)."""
    count = wl.token_counter()
    say = opts.progress
    out: dict = {"name": wl.name, "params": wl.params, "causal": wl.causal, "stats": workload_stats(wl)}
    # the small cache is a share of the unique tokens of the retrieval-order prompts
    base_prompts = run_retrieval(wl, _Renderer(count)).prompts(count)
    uniq = unique_tokens(base_prompts)
    capacity = max(1, int(opts.capacity_fraction * uniq))
    out["unique_tokens"] = uniq
    out["capacity_tokens"] = capacity
    cap_label = _cap_label(opts.capacity_fraction)
    results, capped, errors = run_methods(wl, count, opts, capacity)
    out["errors"] = errors

    say("bounds")
    weight = lambda t: count(t) + LINE_OVERHEAD  # noqa: E731
    batch = intern(wl.contexts, weight)
    bounds: dict = {"total_block_tokens": batch.total(), "dedup": dedup_bound(batch)}
    if batch.n <= opts.bound_max_n:
        W = overlap_matrix(batch, opts.bound_max_n)
        bounds["mst"] = mst_bound(W)
        ng, fallbacks = nested_group_bound(batch, W)
        bounds["nested"] = ng
        bounds["nested_fallback_requests"] = fallbacks
        del W
    else:
        bounds["note"] = f"MST and nested bounds skipped: {batch.n} requests > bound_max_n={opts.bound_max_n}"
    best, _ = online_overlaps(batch)
    preamble = base_prompts[0][0][1] if base_prompts else 0  # every method's prompts share this preamble
    bounds["online"] = online_bound(best)
    bounds["online_hits"] = {f"page{p}": online_bound(best, p, preamble) for p in opts.pages}
    bounds["online_lru_hits"] = {cap_label: {
        f"page{p}": online_bound(online_lru_overlaps(batch, capacity, p), p, preamble) for p in opts.pages}}
    out["bounds"] = bounds
    arrival = list(range(len(wl.requests)))

    methods: dict = {}
    for r in results:
        say(f"simulate {r.name}")
        prompts = r.prompts(count)
        entry: dict = {
            "kind": r.kind,
            "seconds": r.seconds,
            "note": r.note,
            "conservation": conservation(r, wl),
            "crashed_after": r.crashed_after,
            "error": r.error,
            "dedup_tokens_saved": r.dedup_tokens_saved,
            **_latency(r),
        }
        sims: dict = {}
        capped_prompts = capped[r.name].prompts(count) if r.name in capped else prompts
        for page in opts.pages:
            sims[f"page{page}"] = {"unlimited": _sim(prompts, page, None)}
            sims[f"page{page}"][cap_label] = _sim(capped_prompts, page, capacity)
        entry["sim"] = sims
        if r.name != "ours online+dedup":
            reuse = block_reuse(r, wl, count)
            entry["block_reuse"] = reuse
            for key in ("dedup", "mst", "nested", "online"):
                if key in bounds and bounds[key]:
                    entry[f"share_{key}"] = reuse / bounds[key]
            entry["arrival_order"] = r.order == arrival
            if r.order == arrival:  # the page-floored online bound holds for arrival-order hits only
                entry["share_online_hits"] = {
                    page: sims[page]["unlimited"]["cached"] / b if b else None
                    for page, b in bounds["online_hits"].items()
                }
        prompt_total = sum(t for p in prompts for _, t in p)
        entry["prompt_tokens"] = prompt_total
        methods[r.name] = entry
    out["methods"] = methods
    _compare_before_crash(results, capped, methods, count, opts, capacity, cap_label)
    if "ours online+dedup" in methods:
        plain = methods["ours online"]["prompt_tokens"]
        deduped = methods["ours online+dedup"]["prompt_tokens"]
        out["dedup"] = {
            "prompt_tokens_without_dedup": plain,
            "prompt_tokens_with_dedup": deduped,
            "tokens_saved": plain - deduped,
            "share_saved": (plain - deduped) / plain if plain else 0.0,
            "dedup_bound_share": bounds["dedup"] / max(1, bounds["total_block_tokens"]),
        }
    say("exact optima of sub-batches")
    out["subbatches"] = subbatch_study(wl, count, opts)
    return out


def _compare_before_crash(results, capped, methods: dict, count, opts: Options, capacity: int, cap_label: str) -> None:
    """If the reference's online run crashed after N requests, score both online runs on those N only.

    Online methods serve in arrival order, so the first N prompts of each are
    the same requests; this gives a like-for-like comparison (the full-batch
    numbers score the reference's unserved requests in retrieval order).
    """
    crashed = next((r for r in results if r.name == "reference online" and r.crashed_after is not None), None)
    if crashed is None or not crashed.crashed_after:
        return
    n = crashed.crashed_after
    for r in results:
        if r.kind != "online":
            continue
        full = r.prompts(count)[:n]
        small = capped[r.name].prompts(count)[:n] if r.name in capped else full
        methods[r.name]["sim_before_crash"] = {
            "requests": n,
            "unlimited": _sim(full, 16, None),
            cap_label: _sim(small, 16, capacity),
        }


def _sim(prompts, page: int, capacity: int | None) -> dict:
    s = simulate_prompts(prompts, page, capacity)
    return {"hit_ratio": s.hit_ratio, "cached": s.cached, "prompt": s.prompt, "evicted": s.evicted}
