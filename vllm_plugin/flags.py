"""``--enable-contextpilot`` and ``--contextpilot-*`` flags, and turning the plugin on per engine.

vLLM's plugin loader calls :func:`vllm_plugin.register` from
``AsyncEngineArgs.add_cli_args`` *before* that calls
``EngineArgs.add_cli_args``, and from ``EngineArgs.__post_init__``.  So
wrapping three ``EngineArgs`` methods here is enough for:

* ``add_cli_args`` (static): a "ContextPilot" argument group, shown in
  ``--help``, with ``--enable-contextpilot`` and one ``--contextpilot-<option>``
  flag per option (:mod:`.options`);
* ``from_cli_args`` (class method): the flags become
  ``additional_config["contextpilot"]``, merged over any such entry given
  with ``--additional-config``.  So the server and
  ``LLM(additional_config={"contextpilot": {...}})`` take the same path;
* ``create_engine_config``: the options are validated (an unknown option is a
  ``ValueError`` naming it), and for an engine with the plugin on the
  runtime hooks are installed in this process and the environment variable
  :data:`ENGINE_HOOKS_ENV` is set, so the engine-core processes vLLM spawns
  next install the engine-side hooks when they load the plugin.

These three wrappers are the only patches applied without the flag; they pass
everything through unchanged when no ``contextpilot`` option is present.
"""

from __future__ import annotations

import argparse
import os
import typing
from dataclasses import fields
from typing import Any

from contextpilot_engine.config import PilotConfig

from .failopen import logger, patch_method
from .options import CONFIG_KEY, PLUGIN_OPTION_HELP, PluginOptions, options_from_vllm_config

__all__ = ["install_flag_hooks", "ENGINE_HOOKS_ENV", "cli_options", "activate"]

#: set in the environment by a process that configured an engine with the plugin on
ENGINE_HOOKS_ENV = "CONTEXTPILOT_VLLM_ENGINE_HOOKS"

#: help text of the core options (their meaning is PilotConfig's)
_CORE_HELP = {
    "capacity_tokens": "Tokens one tenant's modelled cache holds (used only before the engine's mirror is attached).",
    "max_nodes": "Prefix-tree nodes kept per tenant.",
    "max_tenants": "Tenants kept at once (least recently used dropped first).",
    "max_tracked_blocks": "Blocks whose popularity each tenant tracks.",
    "popularity_decay": "Per-request discount of a block's popularity since it was last requested (1: none).",
    "max_blocks_per_context": "Most context blocks accepted in one request.",
    "max_delay": "Batch scheduling bound of the library's offline API (int, or 'none').",
    "deduplicate": "Replace blocks already sent in a request's conversation by hints (--no-contextpilot-deduplicate: "
    "resend them, keeping only the conversation-aware order).",
    "hint_template": "Text replacing a block already sent in the conversation; fields {doc_id} {turn} {position}.",
    "chunk_hint_template": "Text replacing repeated runs inside long blocks; fields {words} {turn} {position}.",
    "chunk_min_tokens": "Blocks at least this long are also deduplicated chunk by chunk.",
    "chunk_target_words": "Average chunk size (words) of that chunk-level deduplication.",
    "max_conversations": "Conversations remembered for deduplication (least recently used dropped first).",
    "max_conversation_entries": "Blocks and chunks remembered per conversation.",
    "strategies": "Comma-separated offline reorder strategies (library batch API).",
    "instruction": "Fixed instruction placed before the documents in the system message.",
    "tenant": "Tenant of requests that name none.",
}


def _optional_int(text: str) -> int | None:
    if text.strip().lower() in ("none", "null", ""):
        return None
    return int(text)


def _str_list(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def cli_options() -> list[tuple[str, Any, str]]:
    """``(option, argparse type or 'bool', help)`` for every option that has a flag."""
    out: list[tuple[str, Any, str]] = []
    defaults = PluginOptions()
    for name in PluginOptions.plugin_keys():
        if name == "enabled":
            continue  # --enable-contextpilot is the switch
        value = getattr(defaults, name)
        kind = "bool" if isinstance(value, bool) else type(value)
        out.append((name, kind, PLUGIN_OPTION_HELP.get(name, name)))
    hints = typing.get_type_hints(PilotConfig)
    core_defaults = PilotConfig.defaults()
    for f in fields(PilotConfig):
        hint = hints[f.name]
        default = core_defaults[f.name]
        if f.name == "max_delay":
            kind: Any = _optional_int
        elif isinstance(default, tuple):
            kind = _str_list
        elif hint is bool:
            kind = "bool"
        elif isinstance(default, int):
            kind = int
        elif isinstance(default, float):
            kind = float
        else:
            kind = str
        shown = ",".join(default) if isinstance(default, tuple) else default
        help_text = _CORE_HELP.get(f.name, f"PilotConfig option {f.name}.")
        out.append((f.name, kind, f"{help_text} (default: {shown!r})".replace("%", "%%")))
    return out


def _flag(name: str) -> str:
    return "--contextpilot-" + name.replace("_", "-")


def _dest(name: str) -> str:
    return "contextpilot_" + name


def _add_arguments(parser: Any) -> None:
    if any("--enable-contextpilot" in getattr(a, "option_strings", ()) for a in parser._actions):
        return
    group = parser.add_argument_group(
        title="ContextPilot",
        description="Context-block reuse (contextpilot-engine plugin): reorders and deduplicates the context "
        "blocks of chat requests against the live prefix cache. Every --contextpilot-* flag needs "
        "--enable-contextpilot; in Python pass additional_config={'contextpilot': {...}} with the same "
        "option names (underscores).",
    )
    group.add_argument(
        "--enable-contextpilot",
        action="store_true",
        default=False,
        help="Turn the ContextPilot plugin on (needs --enable-prefix-caching to reuse anything).",
    )
    # default=SUPPRESS: an option not given is absent from the namespace (so only given ones are
    # mapped), and vLLM's help formatter does not print a misleading "(default: None)".
    for name, kind, help_text in cli_options():
        if kind == "bool":
            group.add_argument(_flag(name), dest=_dest(name), action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_text)
        else:
            group.add_argument(_flag(name), dest=_dest(name), type=kind, default=argparse.SUPPRESS, help=help_text)


def options_from_namespace(args: argparse.Namespace) -> tuple[bool, dict]:
    """``(--enable-contextpilot given, {option: value} of the --contextpilot-* flags given)``."""
    given = {}
    for name, _, _ in cli_options():
        if hasattr(args, _dest(name)):  # flags not given are absent (default=SUPPRESS)
            given[name] = getattr(args, _dest(name))
    return bool(getattr(args, "enable_contextpilot", False)), given


def _apply_flags(engine_args: Any, args: argparse.Namespace) -> None:
    enabled, given = options_from_namespace(args)
    if not enabled:
        if given:
            flags = ", ".join(_flag(k) for k in sorted(given))
            raise ValueError(f"{flags} given without --enable-contextpilot; add it to turn the plugin on")
        return
    extra = dict(engine_args.additional_config or {})
    merged = dict(extra.get(CONFIG_KEY) or {})
    merged.update(given)
    PluginOptions.from_config(merged)  # fail fast with the option's name
    extra[CONFIG_KEY] = merged
    engine_args.additional_config = extra


def activate(vllm_config: Any) -> None:
    """Install the runtime hooks for an engine whose config turns the plugin on."""
    options = options_from_vllm_config(vllm_config)
    if options is None:
        return
    os.environ[ENGINE_HOOKS_ENV] = "1"
    from .engine_hooks import install_engine_hooks
    from .frontend import install_frontend_hooks
    from .state import get_state

    install_engine_hooks()
    install_frontend_hooks()
    get_state(vllm_config, options)
    logger.info("contextpilot: enabled for engine %s with %s", vllm_config.instance_id, options.to_dict())


_installed = False


def install_flag_hooks() -> None:
    global _installed
    if _installed:
        return
    from vllm.engine.arg_utils import EngineArgs

    def make_add(orig):
        def add_cli_args(parser, *args, **kwargs):
            parser = orig(parser, *args, **kwargs)
            try:
                _add_arguments(parser)
            except Exception as exc:  # never break vLLM's own CLI
                logger.error("contextpilot: could not add its flags: %s", exc, exc_info=exc)
            return parser

        return add_cli_args

    def make_from(orig):
        def from_cli_args(cls, args):
            engine_args = orig(cls, args)
            _apply_flags(engine_args, args)  # a wrong flag is the user's error: let it raise
            return engine_args

        return from_cli_args

    def make_create(orig):
        def create_engine_config(self, *args, **kwargs):
            extra = self.additional_config
            if isinstance(extra, dict) and CONFIG_KEY in extra:
                PluginOptions.from_config(extra[CONFIG_KEY])  # unknown options: a clear error, before any work
            config = orig(self, *args, **kwargs)
            try:
                activate(config)
            except Exception as exc:  # fail open: vLLM serves without the plugin
                from .failopen import report_failure

                report_failure("plugin activation", exc)
            return config

        return create_engine_config

    patch_method(EngineArgs, "add_cli_args", make_add, ["parser"], prefix_only=True)
    patch_method(EngineArgs, "from_cli_args", make_from, ["cls", "args"])
    patch_method(EngineArgs, "create_engine_config", make_create, ["self"], prefix_only=True)
    _installed = True
