"""``--enable-contextpilot`` and ``--contextpilot-*`` flags, and turning the plugin on per engine.

vLLM's plugin loader calls :func:`vllm_plugin.register` from
``AsyncEngineArgs.add_cli_args`` *before* that calls
``EngineArgs.add_cli_args``, and from ``EngineArgs.__post_init__``.  So
wrapping three ``EngineArgs`` methods here is enough for:

* ``add_cli_args`` (static): the integration layer's "ContextPilot" argument
  group (:func:`contextpilot_engine.integration.options.add_flags`), shown in
  ``--help``;
* ``from_cli_args`` (class method): the flags become
  ``additional_config["contextpilot"]``, merged over any such entry given
  with ``--additional-config``.  So the server and
  ``LLM(additional_config={"contextpilot": {...}})`` take the same path.
  A bad flag value is rejected by argparse itself, a flag without the
  switch here, each as one line naming the flag;
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
import sys
from typing import Any

from contextpilot_engine.integration.failopen import logger, once, report_failure
from contextpilot_engine.integration.options import (
    CONFIG_KEY,
    OptionError,
    PluginOptions,
    add_flags,
    options_from_namespace,
)

from .config import WHERE, options_from_vllm_config, state_for_config
from .hook_points import patch

__all__ = ["install_flag_hooks", "ENGINE_HOOKS_ENV", "activate"]

#: set in the environment by a process that configured an engine with the plugin on
ENGINE_HOOKS_ENV = "CONTEXTPILOT_VLLM_ENGINE_HOOKS"


def _apply_flags(engine_args: Any, args: argparse.Namespace) -> None:
    enabled, given = options_from_namespace(args)
    if not enabled:
        return
    extra = dict(engine_args.additional_config or {})
    merged = dict(extra.get(CONFIG_KEY) or {})
    merged.update(given)
    if not merged.get("enabled", True):
        merged["enabled"] = True  # the switch on the command line wins over a config that says off
    PluginOptions.from_dict(merged, WHERE)  # fail fast with the option's name
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

    install_engine_hooks()
    install_frontend_hooks()
    state_for_config(vllm_config, options)
    logger.info("contextpilot: enabled for engine %s with %s", vllm_config.instance_id, options.to_dict())


@once
def install_flag_hooks() -> None:
    from vllm.engine.arg_utils import EngineArgs

    def make_add(orig):
        def add_cli_args(parser, *args, **kwargs):
            parser = orig(parser, *args, **kwargs)
            try:
                add_flags(parser, "vllm")
            except Exception as exc:  # never break vLLM's own CLI
                logger.error("contextpilot: could not add its flags: %s", exc, exc_info=exc)
            return parser

        return add_cli_args

    def make_from(orig):
        def from_cli_args(cls, args):
            engine_args = orig(cls, args)
            try:
                _apply_flags(engine_args, args)
            except OptionError as exc:  # the user's command line: one line, as argparse reports errors
                print(f"error: {exc}", file=sys.stderr)
                raise SystemExit(2) from None
            return engine_args

        return from_cli_args

    def make_create(orig):
        def create_engine_config(self, *args, **kwargs):
            extra = self.additional_config
            if isinstance(extra, dict) and CONFIG_KEY in extra:
                PluginOptions.from_dict(extra[CONFIG_KEY], WHERE)  # unknown options: a clear error, before any work
            config = orig(self, *args, **kwargs)
            try:
                activate(config)
            except Exception as exc:  # fail open: vLLM serves without the plugin
                report_failure("activation_error", exc)
            return config

        return create_engine_config

    patch(EngineArgs, "add_cli_args", make_add)
    patch(EngineArgs, "from_cli_args", make_from)
    patch(EngineArgs, "create_engine_config", make_create)
