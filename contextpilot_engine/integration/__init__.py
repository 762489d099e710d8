"""The engine-neutral integration layer: everything an engine adapter or the proxy shares.

An adapter (``contextpilot_engine.vllm_plugin``, ``contextpilot_engine.sglang_plugin``)
holds only engine hooks and flags.  Below it, one request interface, one
mirror, one set of options and errors:

* :mod:`.options`: the validated option record and its ``argparse`` flags;
* :mod:`.requests`: the ``contextpilot`` request object, headers, client errors;
* :mod:`.conversation`: which blocks a chat conversation carries, and its rewrite;
* :mod:`.rewriting`: the request path (plan, let the engine tokenize, bind);
* :mod:`.binding`: tying a served prompt's blocks to the engine's pages;
* :mod:`.engine_keys`: engine page hashes -> canonical page keys;
* :mod:`.mirror`: the engine side's page mirror, updated inside cache calls;
* :mod:`.channel`: page events from the cache's process to the request side's;
* :mod:`.state`: per-engine state keyed by the engine's identity;
* :mod:`.failopen`: failures that never fail a request, signature-checked patching.

Nothing here imports an engine.
"""

from __future__ import annotations

from .conversation import DOCUMENT_PATTERN, Plan, fallback_conversation, plan_conversation
from .engine_keys import EngineKeyMap, page_salt
from .mirror import PageMirror, PagePublisher
from .options import CONFIG_KEY, ENABLE_FLAG, OptionError, PluginOptions, add_flags, options_from_namespace
from .requests import (
    HEADER_CONVERSATION,
    HEADER_TENANT,
    ContextPilotRequestError,
    RequestSpec,
    parse_spec,
    spec_from_http,
)
from .rewriting import Prepared, ServedTokens
from .state import EngineState, find_state, get_state, socket_path

__all__ = [
    "CONFIG_KEY",
    "DOCUMENT_PATTERN",
    "ENABLE_FLAG",
    "HEADER_CONVERSATION",
    "HEADER_TENANT",
    "ContextPilotRequestError",
    "EngineKeyMap",
    "EngineState",
    "OptionError",
    "PageMirror",
    "PagePublisher",
    "Plan",
    "PluginOptions",
    "Prepared",
    "RequestSpec",
    "ServedTokens",
    "add_flags",
    "fallback_conversation",
    "find_state",
    "get_state",
    "options_from_namespace",
    "page_salt",
    "parse_spec",
    "plan_conversation",
    "socket_path",
    "spec_from_http",
]
