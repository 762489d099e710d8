"""contextpilot-engine: context reuse for LLM inference engines.

Reorders the context blocks of each request so cached or widely shared blocks
form the prefix, replaces blocks a conversation already sent with short
hints, and schedules batches so shared prefixes run back to back.  Library
use mirrors the reference ContextPilot API::

    import contextpilot_engine as cp
    pilot = cp.ContextPilot(use_gpu=False)
    messages = pilot.optimize(contexts, query)
    messages_batch, order = pilot.optimize_batch(all_contexts, queries)
    reordered, order = pilot.reorder(contexts)
    result = pilot.deduplicate(contexts, conversation_id="chat-42")

The core imports no engine; the vLLM and SGLang plugins build on it.
"""

from __future__ import annotations

import threading
from typing import Any, Sequence

from .blocks import Block, TokenCounter, block_key, estimate_tokens
from .config import PilotConfig
from .index import ContextIndex, IndexLimits
from .kernels import GpuUnavailableError
from .pages import chain_page_keys
from .pilot import ContextPilot
from .prompts import Preamble
from .request_pipeline import ServedPrompt
from .validation import UnknownIdError

__version__ = "0.1.0"

__all__ = [
    "Block",
    "ContextIndex",
    "ContextPilot",
    "GpuUnavailableError",
    "IndexLimits",
    "PilotConfig",
    "Preamble",
    "ServedPrompt",
    "TokenCounter",
    "UnknownIdError",
    "block_key",
    "chain_page_keys",
    "estimate_tokens",
    "optimize",
    "optimize_batch",
    "__version__",
]

_default: ContextPilot | None = None
_default_lock = threading.Lock()


def _shared_pilot() -> ContextPilot:
    global _default
    with _default_lock:
        if _default is None:
            _default = ContextPilot(use_gpu=False)
        return _default


def optimize(docs: Sequence[Any], query: str, **kwargs: Any) -> list[dict]:
    """``ContextPilot.optimize`` on a process-wide shared instance (stateful across calls)."""
    return _shared_pilot().optimize(docs, query, **kwargs)


def optimize_batch(all_docs: Sequence[Sequence[Any]], all_queries: Sequence[str], **kwargs: Any):
    """``ContextPilot.optimize_batch`` on a fresh instance (a batch stands alone)."""
    return ContextPilot(use_gpu=False).optimize_batch(all_docs, all_queries, **kwargs)
