"""SGLang integration of contextpilot-engine, loaded through the ``sglang.srt.plugins`` entry point.

Turn it on with ``--enable-contextpilot`` (``python -m sglang.launch_server``)
or, for ``sglang.Engine(...)``, the ``CONTEXTPILOT_SGLANG`` environment
variable (a JSON object of options); the README documents the options, the
request fields and the limits, which are the vLLM plugin's.

This package holds only what touches SGLang: hooks and flags, registered
with SGLang's ``HookRegistry`` (no other patching).  Everything
engine-neutral is :mod:`contextpilot_engine.integration`.  Modules:

* :mod:`.config`: where options and engine identity live in SGLang;
* :mod:`.flags`: the CLI flags (``ServerArgs`` hooks);
* :mod:`.radix_cache`: scheduler side, the mirror of ``UnifiedRadixCache``;
* :mod:`.scheduling`: scheduler side, the cache-aware waiting order;
* :mod:`.frontend`: main process, the chat request path and response field;
* :mod:`.hook_points`: every hooked method and its expected signature;
* :mod:`.testing`: CPU stand-ins for the tests and the benchmark.

``register()`` runs in every SGLang process (the loader calls it before the
server arguments are parsed and first thing in each scheduler process).  It
registers the hooks; each one checks at call time whether contextpilot is
on for this deployment and otherwise passes straight through.
"""

from __future__ import annotations

import importlib
import inspect

__all__ = ["register"]


def _hooks():
    from sglang.srt.plugins.hook_registry import HookType

    from . import flags, frontend, radix_cache, scheduling

    after, before, around = HookType.AFTER, HookType.BEFORE, HookType.AROUND
    change = radix_cache.after_change
    return [
        ("ServerArgs", "add_cli_args", flags.after_add_cli_args, after),
        ("ServerArgs", "from_cli_args", flags.after_from_cli_args, after),
        ("UnifiedRadixCache", "__init__", radix_cache.before_init, before),
        ("UnifiedRadixCache", "__init__", radix_cache.after_init, after),
        ("UnifiedRadixCache", "take_events", radix_cache.around_take_events, around),
        ("UnifiedRadixCache", "insert", change, after),
        ("UnifiedRadixCache", "evict", change, after),
        ("UnifiedRadixCache", "evict_for_alloc", change, after),
        ("UnifiedRadixCache", "reset", change, after),
        ("UnifiedRadixCache", "checkpoint", change, after),
        ("UnifiedRadixCache", "writing_check", change, after),
        ("UnifiedRadixCache", "loading_check", change, after),
        ("UnifiedRadixCache", "check_hicache_events", change, after),
        ("UnifiedRadixCache", "init_load_back", change, after),
        ("UnifiedRadixCache", "evict_host", change, after),
        ("SchedulePolicy", "calc_priority", scheduling.around_calc_priority, around),
        ("OpenAIServingChat", "_convert_to_internal_request", frontend.around_convert, around),
        ("OpenAIServingChat", "_build_chat_response", frontend.after_build_chat_response, after),
        ("OpenAIServingChat", "_generate_chat_stream", frontend.around_generate_chat_stream, around),
    ]


def _signature_ok(point) -> bool:
    from contextpilot_engine.integration.failopen import logger
    from contextpilot_engine.integration.hook_points import matches

    try:
        owner = getattr(importlib.import_module(point.module), point.owner)
    except Exception as exc:
        if not point.optional:
            logger.warning("contextpilot: %s is not importable (%s); that hook is disabled", point.path, exc)
        return False
    func = owner.__dict__.get(point.method)
    if func is None:
        if not point.optional:
            logger.warning("contextpilot: %s does not exist in this SGLang; that hook is disabled", point.path)
        return False
    params = list(inspect.signature(getattr(func, "__func__", func)).parameters)
    if not matches(point, params):
        logger.warning(
            "contextpilot: %s has parameters %s, expected %s; this SGLang version is not supported by that "
            "hook, which stays disabled (SGLang behaves as without contextpilot there)",
            point.path, params, list(point.params),
        )
        return False
    return True


def register() -> None:
    """Entry point called by SGLang's plugin loader (in every process it starts)."""
    from contextpilot_engine.integration.failopen import report_failure, use_logger

    try:
        use_logger("sglang.srt.contextpilot")
        from sglang.srt.plugins.hook_registry import HookRegistry

        from .config import engine_id
        from .hook_points import hook_point

        engine_id()  # the first process names the deployment; the processes it spawns inherit the name
        checked: dict[tuple[str, str], bool] = {}
        for owner, method, hook, kind in _hooks():
            point = hook_point(owner, method)
            ok = checked.get((owner, method))
            if ok is None:
                ok = checked[(owner, method)] = _signature_ok(point)
            if ok:
                HookRegistry.register(point.path, hook, kind)
    except Exception as exc:  # a plugin must never stop SGLang from starting
        report_failure("registration_error", exc)
