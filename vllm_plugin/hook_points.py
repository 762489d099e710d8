"""Every vLLM method the plugin wraps, with the signature its wrapper was written for.

One list, used twice: the hooks check it before patching (a mismatch keeps
vLLM's method and logs a warning, see
:func:`contextpilot_engine.integration.failopen.patch_method`), and
``scripts/check_vllm_signatures.py`` checks it against another vLLM release
(for example a downloaded wheel) without installing that release.  The
record itself is the integration layer's (:mod:`contextpilot_engine.integration.hook_points`).
"""

from __future__ import annotations

from contextpilot_engine.integration.hook_points import HookPoint, find, matches

__all__ = ["HookPoint", "HOOK_POINTS", "hook_point", "matches", "patch"]


HOOK_POINTS: tuple[HookPoint, ...] = (
    # flags and activation (every process)
    HookPoint("vllm.engine.arg_utils", "EngineArgs", "add_cli_args", ("parser",)),
    HookPoint("vllm.engine.arg_utils", "EngineArgs", "from_cli_args", ("cls", "args"), prefix_only=False),
    HookPoint("vllm.engine.arg_utils", "EngineArgs", "create_engine_config", ("self",)),
    # engine core: attach and detach
    HookPoint("vllm.v1.core.sched.scheduler", "Scheduler", "__init__",
              ("self", "vllm_config", "kv_cache_config", "structured_output_manager", "block_size")),
    HookPoint("vllm.v1.core.sched.scheduler", "Scheduler", "shutdown", ("self",)),
    # engine core: the block-pool mirror (the first three must match exactly)
    HookPoint("vllm.v1.core.block_pool", "BlockPool", "_insert_block_hash", ("self", None, "block", "num_tokens"),
              prefix_only=False),
    HookPoint("vllm.v1.core.block_pool", "BlockPool", "_remove_cached_block_hashes", ("self", "block"),
              prefix_only=False),
    HookPoint("vllm.v1.core.block_pool", "BlockPool", "reset_prefix_cache", ("self",), prefix_only=False),
    HookPoint("vllm.v1.core.block_pool", "BlockPool", "cache_full_blocks",
              ("self", "request", "blocks", "num_cached_blocks", "num_full_blocks", "block_size",
               "kv_cache_group_id")),
    HookPoint("vllm.v1.core.block_pool", "BlockPool", "cache_partial_block", ("self", "request", "block", "num_tokens"),
              optional=True),
    HookPoint("vllm.v1.core.block_pool", "BlockPool", "get_new_blocks", ("self", "num_blocks"), optional=True),
    HookPoint("vllm.v1.core.block_pool", "BlockPool", "evict_blocks", ("self", "block_ids"), optional=True),
    HookPoint("vllm.v1.core.block_pool", "BlockPool", "move_block_hashes", ("self", "src_block", "dst_block"),
              optional=True),
    # request side
    HookPoint("vllm.renderers.base", "BaseRenderer", "render_chat",
              ("self", "conversations", "chat_params", "tok_params")),
    HookPoint("vllm.renderers.base", "BaseRenderer", "render_chat_async",
              ("self", "conversations", "chat_params", "tok_params")),
    HookPoint("vllm.entrypoints.openai.chat_completion.serving", "OpenAIServingChat", "create_chat_completion",
              ("self", "request", "raw_request"), prefix_only=False),
    HookPoint("vllm.entrypoints.openai.completion.serving", "OpenAIServingCompletion", "create_completion",
              ("self", "request", "raw_request"), prefix_only=False, optional=True),
)


def hook_point(owner: str, method: str) -> HookPoint:
    return find(HOOK_POINTS, owner, method)


def patch(owner: type, method: str, make_wrapper) -> bool:
    """Wrap ``owner.method`` if it still has the signature of its hook point (see ``failopen.patch_method``)."""
    from contextpilot_engine.integration.failopen import patch_method

    point = hook_point(owner.__name__, method)
    return patch_method(owner, method, make_wrapper, point.params, prefix_only=point.prefix_only)
