"""Where the plugin's options and the engine's identity live in SGLang.

* Options: the ``--enable-contextpilot`` / ``--contextpilot-*`` flags put
  them on the server arguments as the bookkeeping attribute
  ``_contextpilot`` (SGLang pickles a ``ServerArgs``' extra attributes to
  its subprocesses and publishes them in each one's runtime context).  For
  ``sglang.Engine(...)`` in Python, the environment variable
  :data:`OPTIONS_ENV` (a JSON object of options, ``{}`` for the defaults)
  turns the plugin on with the same options, in every process the engine
  starts.
* Identity: SGLang's main process and its scheduler processes share the
  environment, so :func:`engine_id` (a random id the first process puts in
  :data:`ENGINE_ENV`) plus the server's port names one engine in all of them.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

from contextpilot_engine.integration.options import OptionError, PluginOptions

__all__ = ["OPTIONS_ENV", "ENGINE_ENV", "ATTR", "options_from_server_args", "engine_key", "engine_id"]

#: JSON options that turn the plugin on for ``sglang.Engine`` (and any server started without the flags)
OPTIONS_ENV = "CONTEXTPILOT_SGLANG"
#: the id every process of one SGLang deployment shares (set by the first process that loads the plugin)
ENGINE_ENV = "CONTEXTPILOT_SGLANG_ENGINE_ID"
#: the ServerArgs attribute holding the options given by flags
ATTR = "_contextpilot"


def engine_id() -> str:
    value = os.environ.get(ENGINE_ENV)
    if not value:
        value = uuid.uuid4().hex[:16]
        os.environ[ENGINE_ENV] = value  # the scheduler processes SGLang spawns inherit it
    return value


def engine_key(server_args: Any) -> str:
    return f"sglang-{engine_id()}-{getattr(server_args, 'port', 0)}"


def options_from_server_args(server_args: Any) -> PluginOptions | None:
    """The plugin's options for an SGLang deployment, or None when it is off."""
    given = getattr(server_args, ATTR, None) if server_args is not None else None
    where = "--contextpilot-* flags"
    if given is None:
        text = os.environ.get(OPTIONS_ENV)
        if text is None:
            return None
        where = f"${OPTIONS_ENV}"
        try:
            given = json.loads(text) if text.strip() else {}
        except ValueError as exc:
            raise OptionError(f"{where}: not a JSON object of options ({exc})") from None
    options = PluginOptions.from_dict(given, where)
    return options if options.enabled else None


def runtime_server_args() -> Any:
    """The server arguments published in this process (scheduler side), or None."""
    try:
        from sglang.srt.runtime_context import get_server_args

        return get_server_args()
    except Exception:  # nothing published (a cache built outside a scheduler)
        return None


def runtime_ranks() -> tuple[int, int, int, int]:
    """``(dp_rank, attn_tp_rank, pp_rank, attn_cp_rank)`` of this scheduler process (zeros if unknown)."""
    try:
        from sglang.srt.runtime_context import get_parallel

        p = get_parallel()
    except Exception:
        return 0, 0, 0, 0

    def rank(name: str) -> int:
        try:
            return int(getattr(p, name) or 0)
        except Exception:  # not written in this process (no data-parallel controller, a unit test)
            return 0

    return rank("dp_rank"), rank("attn_tp_rank"), rank("pp_rank"), rank("attn_cp_rank")
