"""Write a suite result as JSON, a Markdown report and PNG plots.

The Markdown has the same tables ``BENCHMARKS.md`` quotes; plots use
matplotlib's Agg backend (no display needed): hit ratio and block reuse per
method against the bounds, engine prefill time, and overhead against size.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

__all__ = ["write_outputs", "markdown"]

METHOD_ORDER = (
    "retrieval order",
    "frequency sort",
    "ours offline",
    "ours online",
    "ours online+dedup",
    "reference offline",
    "reference online",
)
#: one colour per method, the same in every plot
METHOD_COLORS = dict(zip(METHOD_ORDER, ("#7f7f7f", "#bcbd22", "#1f77b4", "#17becf", "#2ca02c", "#d62728", "#ff9896")))


def _pct(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _num(x, digits: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:.{digits}f}"


def _methods(entries: dict) -> list[str]:
    return [m for m in METHOD_ORDER if m in entries] + [m for m in entries if m not in METHOD_ORDER]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _workload_section(name: str, wl: dict) -> list[str]:
    lines = [f"### {name}", ""]
    st = wl["stats"]
    lines.append(
        f"{st['requests']:,} requests"
        + (f" in {st['conversations']} conversations" if st["conversations"] else "")
        + f", {st['blocks_per_request'][0]:.1f} blocks per request ({st['blocks_per_request'][1]}-"
        f"{st['blocks_per_request'][2]}), blocks of {st['block_tokens'][1]}-{st['block_tokens'][2]} tokens "
        f"(mean {st['block_tokens'][0]:.0f}); top 3% of the corpus draw {_pct(st['top_share_of_retrievals'])} "
        f"of retrievals; requests holding a block twice: {st['repeat_within_request']}; "
        f"blocks already sent earlier in the conversation: {_pct(st['repeat_across_turns'])}."
    )
    if wl.get("trace"):
        t = wl["trace"]
        scope = f"{t['documents']} documents, each question searched in its own" if t.get("documents") else \
            f"{t['topics']} topics, every query searched in the whole scope"
        size = ", smoke size" if t.get("smoke") else ""
        lines += ["", f"Real-corpus trace: {t['domain']} domain, {t['retriever']} top-{t['top_k']} ({scope}); "
                  f"seed {t['seed']}{size}; manifest `{str(t['manifest'])[:16]}`", ""]
    else:
        params = ", ".join(f"{k}={v}" for k, v in wl["params"].items())
        lines += ["", f"Generator: `{params}`" + (" (causal: arrival order kept)" if wl["causal"] else ""), ""]
    m = wl["methods"]
    caps = list(next(iter(m.values()))["sim"]["page16"])
    pages = [p for p in next(iter(m.values()))["sim"] if p != "page16"]
    header = ["method", "hit p16 " + caps[0], "hit p16 " + caps[1]]
    header += [f"hit {p.replace('page', 'p')} {caps[0]}" for p in pages]
    header += ["share of MST", "share of nested", "share of online", "blocks dropped", "plan time (s)", "notes"]
    rows = []
    for name_m in _methods(m):
        e = m[name_m]
        c = e["conservation"]
        dropped = "0" if c["dropped_blocks"] == 0 else f"**{c['dropped_blocks']:,}** ({c['dropped_tokens']:,} tok)"
        notes = e.get("note") or ""
        if name_m == "ours online+dedup":
            notes = (notes + "; " if notes else "") + f"{c['hinted_blocks']:,} blocks sent as hints"
        rows.append(
            [
                name_m,
                _pct(e["sim"]["page16"][caps[0]]["hit_ratio"]),
                _pct(e["sim"]["page16"][caps[1]]["hit_ratio"]),
                *[_pct(e["sim"][p][caps[0]]["hit_ratio"]) for p in pages],
                _pct(e.get("share_mst")),
                _pct(e.get("share_nested")),
                _pct((e.get("share_online_hits") or {}).get("page16")),
                dropped,
                _num(e.get("seconds"), 3),
                notes.replace("|", "/"),
            ]
        )
    lines += _table(header, rows)
    b = wl["bounds"]
    lines += [
        "",
        f"Capacity: unlimited, and {caps[1]} of the batch's {wl['unique_tokens']:,} unique prompt tokens "
        f"({wl['capacity_tokens']:,} tokens).  Bounds on block reuse (tokens): dedup {b['dedup']:,}, "
        + (f"MST {b['mst']:,}, nested {b['nested']:,.0f}" if "mst" in b else b.get("note", ""))
        + (
            f" ({b['nested_fallback_requests']} requests used the pairwise fallback)"
            if b.get("nested_fallback_requests")
            else ""
        )
        + (f", online {b['online']:,}" if "online" in b else "")
        + f"; total block tokens {b['total_block_tokens']:,}."
        + (
            f"  Online bound at page 16 (arrival order, preamble included): {b['online_hits']['page16']:,} hit "
            "tokens; `share of online` is a method's page-16 hits with the unlimited cache over it, for the "
            "methods that serve in arrival order."
            if "page16" in b.get("online_hits", {})
            else ""
        )
        + "".join(
            f"  With an LRU cache of {cap} ({wl.get('capacity_tokens', 0):,} tokens) the online bound is "
            f"{hits['page16']:,}."
            for cap, hits in b.get("online_lru_hits", {}).items()
            if "page16" in hits
        ),
    ]
    if "dedup" in wl:
        d = wl["dedup"]
        lines += [
            "",
            f"Deduplication (ours online with conversation ids): prompt tokens {d['prompt_tokens_without_dedup']:,} -> "
            f"{d['prompt_tokens_with_dedup']:,} ({_pct(d['share_saved'])} saved; the dedup bound is "
            f"{_pct(d['dedup_bound_share'])} of block tokens).  Its hit ratio is over the shorter prompts.",
        ]
    sb = wl.get("subbatches") or {}
    if sb:
        ref = f", reference {_pct(sb['reference_share_of_optimum'])}" if "reference_share_of_optimum" in sb else ""
        lines += [
            "",
            f"Exact optima on {sb['subbatches']} sub-batches of {sb['size']} related requests: ours reaches "
            f"{_pct(sb['ours_share_of_optimum'])} of the optimum (worst {_pct(sb['worst_ours_share_of_optimum'])}), "
            f"frequency sort {_pct(sb['frequency_share_of_optimum'])}{ref}; the optimum is "
            f"{_pct(sb['optimum_share_of_mst'])} of the MST bound and {_pct(sb['optimum_share_of_nested'])} of the "
            "nested bound.",
        ]
    if wl.get("errors"):
        lines += ["", "Errors: " + "; ".join(f"{k}: {v}" for k, v in wl["errors"].items())]
    return lines + [""]


def _engine_section(engine: dict) -> list[str]:
    if not engine:
        return []
    if "skipped" in engine:
        return ["## Real engine replay", "", f"Skipped: {engine['skipped']}", ""]
    lines = [
        "## Real engine replay",
        "",
        f"vLLM CPU, in-process, prefix caching on, model `{engine['model']}`, block size {engine['block_size']}, "
        f"one request at a time, cache reset before each method; {engine['seconds']:.0f} s in all.  "
        "`sim` is the token-exact simulator on the same token ids; `segment sim` the segment-mode simulator "
        "used by the tables above (page = block size).",
        "",
    ]
    for name, variants in engine["results"].items():
        lines.append(f"### {name} (engine)")
        lines.append("")
        for variant, methods in variants.items():
            cap = engine.get("capacities", {}).get(name, {})
            title = "ample KV cache (1 GiB)" if variant == "ample" else f"{cap.get('num_kv_blocks')} KV blocks"
            base = methods.get("retrieval order", {})
            header = ["method", "cached", "sim", "segment sim", "differing requests", "prefill (s)"]
            header.append("prefill vs retrieval")
            rows = []
            for m in _methods(methods):
                e = methods[m]
                rel = e["prefill_seconds"] / base["prefill_seconds"] if base.get("prefill_seconds") else None
                rows.append(
                    [
                        m,
                        _pct(e["cached_ratio"]),
                        _pct(e["simulated_ratio"]),
                        _pct(e.get("segment_sim_ratio")),
                        f"{e['requests_differing_from_simulator']}/{e['requests']}",
                        _num(e["prefill_seconds"]),
                        _num(rel) + "x" if rel else "-",
                    ]
                )
            lines += [f"*{title}*", ""] + _table(header, rows) + [""]
    return lines


def _overhead_section(ov: dict) -> list[str]:
    if not ov:
        return []
    lines = ["## Overheads", ""]
    if ov.get("batch"):
        rows = [
            [f"{r['contexts']:,}", f"{r['blocks']:,}", _num(r["seconds"], 3), _num(r["peak_traced_mb"], 1),
             _num(r["peak_rss_growth_mb"], 1)]
            for r in ov["batch"]
        ]
        lines += ["`optimize_batch` (RAG top-20, fresh process per size):", ""]
        lines += _table(["contexts", "blocks", "seconds", "peak traced MB", "peak RSS growth MB"], rows) + [""]
    if ov.get("reference_batch"):
        rows = [
            [f"{r['contexts']:,}", _num(r.get("seconds"), 2), _num(r.get("max_rss_mb"), 0), r.get("note", "")]
            for r in ov["reference_batch"]
        ]
        lines += ["Reference `reorder` on the same batches (its own process, imports excluded):", ""]
        lines += _table(["contexts", "seconds", "max RSS MB", "note"], rows) + [""]
    if ov.get("speedup"):
        rows = [[f"{r['contexts']:,}", _num(r["ours_seconds"], 3), _num(r["reference_seconds"], 2),
                 _num(r["speedup"], 0) + "x"] for r in ov["speedup"]]
        lines += _table(["contexts", "ours (s)", "reference (s)", "speedup"], rows) + [""]
    if ov.get("online"):
        rows = [
            [f"{r['indexed']:,}", str(r["capacity_tokens"]), f"{r['index_nodes']:,}", _num(r["p50_ms"], 3),
             _num(r["p99_ms"], 3)]
            for r in ov["online"]
        ]
        lines += [
            "Online `optimize` latency over the next "
            f"{ov['online'][0]['window']:,} requests after N requests went through the index:",
            "",
        ]
        lines += _table(["N indexed", "capacity (tokens)", "index nodes", "p50 ms", "p99 ms"], rows) + [""]
    return lines


def _targets_section(checks: list[dict]) -> list[str]:
    if not checks:
        return []
    rows = []
    for c in checks:
        vals = "-"
        if c["ratio"] is not None:
            if "faster" in c["target"]:
                vals = f"{c['ours']:.3f} s vs {c['reference']:.2f} s = {c['ratio']:.0f}x"
            else:
                vals = f"{_pct(c['ours'])} vs {_pct(c['reference'])} = {c['ratio']:.3f}x"
        status = c.get("status", "pass" if c["pass"] else "fail")
        shown = {"pass": "PASS", "fail": "not reached" if c.get("stretch") else "**FAIL**"}.get(status, status)
        rows.append([c["target"], c["workload"], vals, shown, c["note"]])
    lines = ["## Targets", ""]
    if any(c.get("stretch") for c in checks):
        lines += ["Stretch lines (marked *stretch*) are reported, not counted with the targets.  "
                  "`ours online >= ...x ours offline` compares ours online with ours offline.", ""]
    return lines + _table(["target", "workload", "ours vs reference", "result", "gap / note"], rows) + [""]


def _ratio(wl: dict, a: str, b: str, cap: str) -> float | None:
    try:
        x, y = wl["methods"][a]["sim"]["page16"][cap]["hit_ratio"], wl["methods"][b]["sim"]["page16"][cap]["hit_ratio"]
    except KeyError:
        return None
    return x / y if y else None


def _x(r: float | None) -> str:
    return "-" if r is None else f"{r:.3f}x"


def _real_section(workloads: dict) -> list[str]:
    """One line per real-corpus workload: ours against the reference and against our own batch plan."""
    real = {n: w for n, w in workloads.items() if w.get("source") == "real corpus"}
    if not real:
        return []
    caps = list(next(iter(next(iter(real.values()))["methods"].values()))["sim"]["page16"])
    header = ["workload", "requests"]
    for label in ("ours/ref offline", "ours/ref online", "ours online/offline"):
        header += [f"{label} {c}" for c in caps]
    header += ["online bound: ours online", "online bound: ref online", "ours offline: share of MST",
               "ours offline: share of nested"]
    rows = []
    for name, wl in real.items():
        row = [name, f"{wl['stats']['requests']:,}"]
        for a, b in (("ours offline", "reference offline"), ("ours online", "reference online"),
                     ("ours online", "ours offline")):
            row += [_x(_ratio(wl, a, b, c)) for c in caps]
        m = wl["methods"]
        row += [
            _pct((m.get("ours online", {}).get("share_online_hits") or {}).get("page16")),
            _pct((m.get("reference online", {}).get("share_online_hits") or {}).get("page16")),
            _pct(m.get("ours offline", {}).get("share_mst")),
            _pct(m.get("ours offline", {}).get("share_nested")),
        ]
        rows.append(row)
    return [
        "## Real-corpus workloads",
        "",
        "Hit-ratio ratios at page 16 (targets: offline >= 1.08x the reference, online >= 1.3x the reference's "
        "online mode, ours online >= 0.7x ours offline, stretch 0.8x); the online bound's shares are page-16 hits "
        "with an unlimited cache over the online bound; the MST and nested shares are block reuse.",
        "",
    ] + _table(header, rows) + [""]


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [
        "# contextpilot bench report",
        "",
        f"- started {meta['started']}, {meta['seconds']:.0f} s; command: `{meta['command']}`",
        f"- machine: {meta['machine']}",
        f"- code: git {meta.get('revision', 'unknown')}",
        f"- reference: {meta['reference']}",
        "- hit ratio = cached tokens / prompt tokens, prompts served one at a time in each method's execution "
        "order; p16 = 16-token pages (vLLM default), p1 = SGLang-style, p32 = vLLM CPU's block size.",
    ]
    if meta.get("timing_repeats"):
        lines.append(
            f"- plan times (ours and the reference's) are medians of {meta['timing_repeats']} runs on fresh instances "
            "(the reference's 4,000-context batch: one run)"
        )
    if meta.get("real_corpus"):
        lines.append(f"- real-corpus workloads: {meta['real_corpus']}")
    lines.append("")
    lines += _targets_section(result.get("targets", []))
    lines += _real_section(result.get("workloads", {}))
    if result.get("workloads"):
        lines += ["## Workloads (simulated)", ""]
        for name, wl in result["workloads"].items():
            lines += _workload_section(name, wl)
    lines += _engine_section(result.get("engine", {}))
    lines += _overhead_section(result.get("overhead", {}))
    if result.get("plots"):
        lines += ["## Plots", ""] + [f"- `{p}`" for p in result["plots"]] + [""]
    return "\n".join(lines)


def _plots(result: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    wls = result.get("workloads", {})
    if wls:
        names = list(wls)
        wide = max(14.0, 1.3 * len(names) + 4)  # twelve workloads with the real-corpus ones
        fig, axes = plt.subplots(1, 2, figsize=(wide, 4.8))
        methods = [m for m in METHOD_ORDER if any(m in w["methods"] for w in wls.values())]
        width = 0.8 / max(1, len(methods))
        caps = list(next(iter(next(iter(wls.values()))["methods"].values()))["sim"]["page16"])
        for ax, cap in zip(axes, caps):
            for k, m in enumerate(methods):
                vals = [wls[n]["methods"].get(m, {}).get("sim", {}).get("page16", {}).get(cap, {}).get("hit_ratio", 0)
                        for n in names]
                ax.bar([i + k * width for i in range(len(names))], vals, width, label=m, color=METHOD_COLORS[m])
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, rotation=30, ha="right",
                          fontsize=8)
            ax.set_ylabel("hit ratio (page 16)")
            ax.set_title(f"simulated hit ratio, {cap} cache")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "hit_ratio.png", dpi=110)
        plt.close(fig)
        written.append("hit_ratio.png")

        fig, ax = plt.subplots(figsize=(wide * 0.9, 4.8))
        for k, m in enumerate([m for m in methods if m != "ours online+dedup"]):
            vals = [wls[n]["methods"].get(m, {}).get("share_nested", 0) or 0 for n in names]
            ax.bar([i + k * width for i in range(len(names))], vals, width, label=m, color=METHOD_COLORS[m])
        ax.axhline(1.0, color="k", lw=1)
        for i, n in enumerate(names):
            b = wls[n]["bounds"]
            if b.get("mst") and b.get("nested"):
                ax.plot([i - 0.1, i + 0.8], [b["mst"] / b["nested"]] * 2, "r--", lw=1)
            if b.get("online") and b.get("nested"):
                ax.plot([i - 0.1, i + 0.8], [b["online"] / b["nested"]] * 2, "g:", lw=1.5)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("block reuse / nested bound")
        ax.set_title("reuse against the bounds (black: nested bound = 1, red dashed: MST, green dotted: online)")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: the bars and lines stay visible
        fig.tight_layout()
        fig.savefig(out / "bounds.png", dpi=110)
        plt.close(fig)
        written.append("bounds.png")

    eng = result.get("engine", {}).get("results", {})
    if eng:
        variants = sorted({v for w in eng.values() for v in w})
        fig, axes = plt.subplots(1, len(variants), figsize=(7 * len(variants), 4.8), squeeze=False)
        for ax, variant in zip(axes[0], variants):
            names = [n for n in eng if variant in eng[n]]
            methods = [m for m in METHOD_ORDER if any(m in eng[n][variant] for n in names)]
            width = 0.8 / max(1, len(methods))
            for k, m in enumerate(methods):
                vals = [eng[n][variant].get(m, {}).get("prefill_seconds", 0) for n in names]
                ax.bar([i + k * width for i in range(len(names))], vals, width, label=m, color=METHOD_COLORS[m])
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names)
            ax.set_ylabel("total prefill wall time (s)")
            ax.set_title(f"vLLM CPU replay, {variant} KV cache")
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "prefill.png", dpi=110)
        plt.close(fig)
        written.append("prefill.png")

    ov = result.get("overhead", {})
    if ov.get("batch") or ov.get("online"):
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        if ov.get("batch"):
            axes[0].loglog([r["contexts"] for r in ov["batch"]], [r["seconds"] for r in ov["batch"]], "o-",
                           label="ours optimize_batch", color=METHOD_COLORS["ours offline"])
        if ov.get("reference_batch"):
            pts = [r for r in ov["reference_batch"] if r.get("seconds")]
            axes[0].loglog([r["contexts"] for r in pts], [r["seconds"] for r in pts], "s-", label="reference reorder",
                           color=METHOD_COLORS["reference offline"])
        axes[0].set_xlabel("contexts")
        axes[0].set_ylabel("seconds")
        axes[0].set_title("batch planning time")
        axes[0].legend()
        if ov.get("online"):
            for k, cap in enumerate(sorted({str(r["capacity_tokens"]) for r in ov["online"]})):
                pts = [r for r in ov["online"] if str(r["capacity_tokens"]) == cap]
                color = METHOD_COLORS["ours online"] if k == 0 else METHOD_COLORS["ours offline"]
                axes[1].semilogx([r["indexed"] for r in pts], [r["p50_ms"] for r in pts], "o-", color=color,
                                 label=f"p50, capacity {cap}")
                axes[1].semilogx([r["indexed"] for r in pts], [r["p99_ms"] for r in pts], "^--", color=color,
                                 label=f"p99, capacity {cap}")
        axes[1].set_xlabel("requests indexed")
        axes[1].set_ylabel("ms per optimize call")
        axes[1].set_title("online latency")
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "overhead.png", dpi=110)
        plt.close(fig)
        written.append("overhead.png")
    return written


def write_outputs(result: dict, out_dir: str | Path) -> dict:
    """Write ``bench.json``, ``bench.md`` and the plots into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result["plots"] = _plots(result, out)
    md = markdown(result)
    (out / "bench.md").write_text(md)
    (out / "bench.json").write_text(json.dumps(result, indent=1, default=_jsonable))
    return {"json": out / "bench.json", "markdown": out / "bench.md", "plots": [out / p for p in result["plots"]]}


def _jsonable(x):
    if hasattr(x, "item"):
        return x.item()
    if isinstance(x, (set, tuple)):
        return list(x)
    return str(x)
