"""Every tunable of contextpilot-engine in one validated record.

The same record is built from keyword arguments (library), from a dict (the
engines' ``additional_config={"contextpilot": {...}}``) or from command-line
flags (``--contextpilot-capacity-tokens`` ...), so an option means the same
thing everywhere and an unknown or ill-typed option is rejected by name.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from .chunking import MIN_CHUNK_WORDS
from .index import IndexLimits

__all__ = ["PilotConfig", "DEFAULT_HINT", "DEFAULT_CHUNK_HINT", "DEFAULT_COPY_HINT", "DEFAULT_COPY_CHUNK_HINT"]

#: replaces a whole block already sent earlier in the conversation
DEFAULT_HINT = "[Document {doc_id} was already provided in turn {turn} as document [{position}]; refer to it there.]"
#: replaces a run of text inside a long block that already appeared earlier in the conversation
DEFAULT_CHUNK_HINT = "[... {words} words identical to turn {turn}, document [{position}] ...]"
#: replaces a block whose full text is elsewhere in the prompt being served ({where}: e.g. "message 3 (tool)")
DEFAULT_COPY_HINT = "[Document {doc_id} is not repeated here: its full text is in {where}.]"
#: replaces a run of a long block that is elsewhere in the prompt being served
DEFAULT_COPY_CHUNK_HINT = "[... {words} words identical to {where} ...]"


@dataclass(frozen=True)
class PilotConfig:
    # ---- index bounds (meanings and defaults: IndexLimits)
    capacity_tokens: int = IndexLimits.capacity_tokens
    max_nodes: int = IndexLimits.max_nodes
    max_tenants: int = IndexLimits.max_tenants
    max_tracked_blocks: int = IndexLimits.max_tracked_blocks
    popularity_decay: float = IndexLimits.popularity_decay
    recent_requests: int = IndexLimits.recent_requests
    # ---- the process-wide memory budget (see memory_budget.py): every tenant's prefix tree,
    # popularity and lifetimes and every conversation draw on it, and the bounds above stay upper
    # limits inside it.  Setting it sets the budget of the whole process (the last one set wins);
    # None leaves the budget as it is (DEFAULT_BUDGET_MB until some configuration sets it).
    memory_budget_mb: int | None = None
    #: the same budget as a count of entries (tree nodes, tracked blocks, remembered blocks and
    #: chunks, conversations, run lengths); None leaves it as it is (no entry limit by default)
    memory_budget_entries: int | None = None
    # ---- input limits
    max_blocks_per_context: int = 4096
    # ---- scheduling: in a batch, request i runs at position i + max_delay at the latest (None: no
    # bound).  Pulling a request out of its subtree costs cache hits when the cache is smaller than
    # the batch, so the default leaves batches of up to 4096 requests purely cache-ordered.
    max_delay: int | None = 4096
    # ---- deduplication
    #: with a conversation id, replace a block whose full text is already elsewhere in the prompt
    #: being served (an earlier message the client resent) by a hint to that copy.  False sends
    #: every block in full; the conversation id then still informs the order (blocks about to
    #: leave go last).
    deduplicate: bool = True
    #: ``deduplicate()`` (the caller keeps earlier turns): a block sent in an earlier turn
    hint_template: str = DEFAULT_HINT
    chunk_hint_template: str = DEFAULT_CHUNK_HINT
    #: ``optimize``/engines: a block (or a run of a long block) whose text is elsewhere in the prompt
    copy_hint_template: str = DEFAULT_COPY_HINT
    copy_chunk_hint_template: str = DEFAULT_COPY_CHUNK_HINT
    #: blocks with at least this many tokens are also deduplicated chunk by chunk
    chunk_min_tokens: int = 256
    #: average chunk size of the content-defined chunking, in words
    chunk_target_words: int = 48
    max_conversations: int = 10_000
    #: blocks and chunks remembered per conversation (oldest turns forgotten first)
    max_conversation_entries: int = 50_000
    # ---- offline reorder strategies tried (the best tree wins)
    strategies: tuple[str, ...] = ("merge_tree", "level_greedy")
    # ---- prompt
    instruction: str = "Answer the question using the documents below."
    tenant: str = "default"

    def __post_init__(self) -> None:
        for name in _POSITIVE_INTS:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        # validate these, naming the option
        IndexLimits(
            popularity_decay=self.popularity_decay,
            recent_requests=self.recent_requests,
            memory_budget_mb=self.memory_budget_mb,
            memory_budget_entries=self.memory_budget_entries,
        )
        d = self.max_delay
        if d is not None and (not isinstance(d, int) or isinstance(d, bool) or d < 0):
            raise ValueError(f"max_delay: expected an int >= 0 or None, got {d!r}")
        from .batch_reorder import STRATEGIES

        strategies = self.strategies
        if isinstance(strategies, list):
            strategies = tuple(strategies)
            object.__setattr__(self, "strategies", strategies)
        if not isinstance(strategies, tuple) or not strategies or any(s not in STRATEGIES for s in strategies):
            raise ValueError(f"strategies: expected a non-empty list from {list(STRATEGIES)}, got {strategies!r}")
        if not isinstance(self.deduplicate, bool):
            raise ValueError(f"deduplicate: expected a bool, got {self.deduplicate!r}")
        templates = ("hint_template", "chunk_hint_template", "copy_hint_template", "copy_chunk_hint_template")
        for name in ("instruction", "tenant", *templates):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name}: expected a non-empty string, got {value!r}")
        for name in templates:
            _check_template(name, getattr(self, name), _FIELDS_OF.get(name, _TEMPLATE_FIELDS))
        if self.chunk_target_words < MIN_CHUNK_WORDS:  # chunks of fewer words would match by chance
            raise ValueError(f"chunk_target_words: expected an int >= {MIN_CHUNK_WORDS}, got {self.chunk_target_words!r}")

    @property
    def index_limits(self) -> IndexLimits:
        return IndexLimits(
            capacity_tokens=self.capacity_tokens,
            max_nodes=self.max_nodes,
            max_tenants=self.max_tenants,
            max_tracked_blocks=self.max_tracked_blocks,
            popularity_decay=self.popularity_decay,
            recent_requests=self.recent_requests,
            memory_budget_mb=self.memory_budget_mb,
            memory_budget_entries=self.memory_budget_entries,
        )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> "PilotConfig":
        """Build from a plain dict (engine config); unknown keys are an error naming them."""
        if values is None:
            return cls()
        if not isinstance(values, Mapping):
            raise TypeError(f"contextpilot config: expected a dict, got {type(values).__name__}")
        cls.check_names(values, "contextpilot config")
        return cls(**dict(values))

    @classmethod
    def check_names(cls, names: Any, where: str, error: type[Exception] = ValueError) -> None:
        """Raise ``error`` naming any of ``names`` that is not an option, and listing the options."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(n) for n in names if n not in known)
        if unknown:
            raise error(f"{where}: unknown option(s) {unknown}; known options: {sorted(known)}")

    def to_dict(self) -> dict:
        out = asdict(self)
        out["strategies"] = list(self.strategies)
        return out

    @classmethod
    def defaults(cls) -> dict:
        return {f.name: f.default for f in fields(cls)}


_POSITIVE_INTS = (
    "capacity_tokens",
    "max_nodes",
    "max_tenants",
    "max_tracked_blocks",
    "max_blocks_per_context",
    "chunk_min_tokens",
    "chunk_target_words",
    "max_conversations",
    "max_conversation_entries",
)

_TEMPLATE_FIELDS = {"doc_id": "d", "turn": 1, "position": 1, "words": 1, "hash": "h"}
#: the fields each in-prompt copy hint is formatted with (:mod:`.prompt_copies`): exactly these, so a
#: template the config accepts never fails a request
_FIELDS_OF = {
    "copy_hint_template": {"doc_id": "d", "where": "message 2 (user)", "hash": "h"},
    "copy_chunk_hint_template": {"where": "message 2 (user)", "words": 1},
}


def _check_template(name: str, template: str, fields_: Mapping[str, Any]) -> None:
    try:
        template.format(**fields_)
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(
            f"{name}: invalid template {template!r} ({exc.__class__.__name__}: {exc}); "
            f"it may use the fields {sorted(fields_)}"
        ) from None
