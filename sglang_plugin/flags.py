"""``--enable-contextpilot`` and ``--contextpilot-*`` on SGLang's server command line.

Two AFTER hooks on :class:`sglang.srt.server_args.ServerArgs`:

* ``add_cli_args``: the integration layer's "ContextPilot" argument group
  (:func:`contextpilot_engine.integration.options.add_flags`), shown in
  ``--help``; a bad value is argparse's own one-line error naming the flag;
* ``from_cli_args``: with the switch, the options (validated, one line naming
  the flag on error) become the ``_contextpilot`` attribute of the new server
  arguments, which SGLang carries to every process it starts.
"""

from __future__ import annotations

import sys
from typing import Any

from contextpilot_engine.integration.failopen import logger
from contextpilot_engine.integration.options import OptionError, PluginOptions, add_flags, options_from_namespace

from .config import ATTR

__all__ = ["after_add_cli_args", "after_from_cli_args"]


def after_add_cli_args(result: Any, parser: Any, *args: Any, **kwargs: Any) -> None:
    try:
        add_flags(parser, "sglang")
    except Exception as exc:  # never break SGLang's own command line
        logger.error("contextpilot: could not add its flags: %s", exc)


def after_from_cli_args(result: Any, cls: Any, args: Any, *rest: Any, **kwargs: Any) -> None:
    try:
        enabled, given = options_from_namespace(args)
        if enabled:
            PluginOptions.from_dict(given, "--contextpilot-* flags")
    except OptionError as exc:  # the user's command line: one line, as argparse reports errors
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if enabled:
        setattr(result, ATTR, dict(given))
