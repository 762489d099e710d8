"""Every SGLang method the plugin hooks, with the signature its hook was written for.

The hooks are registered with SGLang's own ``HookRegistry`` (no other
patching); before registering, each target's parameters are compared with
its :class:`~contextpilot_engine.integration.hook_points.HookPoint`, and a
mismatch leaves that target alone with a warning.
"""

from __future__ import annotations

from contextpilot_engine.integration.hook_points import HookPoint, find

__all__ = ["HOOK_POINTS", "hook_point"]

_CACHE = "sglang.srt.mem_cache.unified_radix_cache"
_CHAT = "sglang.srt.entrypoints.openai.serving_chat"

HOOK_POINTS: tuple[HookPoint, ...] = (
    # flags (every process that parses or builds server arguments)
    HookPoint("sglang.srt.server_args", "ServerArgs", "add_cli_args", ("parser",)),
    HookPoint("sglang.srt.server_args", "ServerArgs", "from_cli_args", ("cls", "args"), prefix_only=False),
    # scheduler process: the mirror of the radix cache
    HookPoint(_CACHE, "UnifiedRadixCache", "__init__", ("self", "params")),
    HookPoint(_CACHE, "UnifiedRadixCache", "take_events", ("self",), prefix_only=False),
    HookPoint(_CACHE, "UnifiedRadixCache", "insert", ("self", "params")),
    HookPoint(_CACHE, "UnifiedRadixCache", "evict", ("self", "params")),
    HookPoint(_CACHE, "UnifiedRadixCache", "evict_for_alloc", ("self", "params")),
    HookPoint(_CACHE, "UnifiedRadixCache", "reset", ("self",)),
    HookPoint(_CACHE, "UnifiedRadixCache", "checkpoint", ("self", "req")),
    # HiCache moves pages between device and host outside the calls above
    HookPoint(_CACHE, "UnifiedRadixCache", "writing_check", ("self",), optional=True),
    HookPoint(_CACHE, "UnifiedRadixCache", "loading_check", ("self",), optional=True),
    HookPoint(_CACHE, "UnifiedRadixCache", "check_hicache_events", ("self",), optional=True),
    HookPoint(_CACHE, "UnifiedRadixCache", "init_load_back", ("self",), optional=True),
    HookPoint(_CACHE, "UnifiedRadixCache", "evict_host", ("self",), optional=True),
    # scheduler process: cache-aware order
    HookPoint("sglang.srt.managers.schedule_policy", "SchedulePolicy", "calc_priority", ("self", "waiting_queue")),
    # main process: the chat request path and the response field
    HookPoint(_CHAT, "OpenAIServingChat", "_convert_to_internal_request", ("self", "request", "raw_request")),
    HookPoint(_CHAT, "OpenAIServingChat", "_build_chat_response", ("self", "request", "ret", "created")),
    HookPoint(_CHAT, "OpenAIServingChat", "_generate_chat_stream", ("self", "adapted_request", "request",
                                                                     "raw_request")),
)


def hook_point(owner: str, method: str) -> HookPoint:
    return find(HOOK_POINTS, owner, method)
