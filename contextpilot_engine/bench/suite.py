"""``contextpilot bench``: the benchmark suite, end to end.

1. For each workload (:mod:`.presets`: the synthetic ones, then the
   real-corpus traces of :mod:`.real_traces` where their packages are
   installed): every method (:mod:`.methods`) side by side, block
   conservation, simulated hit ratios at pages 1/16/32 with an unlimited and
   a 25% cache, bounds (dedup, MST, nested, online) and shares of them,
   exact optima of small sub-batches (:mod:`.analysis`).
2. Real engine replay on small materialised variants (:mod:`.engine_replay`).
3. Overheads: ``optimize_batch`` time and memory by size, the reference on
   the same batches, online latency with 10k-1M requests indexed
   (:mod:`.overhead`).
4. Targets (:mod:`.targets`), then JSON, Markdown and PNG plots
   (:mod:`.report`) into ``--out`` (default ``results/``, git-ignored).

``--smoke`` runs everything at small sizes (CI); the full run is the
command in ``BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from ..arg_types import existing_file, int_at_least, int_list, share

if TYPE_CHECKING:
    from .workloads import Workload

__all__ = ["add_arguments", "run", "main"]

#: positions of the local tiny/small models (max_position_embeddings)
MODEL_POSITIONS = 4096


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .presets import REAL_WORKLOADS, WORKLOADS

    p.add_argument("--smoke", action="store_true", help="small sizes, seconds to minutes (CI)")
    p.add_argument("--out", default="results", help="output folder (default: results/)")
    p.add_argument("--workloads", default="all",
                   help=f"comma list from {','.join([*WORKLOADS, *REAL_WORKLOADS])}, or 'synthetic', 'real' "
                        "(default: all, the real-corpus ones where they can be built)")
    p.add_argument("--no-real", action="store_true", help="skip the real-corpus workloads")
    p.add_argument("--seed", type=int_at_least(0), default=1)
    p.add_argument("--no-engine", action="store_true", help="skip the real vLLM replay")
    p.add_argument("--no-reference", action="store_true", help="skip the reference ContextPilot")
    p.add_argument("--no-overhead", action="store_true", help="skip the overhead measurements")
    p.add_argument("--engine-workloads", default=None,
                   help="synthetic workloads replayed on the engine (default: all synthetic ones run)")
    p.add_argument("--engine-model", default="tiny", choices=("tiny", "small"))
    p.add_argument("--engine-block-size", type=int_at_least(1), default=32, help="vLLM CPU needs a multiple of 32")
    p.add_argument("--sizes", type=int_list(1), default=None, help="optimize_batch sizes (default 1000,10000,100000)")
    p.add_argument("--ref-sizes", type=int_list(1), default=None, help="reference batch sizes (default 1000,2000,4000)")
    p.add_argument("--online-sizes", type=int_list(1), default=None, help="requests indexed (default 10000,100000,1000000)")
    p.add_argument("--online-window", type=int_at_least(1), default=None, help="requests timed after each size (default 2000)")
    p.add_argument("--pages", type=int_list(1), default=[1, 16, 32], help="page sizes simulated (16, the headline, is always included)")
    p.add_argument("--capacity", type=share, default=0.25, help="small cache, as a share of unique tokens")
    p.add_argument("--subbatches", type=int_at_least(0), default=None, help="sub-batches solved exactly (default 20, smoke 3)")
    p.add_argument("--subbatch-size", type=int_at_least(1), default=8)
    p.add_argument("--trace", action="append", type=existing_file, default=[], metavar="FILE.jsonl",
                   help="also run a {query, contexts} JSONL trace (repeatable)")
    p.add_argument("--export-traces", action="store_true",
                   help="write each workload as requests JSONL and Mooncake traces (retrieval and ours offline)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _revision() -> str:
    """The checkout's commit (and whether files differ from it), so a report names the code it measured."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        rev = subprocess.run(["git", "-C", root, "describe", "--always", "--dirty"], capture_output=True, text=True,
                             timeout=10)
        return rev.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as fh:
            mem = f", {int(fh.readline().split()[1]) / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    system = f"{platform.system()} {platform.release()}"
    return f"{cpu}, {os.cpu_count()} cores{mem}, {system}, Python {platform.python_version()}"


class _Progress:
    """tqdm bars (or nothing with --quiet); ``step`` shows the current action."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.bar = None

    def start(self, total: int, desc: str):
        if self.quiet:
            return
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=True)

    def step(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(msg[:60], refresh=True)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _reference(args):
    if args.no_reference:
        return None, "skipped (--no-reference)"
    from .reference import ReferenceRunner, ReferenceUnavailable

    try:
        runner = ReferenceRunner.locate()
    except ReferenceUnavailable as exc:
        return None, f"skipped: {exc}"
    try:
        runner.offline([[0, 1], [1, 2]])  # imports work, and learn its version
    except ReferenceUnavailable as exc:
        return None, f"skipped: {exc}"
    return runner, f"ContextPilot {runner.version} at {runner.python}"


def _engine(args, names, opts, progress: _Progress) -> dict:
    if importlib.util.find_spec("vllm") is None:
        return {"skipped": "vllm is not installed in this environment (use the python from scripts/setup_env.sh)"}
    from .analysis import run_methods
    from .engine import engine_env
    from .engine_replay import ReplayJob, chat_token_ids, replay_jobs, unique_pages
    from .presets import build_engine_variant
    from .scoring import simulate_prompts
    from .tiny_model import cached_tiny_model

    engine_env()
    bs = args.engine_block_size
    model = cached_tiny_model(args.engine_model)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model))
    cache: dict[str, int] = {}

    def count(text: str) -> int:
        n = cache.get(text)
        if n is None:
            n = cache[text] = max(1, len(tok.encode(text, add_special_tokens=False)))
        return n

    from .methods import _Renderer, run_retrieval

    limit = MODEL_POSITIONS - 2 * bs  # room for reordering noise in the prompt's length
    jobs, segment_sims, dropped_requests = [], {}, {}
    progress.start(len(names) + 1, "engine")
    for name in names:
        progress.step(f"{name}: methods")
        wl = build_engine_variant(name, args.seed, args.smoke)
        base = run_retrieval(wl, _Renderer(count))
        lengths = {i: len(chat_token_ids(tok, base.messages[i])) for i in base.order}
        keep = [i for i in range(len(wl.requests)) if lengths[i] <= limit]
        if len(keep) < len(wl.requests):  # every method sees the same, shorter batch
            dropped_requests[name] = len(wl.requests) - len(keep)
            wl.requests = [wl.requests[i] for i in keep]
            base = run_retrieval(wl, _Renderer(count))
        base_ids = [chat_token_ids(tok, base.messages[i]) for i in base.order]
        longest = max(len(p) for p in base_ids)
        n_blocks = max(int(args.capacity * unique_pages(base_ids, bs)), longest // bs + 2)
        results, capped, errors = run_methods(wl, count, replace(opts, timing_repeats=1), n_blocks * bs)
        ample = {r.name: [chat_token_ids(tok, r.messages[i]) for i in r.order] for r in results}
        evicting = {}
        sims: dict = {"ample": {}, "evicting": {}}
        for r in results:
            rc = capped.get(r.name, r)
            evicting[r.name] = ample[r.name] if rc is r else [chat_token_ids(tok, rc.messages[i]) for i in rc.order]
            sims["ample"][r.name] = simulate_prompts(r.prompts(count), bs, None).hit_ratio
            sims["evicting"][r.name] = simulate_prompts(rc.prompts(count), bs, n_blocks * bs).hit_ratio
        segment_sims[name] = sims
        jobs.append(ReplayJob(name, ample, evicting, n_blocks))
        progress.advance()
    progress.step("vLLM replay")
    replay = replay_jobs(jobs, str(model), bs, progress=progress.step)
    progress.advance()
    progress.close()
    agreement: dict = {}
    for name, variants in replay.results.items():
        for variant, methods in variants.items():
            for m, e in methods.items():
                e["segment_sim_ratio"] = segment_sims[name][variant].get(m)
            agreement.setdefault(name, {})[variant] = _ranking_agreement(methods)
    return {
        "requests_over_model_length_left_out": dropped_requests,
        "model": f"{args.engine_model} ({model})",
        "block_size": bs,
        "seconds": replay.seconds,
        "results": replay.results,
        "capacities": replay.capacities,
        "agreement": agreement,
    }


def _ranking_agreement(methods: dict, tie: float = 0.01) -> dict:
    """Pairs of methods the engine orders differently from the segment simulator.

    Pairs whose simulated hit ratios differ by less than ``tie`` are ties
    (their order is within the simulator's modelling error) and not checked.
    """
    names = list(methods)
    discordant = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            sa, sb = methods[a].get("segment_sim_ratio"), methods[b].get("segment_sim_ratio")
            if sa is None or sb is None or abs(sa - sb) < tie:
                continue
            ea, eb = methods[a]["cached_ratio"], methods[b]["cached_ratio"]
            if (ea - eb) * (sa - sb) <= 0:
                discordant.append(f"{a} vs {b}: engine {ea:.3f}/{eb:.3f}, simulator {sa:.3f}/{sb:.3f}")
    by_engine = sorted(names, key=lambda m: -methods[m]["cached_ratio"])
    by_sim = sorted(names, key=lambda m: -(methods[m].get("segment_sim_ratio") or 0))
    return {"discordant": discordant, "engine_ranking": by_engine, "simulator_ranking": by_sim}


def _overheads(args, ref, progress: _Progress) -> dict:
    from .overhead import RAG_OVERHEAD_PARAMS, batch_overhead_in_child, online_latency

    sizes = args.sizes or ([500, 2000] if args.smoke else [1000, 10_000, 100_000])
    ref_sizes = args.ref_sizes or ([300] if args.smoke else [1000, 2000, 4000])
    online = args.online_sizes or ([1000, 5000] if args.smoke else [10_000, 100_000, 1_000_000])
    window = args.online_window or (500 if args.smoke else 2000)
    out: dict = {"batch": [], "reference_batch": [], "speedup": [], "online": []}
    steps = len(sizes) + (len(ref_sizes) if ref else 0) + 2
    progress.start(steps, "overhead")
    for n in sizes:
        progress.step(f"optimize_batch n={n:,}")
        out["batch"].append(batch_overhead_in_child(n, args.seed))
        progress.advance()
    if ref is not None:
        from .methods import block_ids
        from .workloads import rag_batch

        for n in ref_sizes:
            progress.step(f"reference reorder n={n:,}")
            wl = rag_batch(n_queries=n, seed=args.seed, **RAG_OVERHEAD_PARAMS)
            res = ref.offline(block_ids(wl)[0], repeats=5 if n <= 2000 and not args.smoke else 1)
            out["reference_batch"].append(
                {"contexts": n, "seconds": res["seconds"], "max_rss_mb": res.get("max_rss_mb"), "note": ""}
            )
            mine = [r for r in out["batch"] if r["contexts"] == n]
            ours = mine[0] if mine else batch_overhead_in_child(n, args.seed)
            out["speedup"].append(
                {"contexts": n, "ours_seconds": ours["seconds"], "reference_seconds": res["seconds"],
                 "speedup": res["seconds"] / ours["seconds"]}
            )
            progress.advance()
    progress.step(f"online latency up to {online[-1]:,} indexed")
    out["online"] += online_latency(online, window, args.seed)
    progress.advance()
    big = [n for n in online if n <= (5000 if args.smoke else 100_000)]
    progress.step(f"online latency, unbounded capacity, up to {big[-1]:,}" if big else "")
    if big:
        out["online"] += online_latency(big, window, args.seed, capacity_tokens=10**12)
    progress.advance()
    progress.close()
    return out


def _export(wl, name: str, out: str) -> None:
    """``<name>.requests.jsonl`` plus Mooncake traces of two methods' prompts, in ``out/traces``."""
    from .methods import _Renderer, run_ours_offline, run_retrieval
    from .traces import save_mooncake, save_requests

    folder = os.path.join(out, "traces")
    os.makedirs(folder, exist_ok=True)
    safe = name.replace(":", "_").replace("/", "_")
    save_requests(wl, os.path.join(folder, f"{safe}.requests.jsonl"))
    count = wl.token_counter()
    runs = (("retrieval", run_retrieval(wl, _Renderer(count))), ("ours-offline", run_ours_offline(wl, count)))
    for label, result in runs:
        # the k-th request executed is sent at the k-th arrival time
        stamps = sorted(int(1000 * (r.timestamp if r.timestamp is not None else i)) for i, r in enumerate(wl.requests))
        outputs = [wl.requests[i].output_tokens for i in result.order]
        path = os.path.join(folder, f"{safe}.{label}.mooncake.jsonl")
        save_mooncake(path, result.prompts(count), stamps, outputs)


def _select(args: argparse.Namespace) -> tuple[list[str] | None, str]:
    """The workloads to run and a line on the real-corpus ones (or None and an error message).

    ``all`` is every synthetic workload plus the real-corpus ones where they
    can be built (the line says why not otherwise); naming a real-corpus
    workload where it cannot be built is an error.
    """
    from .presets import REAL_WORKLOADS, WORKLOADS, real_unavailable

    groups = {"all": [*WORKLOADS, *REAL_WORKLOADS], "synthetic": list(WORKLOADS), "real": list(REAL_WORKLOADS)}
    names: list[str] = []
    for w in (x.strip() for x in args.workloads.split(",")):
        for n in groups.get(w, [w] if w else []):
            if n not in names:
                names.append(n)
    unknown = [n for n in names if n not in WORKLOADS and n not in REAL_WORKLOADS]
    if unknown:
        return None, f"unknown workload(s) {unknown}; choose from {[*WORKLOADS, *REAL_WORKLOADS]}, synthetic, real"
    wanted = [n for n in names if n in REAL_WORKLOADS]
    if not wanted:
        return names, "not run"
    if args.no_real:
        return [n for n in names if n not in REAL_WORKLOADS], "skipped (--no-real)"
    why = real_unavailable()
    if why is None:
        return names, "PostgreSQL manual traces (real_traces)"
    if args.workloads.strip() == "all":
        return [n for n in names if n not in REAL_WORKLOADS], f"skipped: {why}"
    return None, f"real-corpus workloads requested but unavailable: {why}"


def _trace_meta(wl: "Workload") -> dict:
    """What the report prints about a real trace: its retriever, domain and the manifest that keys it."""
    p = wl.params
    return {
        "domain": p.get("domain"),
        "retriever": p.get("retriever"),
        "top_k": p.get("top_k"),
        "topics": p.get("topics"),
        "documents": len(p["documents"]) if p.get("documents") else None,
        "manifest": p.get("manifest"),
        "seed": p.get("seed"),
        "smoke": p.get("smoke"),
    }


def run(args: argparse.Namespace) -> int:
    from .analysis import Options, analyse_workload
    from .presets import REAL_WORKLOADS, build
    from .report import write_outputs
    from .targets import REAL_SOURCE, evaluate_targets

    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    names, real_note = _select(args)
    if names is None:
        print(real_note, file=sys.stderr)
        return 2
    progress = _Progress(args.quiet)
    ref, ref_note = _reference(args)
    print(f"reference: {ref_note}", file=sys.stderr)
    opts = Options(
        pages=tuple(sorted(set(args.pages) | {16})),  # page 16 is the headline the targets read
        capacity_fraction=args.capacity,
        subbatches=args.subbatches if args.subbatches is not None else (3 if args.smoke else 20),
        subbatch_size=args.subbatch_size,
        seed=args.seed,
        reference=ref,
        subbatch_reference=not args.smoke,
        timing_repeats=1 if args.smoke else 5,  # medians of 5: the machine is shared and noisy
        progress=progress.step,
    )
    result: dict = {
        "meta": {
            "started": started,
            "command": "contextpilot bench " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:]),
            "machine": _machine(),
            "revision": _revision(),
            "reference": ref_note,
            "smoke": bool(args.smoke),
            "seed": args.seed,
            "timing_repeats": opts.timing_repeats,
            "real_corpus": real_note,
        },
        "workloads": {},
    }
    jobs = [(name, lambda name=name: build(name, args.smoke, args.seed)) for name in names]
    for path in args.trace:
        from .traces import load_requests

        jobs.append((f"trace:{os.path.basename(path)}", lambda path=path: load_requests(path)))
    progress.start(len(jobs), "workloads")
    real_failed = False
    for name, make in jobs:
        progress.step(f"{name}: generating")
        if real_failed and name in REAL_WORKLOADS:
            progress.advance()
            continue
        try:
            wl = make()
        except Exception as exc:  # a real-corpus trace that cannot be built here (no archive, say)
            if name not in REAL_WORKLOADS:
                raise
            result["meta"]["real_corpus"] = f"skipped: building the traces failed: {type(exc).__name__}: {exc}"[:500]
            real_failed = True
            progress.advance()
            continue
        entry = analyse_workload(wl, opts)
        entry["source"] = REAL_SOURCE if name in REAL_WORKLOADS else (
            "trace file" if name.startswith("trace:") else "synthetic")
        if name in REAL_WORKLOADS:
            entry["trace"] = _trace_meta(wl)
        result["workloads"][name] = entry
        if args.export_traces:
            _export(wl, name, args.out)
        progress.advance()
    progress.close()
    if not args.no_engine:
        from .presets import WORKLOADS

        synthetic = [n for n in names if n in WORKLOADS]  # the engine variants are materialised synthetic ones
        chosen = args.engine_workloads
        engine_names = synthetic if chosen is None else [w for w in chosen.split(",") if w]
        if args.smoke and args.engine_workloads is None:
            engine_names = synthetic[:1]
        try:
            result["engine"] = _engine(args, engine_names, opts, progress) if engine_names else {
                "skipped": "no synthetic workload selected (the engine replays their materialised variants)"}
        except Exception as exc:  # keep the rest of a long run; the report says what failed
            import traceback

            progress.close()
            traceback.print_exc()
            result["engine"] = {"skipped": f"engine replay failed: {type(exc).__name__}: {exc}"[:2000]}
    if not args.no_overhead:
        result["overhead"] = _overheads(args, ref, progress)
    result["targets"] = evaluate_targets(result)
    result["meta"]["seconds"] = time.perf_counter() - t0
    paths = write_outputs(result, args.out)
    judged = [c for c in result["targets"] if c["pass"] is not None and not c.get("stretch")]
    stretch = [c for c in result["targets"] if c["pass"] is not None and c.get("stretch")]
    passed = sum(c["pass"] for c in judged)
    unjudged = sum(c["pass"] is None for c in result["targets"])
    print(
        f"wrote {paths['markdown']}, {paths['json']} and {len(paths['plots'])} plots; "
        f"targets: {passed}/{len(judged)} pass"
        + (f", stretch goals {sum(c['pass'] for c in stretch)}/{len(stretch)}" if stretch else "")
        + (f" ({unjudged} speed checks not meaningful at this size)" if unjudged else ""),
        file=sys.stderr,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="contextpilot bench", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
