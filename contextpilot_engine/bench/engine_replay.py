"""Replay every method's prompts through a real vLLM CPU engine.

The same prompts the simulator scores are tokenized with the model's chat
template and sent one request at a time (:func:`.engine.prefill_timed`), in
each method's execution order, with the prefix cache reset before each
method.  Per method we record the engine's ``num_cached_tokens`` per request
and the total prefill wall time, and next to them the token-exact simulator
(:class:`.simulator.TokenPrefixCache`) fed the very same token ids:

* with an ample KV cache (1 GiB) the engine and the simulator must agree
  request by request (the suite reports the number of requests that differ);
* with a KV cache of ``evict_fraction`` of the batch's unique tokens
  (``num_kv_blocks``), evictions happen; vLLM evicts while it allocates, so
  agreement is expected to be close, not exact.

Engines are built one after another and each is closed before the next
(in-process engines share global state, see :mod:`.engine`).  Wall times
are noisy on a shared machine: compare the ours/baseline ratios, which are
measured in the same run on the same engine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from ..pages import chain_page_keys
from .simulator import TokenPrefixCache

__all__ = ["EngineReplay", "ReplayJob", "replay_jobs", "chat_token_ids", "unique_pages"]


@dataclass
class EngineRun:
    method: str
    cached: list[int]
    prompt: list[int]
    seconds: list[float]
    simulated: list[int]

    def summary(self) -> dict:
        total_prompt = sum(self.prompt)
        return {
            "cached_tokens": sum(self.cached),
            "prompt_tokens": total_prompt,
            "cached_ratio": sum(self.cached) / total_prompt if total_prompt else 0.0,
            "prefill_seconds": sum(self.seconds),
            "simulated_cached_tokens": sum(self.simulated),
            "simulated_ratio": sum(self.simulated) / total_prompt if total_prompt else 0.0,
            "requests_differing_from_simulator": sum(1 for a, b in zip(self.cached, self.simulated) if a != b),
            "requests": len(self.cached),
        }


@dataclass
class EngineReplay:
    """Per workload and cache variant, per method: engine vs simulator."""

    model: str
    block_size: int
    results: dict = field(default_factory=dict)  # workload -> variant -> method -> summary
    capacities: dict = field(default_factory=dict)  # workload -> {"num_kv_blocks": ..}
    seconds: float = 0.0


def chat_token_ids(tokenizer, messages: Sequence[dict]) -> list[int]:
    """Token ids of ``messages`` with the generation prompt, as the engine's chat path builds them."""
    out = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
    if hasattr(out, "keys"):
        out = out["input_ids"]
    return [int(t) for t in out]


def _run_method(llm, name: str, prompts: list[list[int]], block_size: int, capacity_blocks: int | None) -> EngineRun:
    from .engine import prefill_timed

    llm.reset_prefix_cache()
    results = prefill_timed(llm, prompts)
    sim = TokenPrefixCache(block_size, capacity_blocks)
    simulated = [sim.serve(p) for p in prompts]
    return EngineRun(
        name,
        [r.cached_tokens for r in results],
        [r.prompt_tokens for r in results],
        [r.seconds for r in results],
        simulated,
    )


@dataclass
class ReplayJob:
    """One workload's prompts (token ids in execution order) per method, for both cache variants."""

    name: str
    ample: dict[str, list[list[int]]]
    evicting: dict[str, list[list[int]]] | None = None
    num_kv_blocks: int | None = None


def replay_jobs(
    jobs: Sequence[ReplayJob],
    model_path: str,
    block_size: int = 32,
    progress: Callable[[str], None] | None = None,
) -> EngineReplay:
    """Replay every job on one ample-cache engine, then each evicting variant on its own small engine."""
    from .engine import close_llm, engine_env, make_llm

    engine_env()
    start = time.perf_counter()
    out = EngineReplay(str(model_path), block_size)
    say = progress or (lambda msg: None)

    def fit(methods: dict) -> int:
        longest = max(len(p) for ps in methods.values() for p in ps)
        return (longest // block_size + 2) * block_size

    say("engine: start (ample KV cache)")
    llm = make_llm(model_path, block_size=block_size, max_model_len=max(fit(j.ample) for j in jobs))
    try:
        for job in jobs:
            for name, prompts in job.ample.items():
                say(f"engine: {job.name} / {name} (ample cache)")
                run = _run_method(llm, name, prompts, block_size, None)
                out.results.setdefault(job.name, {}).setdefault("ample", {})[name] = run.summary()
    finally:
        close_llm(llm)

    for job in jobs:
        if not job.evicting or not job.num_kv_blocks:
            continue
        max_len = min(fit(job.evicting), job.num_kv_blocks * block_size)
        out.capacities[job.name] = {"num_kv_blocks": job.num_kv_blocks, "block_size": block_size}
        say(f"engine: {job.name}: start with a small KV cache ({job.num_kv_blocks} blocks)")
        llm = make_llm(model_path, block_size=block_size, max_model_len=max_len, num_kv_blocks=job.num_kv_blocks)
        try:
            for name, prompts in job.evicting.items():
                say(f"engine: {job.name} / {name} (small cache)")
                run = _run_method(llm, name, prompts, block_size, job.num_kv_blocks)
                out.results[job.name].setdefault("evicting", {})[name] = run.summary()
        finally:
            close_llm(llm)
    out.seconds = time.perf_counter() - start
    return out


def unique_pages(prompts: list[list[int]], block_size: int) -> int:
    """Distinct full pages (chained hashes) over the prompts: the unique tokens of the batch, in blocks."""
    return len({key for p in prompts for key in chain_page_keys(p, block_size)})
