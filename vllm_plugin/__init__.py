"""vLLM integration of contextpilot-engine, loaded through the ``vllm.general_plugins`` entry point.

Turn it on with ``--enable-contextpilot`` (OpenAI server) or
``LLM(..., additional_config={"contextpilot": {...}})``; see
``docs/vllm_plugin.md`` for every option, the request fields and the limits.

This package holds only what touches vLLM: hooks and flags.  Everything
engine-neutral (request fields, the chat rewrite, binding, the page mirror,
the cross-process channel, per-engine state, options, fail-open) is the
integration layer, :mod:`contextpilot_engine.integration`, shared with the
other adapters.  Modules, by concept:

* :mod:`.config`: where options and engine identity live in a ``VllmConfig``;
* :mod:`.flags`: the CLI flags and per-engine activation (``EngineArgs`` hooks);
* :mod:`.block_pool`: engine side, the block-pool hooks feeding the page mirror;
* :mod:`.engine_hooks`: engine side, attaching mirror/channel/queue to a scheduler;
* :mod:`.frontend`: request side, the renderer and chat-endpoint hooks;
* :mod:`.scheduling`: the optional cache-aware waiting queue;
* :mod:`.testing`: helpers for the tests, the benchmark and the demo.

``register()`` runs in every vLLM process.  It only wraps three
``EngineArgs`` methods (flags, activation), which are pass-throughs for
engines without the plugin; nothing else of vLLM is touched unless an engine
with the plugin on is configured in this process or was configured by the
parent that started it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from contextpilot_engine.integration.state import EngineState

__all__ = ["register", "engine_state", "reports", "lag_summary", "block_pool_of"]


def register() -> None:
    """Entry point called by vLLM's plugin loader (in every process it starts)."""
    from contextpilot_engine.integration.failopen import report_failure, use_logger

    try:
        use_logger("vllm.contextpilot")  # follow vLLM's log format and VLLM_LOGGING_LEVEL
        from .flags import ENGINE_HOOKS_ENV, install_flag_hooks

        install_flag_hooks()
        if os.environ.get(ENGINE_HOOKS_ENV) == "1":
            from .engine_hooks import install_engine_hooks

            install_engine_hooks()
    except Exception as exc:  # a plugin must never stop vLLM from starting
        report_failure("registration_error", exc)


# ----------------------------------------------------------------------------- helpers
def _vllm_config(llm: Any) -> Any:
    engine = getattr(llm, "llm_engine", llm)
    config = getattr(engine, "vllm_config", None)
    if config is None:
        raise TypeError(f"expected a vllm.LLM or LLMEngine, got {type(llm).__name__}")
    return config


def engine_state(llm: Any) -> "EngineState | None":
    """This process's plugin state for ``llm`` (a ``vllm.LLM``), or None when the plugin is off for it."""
    from contextpilot_engine.integration.state import find_state

    from .config import engine_key, options_from_vllm_config

    config = _vllm_config(llm)
    if options_from_vllm_config(config) is None:
        return None
    return find_state(engine_key(config)[0])


def reports(llm: Any) -> list[dict]:
    """What the plugin did to recent chat requests of ``llm`` (oldest first, at most 1000)."""
    state = engine_state(llm)
    return list(state.reports) if state is not None else []


def lag_summary(llm: Any) -> dict:
    """Mirror lag as seen by the request path of ``llm`` (cross-process channel only)."""
    state = engine_state(llm)
    return state.lag.summary() if state is not None else {}


def block_pool_of(llm: Any):
    """The block pool of an in-process engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), for inspection."""
    core = getattr(getattr(llm, "llm_engine", llm), "engine_core", None)
    inner = getattr(core, "engine_core", None)
    if inner is None:
        raise RuntimeError("the engine core is not in this process (set VLLM_ENABLE_V1_MULTIPROCESSING=0)")
    return inner.scheduler.kv_cache_manager.block_pool
