"""The plugin's options: one validated record behind the engine config and the CLI flags.

A user turns the plugin on in one of two equivalent ways:

* Python: ``LLM(model=M, additional_config={"contextpilot": {...}})``;
* server: ``--enable-contextpilot`` plus ``--contextpilot-<option> VALUE`` flags,
  which :mod:`.flags` maps into the very same ``additional_config`` entry.

So the one place options are parsed is :meth:`PluginOptions.from_config`.  It
takes the plugin's own keys (scheduling, implicit documents, ...) and hands
every other key to :meth:`contextpilot_engine.config.PilotConfig.from_dict`,
so core options (``capacity_tokens``, ``hint_template``, ...) mean exactly
what they mean in the library.  An unknown key is an error that names it and
lists every known key, whichever way it was passed.

This module imports nothing from vLLM: it is used by the flag wrappers, which
run while vLLM is still building its argument parser.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from contextpilot_engine.config import PilotConfig

__all__ = ["CONFIG_KEY", "PluginOptions", "PLUGIN_OPTION_HELP", "options_from_vllm_config", "page_salt"]

#: the key under ``additional_config`` that holds the plugin's options
CONFIG_KEY = "contextpilot"


@dataclass(frozen=True)
class PluginOptions:
    """Everything the plugin reads from ``additional_config["contextpilot"]``."""

    #: False keeps the plugin off even though the config key is present
    enabled: bool = True
    #: recognise ``<document>...</document>`` elements in the system message as context blocks
    implicit_documents: bool = True
    #: add a ``contextpilot`` field (what was done) to chat completion responses
    report: bool = True
    #: mirror the engine's cache into an API server in another process ("auto") or not ("off")
    channel: str = "auto"
    #: order the waiting queue so requests with a cached prefix go first (engine core)
    cache_aware_scheduling: bool = False
    #: aging bound: a waiting request is overtaken at most this many times, then it goes next
    max_overtakes: int = 8
    #: waiting requests examined per scheduling decision (bounds the cost of the lookup)
    scheduling_window: int = 32
    #: core options (PilotConfig), validated by PilotConfig itself
    pilot: PilotConfig = field(default_factory=PilotConfig)

    def __post_init__(self) -> None:
        for name in ("enabled", "implicit_documents", "report", "cache_aware_scheduling"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"contextpilot option {name}: expected true or false, got {getattr(self, name)!r}")
        if self.channel not in ("auto", "off"):
            raise ValueError(f"contextpilot option channel: expected 'auto' or 'off', got {self.channel!r}")
        for name, minimum in (("max_overtakes", 0), ("scheduling_window", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"contextpilot option {name}: expected an int >= {minimum}, got {value!r}")

    # ------------------------------------------------------------------ parsing
    @classmethod
    def plugin_keys(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name != "pilot"]

    @classmethod
    def known_keys(cls) -> list[str]:
        return sorted(cls.plugin_keys() + [f.name for f in fields(PilotConfig)])

    @classmethod
    def from_config(cls, values: Any) -> "PluginOptions":
        """Validate the ``additional_config["contextpilot"]`` value (a dict, or None for defaults)."""
        if values is None:
            return cls()
        if not isinstance(values, Mapping):
            raise ValueError(
                f"additional_config[{CONFIG_KEY!r}]: expected a dict of options, got {type(values).__name__}"
            )
        unknown = sorted(str(k) for k in values if k not in cls.known_keys())
        if unknown:
            raise ValueError(
                f"additional_config[{CONFIG_KEY!r}]: unknown option(s) {unknown}; "
                f"known options: {cls.known_keys()}"
            )
        own = {k: values[k] for k in cls.plugin_keys() if k in values}
        core = {k: v for k, v in values.items() if k not in own}
        try:
            pilot = PilotConfig.from_dict(core)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"additional_config[{CONFIG_KEY!r}]: {exc}") from None
        return cls(**own, pilot=pilot)

    def to_dict(self) -> dict:
        out = {k: getattr(self, k) for k in self.plugin_keys()}
        out.update(self.pilot.to_dict())
        return out


#: one line of ``--help`` per plugin option (core options take theirs from PilotConfig's comments)
PLUGIN_OPTION_HELP = {
    "enabled": "Turn the plugin off while keeping its other options (default: true).",
    "implicit_documents": "Treat <document>...</document> elements in the system message as context blocks "
    "(default: true).",
    "report": "Add a 'contextpilot' field describing what was done to chat completion responses (default: true).",
    "channel": "'auto' mirrors the engine's prefix cache into the API server process over a local Unix socket; "
    "'off' disables that (reordering then uses popularity only) (default: auto).",
    "cache_aware_scheduling": "Order the waiting queue so requests whose prefix is cached run first "
    "(default: false).",
    "max_overtakes": "Aging bound of cache-aware scheduling: a waiting request is overtaken at most this many "
    "times (default: 8).",
    "scheduling_window": "Waiting requests examined per cache-aware scheduling decision (default: 32).",
}


def options_from_vllm_config(vllm_config: Any) -> PluginOptions | None:
    """The plugin's options for an engine, or None when the plugin is off for it."""
    extra = getattr(vllm_config, "additional_config", None)
    if not isinstance(extra, Mapping) or CONFIG_KEY not in extra:
        return None
    options = PluginOptions.from_config(extra[CONFIG_KEY])
    return options if options.enabled else None


def page_salt(cache_salt: Any, lora_name: Any) -> tuple | None:
    """The namespace mixed into a prompt's first canonical page key.

    vLLM puts ``cache_salt`` (first block) and the LoRA name (every block) into
    its block hashes, so two prompts that differ only there never share KV.
    The canonical keys must keep them apart too; the engine side and the
    request side both call this to get the same salt.
    """
    if cache_salt is None and lora_name is None:
        return None
    return ("cache_salt", cache_salt, "lora", lora_name)
