"""Where the plugin's options and engine identity live in a vLLM configuration.

* Options: ``VllmConfig.additional_config["contextpilot"]``, validated by the
  integration layer's :class:`~contextpilot_engine.integration.options.PluginOptions`
  (the flags are mapped into the same entry, see :mod:`.flags`).
* Identity: ``VllmConfig.instance_id``, shared by every process of one engine
  (vLLM appends ``_dp<rank>`` for data-parallel ranks); it keys the
  per-engine state (:mod:`contextpilot_engine.integration.state`).

This module imports nothing from vLLM: the flag wrappers use it while vLLM is
still building its argument parser.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from contextpilot_engine.integration.options import CONFIG_KEY, PluginOptions
from contextpilot_engine.integration.state import EngineState, get_state

__all__ = ["WHERE", "options_from_vllm_config", "engine_key", "state_for_config"]

#: how the options are named in error messages
WHERE = f"additional_config[{CONFIG_KEY!r}]"


def options_from_vllm_config(vllm_config: Any) -> PluginOptions | None:
    """The plugin's options for an engine, or None when the plugin is off for it."""
    extra = getattr(vllm_config, "additional_config", None)
    if not isinstance(extra, Mapping) or CONFIG_KEY not in extra:
        return None
    options = PluginOptions.from_dict(extra[CONFIG_KEY], WHERE)
    return options if options.enabled else None


def engine_key(vllm_config: Any) -> tuple[str, int]:
    """``(engine id, data-parallel rank)`` of a config; the id is shared by the engine's processes."""
    instance = str(getattr(vllm_config, "instance_id", "") or "")
    base, sep, rank = instance.rpartition("_dp")
    if sep and rank.isdigit():
        return base, int(rank)
    return instance, 0


def state_for_config(vllm_config: Any, options: PluginOptions, page_size: int | None = None) -> EngineState:
    """This process's state for the engine of ``vllm_config``, made on first use."""
    if page_size is None:
        page_size = getattr(getattr(vllm_config, "cache_config", None), "block_size", None)
    return get_state(engine_key(vllm_config)[0], options, page_size)
