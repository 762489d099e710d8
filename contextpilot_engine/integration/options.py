"""The integration's options: one validated record for every adapter, the proxy and their flags.

A user turns contextpilot on in an engine with a switch (``--enable-contextpilot``)
plus ``--contextpilot-<option> VALUE`` flags, or with a dict in the engine's
Python configuration (vLLM: ``additional_config={"contextpilot": {...}}``).
Both end in :meth:`PluginOptions.from_dict`, the one place options are
parsed: it takes the integration's own keys (scheduling, implicit documents,
tenant isolation, ...) and hands every other key to
:meth:`contextpilot_engine.config.PilotConfig.from_dict`, so core options
(``capacity_tokens``, ``hint_template``, ...) mean exactly what they mean in
the library.  An unknown key is an error that names it and lists every known
key, whichever way it was passed.

:func:`add_flags` puts the flags into any ``argparse`` parser (vLLM's and
SGLang's server parsers are argparse parsers); a bad value is rejected by
argparse itself, as one line naming the flag.
"""

from __future__ import annotations

import argparse
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping

from contextpilot_engine.config import PilotConfig

__all__ = [
    "CONFIG_KEY",
    "ENABLE_FLAG",
    "OptionError",
    "PluginOptions",
    "add_flags",
    "flag_name",
    "options_from_namespace",
]

#: the key under an engine's free-form configuration that holds the options
CONFIG_KEY = "contextpilot"
#: the switch; every other flag is ``--contextpilot-<option>``
ENABLE_FLAG = "--enable-contextpilot"


class OptionError(ValueError):
    """An unknown option or a bad option value; the message names the option."""


@dataclass(frozen=True)
class PluginOptions:
    """Everything an adapter reads from its ``contextpilot`` configuration."""

    #: False keeps the integration off even though the configuration is present
    enabled: bool = True
    #: recognise ``<document>...</document>`` elements in the system message as context blocks
    implicit_documents: bool = True
    #: add a ``contextpilot`` field (what was done) to chat completion responses
    report: bool = True
    #: mirror the engine's cache into a request side in another process ("auto") or not ("off")
    channel: str = "auto"
    #: give every named tenant its own KV-cache namespace (the engine's cache salt), so tenants never share pages
    tenant_isolation: bool = True
    #: order the waiting queue so requests with a cached prefix go first (engine side)
    cache_aware_scheduling: bool = False
    #: aging bound: a waiting request is overtaken at most this many times, then it goes next
    max_overtakes: int = 8
    #: waiting requests examined per scheduling decision (bounds the cost of the lookup)
    scheduling_window: int = 32
    #: requests arriving within this many ms of each other are planned together (0: each alone)
    arrival_window_ms: float = 2.0
    #: while the engine is busy, a group of arrivals closes after this quiet gap instead
    arrival_busy_window_ms: float = 25.0
    #: a group of arrivals waits at most this long for more before it is planned
    arrival_max_wait_ms: float = 250.0
    #: a group of arrivals is planned once it holds this many requests
    arrival_max_group: int = 512
    #: core options (PilotConfig), validated by PilotConfig itself
    pilot: PilotConfig = field(default_factory=PilotConfig)

    def __post_init__(self) -> None:
        for name in ("enabled", "implicit_documents", "report", "tenant_isolation", "cache_aware_scheduling"):
            if not isinstance(getattr(self, name), bool):
                raise OptionError(f"{name}: expected true or false, got {getattr(self, name)!r}")
        if self.channel not in ("auto", "off"):
            raise OptionError(f"channel: expected 'auto' or 'off', got {self.channel!r}")
        for name, minimum in (("max_overtakes", 0), ("scheduling_window", 1), ("arrival_max_group", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise OptionError(f"{name}: expected an int >= {minimum}, got {value!r}")
        for name in ("arrival_window_ms", "arrival_busy_window_ms", "arrival_max_wait_ms"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 10_000:
                raise OptionError(f"{name}: expected a number of milliseconds in [0, 10000], got {value!r}")

    # ------------------------------------------------------------------ parsing
    @classmethod
    def own_keys(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name != "pilot"]

    @classmethod
    def known_keys(cls) -> list[str]:
        return sorted(cls.own_keys() + [f.name for f in fields(PilotConfig)])

    @classmethod
    def from_dict(cls, values: Any, where: str = CONFIG_KEY) -> "PluginOptions":
        """Validate a ``contextpilot`` configuration (a dict, or None for the defaults).

        Errors are :class:`OptionError`, prefixed with ``where`` (how the
        user passed the options, e.g. ``additional_config['contextpilot']``).
        """
        if values is None:
            return cls()
        if not isinstance(values, Mapping):
            raise OptionError(f"{where}: expected a dict of options, got {type(values).__name__}")
        unknown = sorted(str(k) for k in values if k not in cls.known_keys())
        if unknown:
            raise OptionError(f"{where}: unknown option(s) {unknown}; known options: {cls.known_keys()}")
        own = {k: values[k] for k in cls.own_keys() if k in values}
        core = {k: v for k, v in values.items() if k not in own}
        try:
            return cls(**own, pilot=PilotConfig.from_dict(core))
        except (TypeError, ValueError) as exc:
            raise OptionError(f"{where}: {exc}") from None

    def to_dict(self) -> dict:
        out = {k: getattr(self, k) for k in self.own_keys()}
        out.update(self.pilot.to_dict())
        return out


#: one line of ``--help`` per option
OPTION_HELP = {
    "enabled": "Turn contextpilot off while keeping its other options (default: true).",
    "implicit_documents": "Treat <document>...</document> elements in the system message as context blocks "
    "(default: true).",
    "report": "Add a 'contextpilot' field describing what was done to chat completion responses (default: true).",
    "channel": "'auto' mirrors the engine's prefix cache into the API server process over a local Unix socket; "
    "'off' disables that (reordering then uses popularity only) (default: auto).",
    "tenant_isolation": "Give each tenant named by a request its own KV-cache namespace (the engine's cache salt), "
    "so tenants never share cached pages; requests of the default tenant are not salted (default: true).",
    "cache_aware_scheduling": "Order the waiting queue so requests whose prefix is cached run first "
    "(default: false).",
    "max_overtakes": "Aging bound of cache-aware scheduling: a waiting request is overtaken at most this many "
    "times (default: 8).",
    "scheduling_window": "Waiting requests examined per cache-aware scheduling decision (default: 32).",
    "arrival_window_ms": "Requests that reach the server within this many milliseconds of each other (a client "
    "sending a batch at once) are planned together, like optimize_batch, and admitted in the planned order; a "
    "request with no other in that window is never held (0 turns it off; default: 2).",
    "arrival_busy_window_ms": "While requests let through earlier are still being served (the engine is busy), "
    "a group of concurrent arrivals closes only after this many milliseconds without a new arrival, so a short "
    "pause in a client's burst does not split it (never shorter than arrival_window_ms; default: 25).",
    "arrival_max_wait_ms": "Longest a group of concurrent arrivals waits for more requests before it is planned "
    "(default: 250).",
    "arrival_max_group": "A group of concurrent arrivals is planned as soon as it holds this many requests "
    "(default: 512).",
    "capacity_tokens": "Tokens one tenant's modelled cache holds (used only before the engine's mirror is attached).",
    "max_nodes": "Prefix-tree nodes kept per tenant.",
    "max_tenants": "Tenants kept at once (least recently used dropped first).",
    "max_tracked_blocks": "Blocks whose popularity each tenant tracks.",
    "popularity_decay": "Per-request discount of a block's popularity since it was last requested (1: none).",
    "recent_requests": "A tenant's last requests whose blocks, held together, order a new request's uncached "
    "blocks (0: popularity only).",
    "memory_budget_mb": "Memory budget of the whole process in MiB, shared by every tenant's prefix tree, "
    "popularity and lifetimes and every conversation; unset keeps the process's budget (1024 MiB unless set "
    "elsewhere).",
    "memory_budget_entries": "The same budget as a count of entries of all structures together ('none': no "
    "entry limit).",
    "max_blocks_per_context": "Most context blocks accepted in one request.",
    "max_delay": "Batch scheduling bound of the library's offline API (int, or 'none').",
    "deduplicate": "With a conversation id, replace a block whose full text is already elsewhere in the prompt by "
    "a hint to that copy (--no-contextpilot-deduplicate: always send blocks in full).",
    "hint_template": "Library deduplicate(): text replacing a block sent in an earlier turn; fields {doc_id} "
    "{turn} {position}.",
    "chunk_hint_template": "Library deduplicate(): text replacing repeated runs inside long blocks; fields {words} "
    "{turn} {position}.",
    "copy_hint_template": "Text replacing a block whose full text is elsewhere in the prompt; fields {doc_id} "
    "{where}.",
    "copy_chunk_hint_template": "Text replacing a run of a long block that is elsewhere in the prompt; fields "
    "{words} {where}.",
    "chunk_min_tokens": "Blocks at least this long are also deduplicated chunk by chunk.",
    "chunk_target_words": "Average chunk size (words) of that chunk-level deduplication.",
    "max_conversations": "Conversations remembered (least recently used dropped first).",
    "max_conversation_entries": "Blocks and chunks remembered per conversation.",
    "strategies": "Comma-separated offline reorder strategies (library batch API).",
    "instruction": "Fixed instruction placed before the documents in the system message.",
    "tenant": "Tenant of requests that name none.",
}


# ---------------------------------------------------------------------- flags
def flag_name(option: str) -> str:
    return "--contextpilot-" + option.replace("_", "-")


def _dest(option: str) -> str:
    return "contextpilot_" + option


def _optional_int(text: str) -> int | None:
    if text.strip().lower() in ("none", "null", ""):
        return None
    return int(text)


def _str_list(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def _checked(option: str, convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse ``type``: convert, then validate the value alone, so argparse names the flag."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {getattr(convert, '__name__', 'value')}")
        try:
            PluginOptions.from_dict({option: value})
        except OptionError as exc:
            raise argparse.ArgumentTypeError(str(exc).split(": ", 1)[-1]) from None
        return value

    parse.__name__ = getattr(convert, "__name__", option)
    return parse


def flag_specs() -> list[tuple[str, Any, str]]:
    """``(option, argparse type or 'bool', help)`` for every option that has a flag."""
    out: list[tuple[str, Any, str]] = []
    defaults = PluginOptions()
    for name in PluginOptions.own_keys():
        if name == "enabled":
            continue  # the switch is --enable-contextpilot
        value = getattr(defaults, name)
        kind: Any = "bool" if isinstance(value, bool) else _checked(name, type(value))
        out.append((name, kind, OPTION_HELP.get(name, name)))
    hints = typing.get_type_hints(PilotConfig)
    core_defaults = PilotConfig.defaults()
    for f in fields(PilotConfig):
        default = core_defaults[f.name]
        if f.name == "max_delay" or default is None:  # an int, or none
            convert: Any = _optional_int
        elif isinstance(default, tuple):
            convert = _str_list
        elif hints[f.name] is bool:
            convert = "bool"
        else:
            convert = type(default)
        kind = convert if convert == "bool" else _checked(f.name, convert)
        shown = ",".join(default) if isinstance(default, tuple) else default
        help_text = OPTION_HELP.get(f.name, f"PilotConfig option {f.name}.")
        out.append((f.name, kind, f"{help_text} (default: {shown!r})".replace("%", "%%")))
    return out


def add_flags(parser: Any, engine: str) -> None:
    """Add the "ContextPilot" argument group to an argparse parser (once; later calls do nothing).

    ``engine`` names the engine in the help text (``vllm``, ``sglang``, ``proxy``).
    """
    if any(ENABLE_FLAG in getattr(a, "option_strings", ()) for a in parser._actions):
        return
    python_hint = {
        "vllm": "in Python pass additional_config={'contextpilot': {...}}",
        "sglang": "in Python set the CONTEXTPILOT_SGLANG environment variable or use the ServerArgs subclass",
    }.get(engine, "")
    group = parser.add_argument_group(
        title="ContextPilot",
        description="Context-block reuse (contextpilot-engine): reorders and deduplicates the context blocks of "
        f"chat requests against the live prefix cache. Every --contextpilot-* flag needs {ENABLE_FLAG}"
        + (f"; {python_hint} with the same option names (underscores)." if python_hint else "."),
    )
    group.add_argument(
        ENABLE_FLAG,
        action="store_true",
        default=False,
        help="Turn contextpilot on (it needs the engine's prefix cache to reuse anything).",
    )
    # default=SUPPRESS: an option not given is absent from the namespace (so only given ones are
    # mapped), and help formatters do not print a misleading "(default: None)".
    for name, kind, help_text in flag_specs():
        if kind == "bool":
            group.add_argument(flag_name(name), dest=_dest(name), action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_text)
        else:
            group.add_argument(flag_name(name), dest=_dest(name), type=kind, default=argparse.SUPPRESS,
                               help=help_text)


def options_from_namespace(args: argparse.Namespace) -> tuple[bool, dict]:
    """``(switch given, {option: value} of the --contextpilot-* flags given)``.

    Raises :class:`OptionError` for flags given without the switch.
    """
    given = {}
    for name, _, _ in flag_specs():
        if hasattr(args, _dest(name)):  # flags not given are absent (default=SUPPRESS)
            given[name] = getattr(args, _dest(name))
    enabled = bool(getattr(args, "enable_contextpilot", False))
    if given and not enabled:
        flags = ", ".join(flag_name(k) for k in sorted(given))
        raise OptionError(f"{flags} given without {ENABLE_FLAG}; add it to turn contextpilot on")
    return enabled, given
