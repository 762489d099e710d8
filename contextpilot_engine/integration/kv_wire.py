"""The engines' KV-event wire format, decoded without importing an engine, and applied to a page mirror.

Stock vLLM and SGLang publish every change of their prefix cache on a ZMQ
PUB socket (``--kv-events-config``), as multipart messages
``(topic, 8-byte big-endian sequence number, msgpack payload)``.  The
payload is an array ``[ts, events, dp_rank]``; each event is a map tagged
by its ``type``:

* ``BlockStored``: consecutive full pages (``block_hashes``) cached under a
  parent page (``parent_block_hash``, none at the start of a prompt), with
  their ``token_ids`` and ``block_size``, plus what salted the hashes
  (vLLM: ``lora_name`` and untagged per-page ``extra_keys``, where the first
  page carries the cache salt; SGLang: ``cache_salt``);
* ``BlockRemoved``: pages that left the cache, by hash only;
* ``AllBlocksCleared``: the whole cache was dropped.

The structs below declare only the fields the mirror reads; msgspec skips
the others, so a release that adds fields still decodes.  An event type
this module does not know is skipped on its own, without losing the rest
of its batch.

:func:`apply_batch` feeds a decoded batch to
:class:`~contextpilot_engine.integration.mirror.PageMirror`, which chains
canonical page keys from the stored pages' tokens (the request side
computes the same keys from the prompts it serves, so no engine hash
function is ever needed).  Only pages an engine can hit without a load
back count: device pages of the first KV-cache group, of the engine's page
size, without multimodal or prompt-embedding keys (whose tokens do not say
what the page holds).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

import msgspec

from .engine_keys import page_salt
from .mirror import PageMirror

__all__ = [
    "AllBlocksCleared",
    "BatchEffect",
    "BlockRemoved",
    "BlockStored",
    "DEVICE_MEDIA",
    "EventBatch",
    "apply_batch",
    "decode_batch",
    "decode_seq",
    "END_SEQ",
]

#: the sequence number a replay answer ends with
END_SEQ = -1
#: media whose pages an engine reuses directly (vLLM says "GPU" on every backend, SGLang "GPU" too)
DEVICE_MEDIA = (None, "GPU", "gpu", "device")

EngineHash = Union[int, bytes]


class BlockStored(msgspec.Struct, tag=True):
    block_hashes: list[EngineHash]
    parent_block_hash: Union[EngineHash, None] = None
    token_ids: list[int] = []
    block_size: int = 0
    medium: Union[str, None] = None
    lora_name: Union[str, None] = None
    #: vLLM: one entry per page, untagged (LoRA name, (mm id, offset) pairs, cache salt, embeds digests)
    extra_keys: Union[list[Any], None] = None
    group_idx: Union[int, None] = None
    #: SGLang: the request's cache salt
    cache_salt: Union[str, None] = None


class BlockRemoved(msgspec.Struct, tag=True):
    block_hashes: list[EngineHash]
    medium: Union[str, None] = None
    group_idx: Union[int, None] = None


class AllBlocksCleared(msgspec.Struct, tag=True):
    pass


Event = Union[BlockStored, BlockRemoved, AllBlocksCleared]


class EventBatch(msgspec.Struct, array_like=True):
    ts: float
    events: list[Event]
    data_parallel_rank: Union[int, None] = None


class _RawBatch(msgspec.Struct, array_like=True):
    ts: float
    events: list[msgspec.Raw]
    data_parallel_rank: Union[int, None] = None


_batch_decoder = msgspec.msgpack.Decoder(EventBatch)
_raw_decoder = msgspec.msgpack.Decoder(_RawBatch)
_event_decoder = msgspec.msgpack.Decoder(Event)


def decode_seq(frame: bytes) -> int:
    """The sequence number of a frame (signed: replay answers end with -1)."""
    return int.from_bytes(frame, "big", signed=True)


def decode_batch(payload: bytes) -> tuple[EventBatch, int]:
    """A batch, and how many of its events had a type this module does not know (they are left out).

    Raises ``msgspec.DecodeError`` when the payload is not an event batch at all.
    """
    try:
        return _batch_decoder.decode(payload), 0
    except msgspec.ValidationError:
        raw = _raw_decoder.decode(payload)
    events: list[Event] = []
    unknown = 0
    for item in raw.events:
        try:
            events.append(_event_decoder.decode(item))
        except msgspec.ValidationError:
            unknown += 1
    return EventBatch(raw.ts, events, raw.data_parallel_rank), unknown


@dataclass
class BatchEffect:
    """What one batch did to the mirror (for counters and warnings)."""

    stored: int = 0
    removed: int = 0
    cleared: int = 0
    #: pages left out: another medium or group, or keys the tokens cannot name
    skipped: int = 0
    #: stored pages of another size than the mirror's (a misconfigured page size)
    wrong_size: int = 0


def _first_page_salt(event: BlockStored) -> Any:
    """The namespace of a prompt's first page, as :func:`.engine_keys.page_salt` spells it on the request side."""
    salt = event.cache_salt
    extra = event.extra_keys[0] if event.extra_keys else None
    if salt is None and extra:
        values = list(extra)
        if event.lora_name is not None and values and values[0] == event.lora_name:
            values = values[1:]
        strings = [v for v in values if isinstance(v, str)]
        salt = strings[-1] if strings else None
    return page_salt(salt, event.lora_name)


def _names_tokens_only(event: BlockStored) -> bool:
    """Whether the pages' keys depend on nothing but tokens, LoRA and cache salt (no images, no embeddings)."""
    if not event.extra_keys:
        return True
    for i, extra in enumerate(event.extra_keys):
        if not extra:
            continue
        values = list(extra)
        if event.lora_name is not None and values and values[0] == event.lora_name:
            values = values[1:]
        allowed = 1 if (i == 0 and event.parent_block_hash is None) else 0  # the first page's cache salt
        if len(values) > allowed or any(not isinstance(v, str) for v in values):
            return False
    return True


def apply_batch(mirror: PageMirror, batch: EventBatch) -> BatchEffect:
    """Apply one batch's events, in order, to ``mirror``."""
    effect = BatchEffect()
    page = mirror.page_size
    for event in batch.events:
        if isinstance(event, BlockStored):
            if event.medium not in DEVICE_MEDIA or event.group_idx not in (None, 0):
                effect.skipped += len(event.block_hashes)
            elif event.block_size != page:
                effect.wrong_size += len(event.block_hashes)
            elif not _names_tokens_only(event) or len(event.token_ids) < len(event.block_hashes) * page:
                effect.skipped += len(event.block_hashes)
            else:
                salt = _first_page_salt(event) if event.parent_block_hash is None else None
                before = mirror.unattributed
                mirror.stored_chain(event.block_hashes, event.parent_block_hash, event.token_ids, salt)
                missed = mirror.unattributed - before
                effect.stored += len(event.block_hashes) - missed
                effect.skipped += missed
        elif isinstance(event, BlockRemoved):
            if event.medium not in DEVICE_MEDIA or event.group_idx not in (None, 0):
                effect.skipped += len(event.block_hashes)
            else:
                mirror.removed(event.block_hashes)
                effect.removed += len(event.block_hashes)
        else:
            mirror.cleared()
            effect.cleared += 1
    return effect
