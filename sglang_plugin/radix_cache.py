"""SGLang scheduler side: keep a Context Index equal to ``UnifiedRadixCache``'s device pages, call by call.

SGLang records every change of its radix tree as KV events (``BlockStored``,
``BlockRemoved``, ``AllBlocksCleared``) at the moment it happens, with both
tree cores (Rust and Python), but publishes them late (after prefill
batches, every few decode steps) and only when ``--kv-events-config`` asks.
The plugin therefore:

* forces recording on in a BEFORE hook on ``UnifiedRadixCache.__init__``
  (on the rank that owns the mirror: attention TP rank 0, pipeline stage 0);
* drains the recorder in AFTER hooks on every method that changes the set of
  cached pages (``insert`` (which ``checkpoint`` reaches), ``evict``,
  ``evict_for_alloc``, ``reset``, and HiCache's transfers) and applies the
  events to a :class:`~contextpilot_engine.integration.mirror.PageMirror`
  before the method returns, so the index never lags the tree;
* wraps ``take_events`` (AROUND) so that a user's own KV-event publisher
  still receives every event, in order, when it asks for them.

Events name pages by SGLang's own chained hashes and carry the pages' token
ids, so the mirror re-keys them to canonical page keys chained from the
parent page (:meth:`.EngineKeyMap.store_chain`).  Identical token runs in
two ``extra_key`` namespaces produce identical hashes, hence copy counts.
Pages offloaded to host memory (HiCache) are kept apart: the index counts
device pages, which is what a request reuses without a load.

One mirror per scheduler process: with data parallelism each DP rank has its
own index, published on its own channel; the request side reads rank 0's.
"""

from __future__ import annotations

from typing import Any

from contextpilot_engine.index import ContextIndex
from contextpilot_engine.integration.channel import ChannelServer
from contextpilot_engine.integration.engine_keys import EngineKeyMap, page_salt
from contextpilot_engine.integration.failopen import call_safely, logger, report_failure
from contextpilot_engine.integration.mirror import PageMirror
from contextpilot_engine.integration.state import find_state, get_state, socket_path

from .config import engine_key, options_from_server_args, runtime_ranks, runtime_server_args

__all__ = ["CacheMirror", "mirror_of", "before_init", "after_init", "after_change", "around_take_events"]

#: attribute of a UnifiedRadixCache holding its CacheMirror
ATTR = "_contextpilot_mirror"
#: attribute of CacheInitParams remembering whether the user asked for KV events (set by before_init)
_USER_EVENTS = "_contextpilot_user_events"
_HOST_MEDIA = {"CPU_PINNED", "DISK", "EXTERNAL"}


def _medium(event: Any) -> str:
    medium = getattr(event, "medium", None)
    return str(getattr(medium, "name", None) or getattr(medium, "value", None) or medium or "GPU").upper()


class CacheMirror:
    """One radix cache's pages, mirrored: device pages into the index, host pages counted apart."""

    def __init__(self, index: ContextIndex, page_size: int, keep_events: bool):
        self.mirror = PageMirror(index, page_size)
        #: pages held in host memory (HiCache), by hash: reusable after a load, not counted as cached
        self.host = EngineKeyMap()
        #: the user's publisher asked for KV events: the ones we drained wait here for it
        self.keep_events = keep_events
        self.pending: list = []
        #: page events applied (device and host), for the cost per event
        self.page_events = 0

    def apply(self, events: list) -> None:
        mirror = self.mirror
        mirror.begin()
        try:
            for e in events:
                kind = type(e).__name__
                self.page_events += len(getattr(e, "block_hashes", ())) or 1
                if kind == "BlockStored":
                    salt = page_salt(getattr(e, "cache_salt", None), getattr(e, "lora_name", None))
                    hashes, tokens = list(e.block_hashes), list(e.token_ids)
                    if _medium(e) in _HOST_MEDIA:
                        self.host.store_chain(hashes, e.parent_block_hash, tokens, mirror.page_size, salt)
                    else:  # a page loaded back from the host may chain from a parent that stayed there
                        parent = e.parent_block_hash
                        fallback = self.host.canonical(parent) if parent is not None else None
                        mirror.stored_chain(hashes, parent, tokens, salt, parent_canonical=fallback)
                elif kind == "BlockRemoved":
                    if _medium(e) in _HOST_MEDIA:
                        self.host.remove(list(e.block_hashes))
                    else:
                        mirror.removed(list(e.block_hashes))
                elif kind == "AllBlocksCleared":
                    mirror.cleared()
                    self.host.clear()
        finally:
            mirror.end()

    def drain(self, cache: Any) -> None:
        """Take the recorder's events; mirror them while the mirror works, and keep them for the user's publisher.

        Recording is on because we turned it on: once the mirror is off the
        events are still taken (and dropped, unless the user asked for
        them), or the recorder would grow with every insert for the rest of
        the engine's life.
        """
        take = type(cache).take_events
        events = list(getattr(take, "__wrapped__", take)(cache) or ())
        if events:
            if self.keep_events:  # first: the user's publisher gets them even if mirroring fails
                self.pending.extend(events)
            if self.mirror.enabled:
                self.apply(events)


_said: set[str] = set()


def _say_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        logger.warning(message)


def mirror_of(cache: Any) -> CacheMirror | None:
    m = cache.__dict__.get(ATTR)
    return m if m is not None and m.mirror.enabled else None


def _owns_the_mirror(params: Any) -> bool:
    """The rank SGLang itself records events on: pipeline stage 0, attention TP/CP rank 0."""
    _, attn_tp, pp, cp = runtime_ranks()
    return not params.disable and pp == 0 and attn_tp == 0 and cp == 0 and int(getattr(params, "pp_rank", 0)) == 0


def before_init(self: Any, params: Any, *args: Any, **kwargs: Any) -> None:
    try:
        if options_from_server_args(runtime_server_args()) is None or not _owns_the_mirror(params):
            return
        if getattr(params, "is_eagle", False):  # its tree keys pages by token pairs, which the mirror cannot name
            _say_once("contextpilot: SGLang's EAGLE radix tree keys its pages by token pairs; the KV-cache mirror "
                      "is off for this engine (requests are still rewritten, planned as if nothing were cached)")
            return
        setattr(params, _USER_EVENTS, bool(params.enable_kv_cache_events))
        params.enable_kv_cache_events = True
    except Exception as exc:  # fail open: SGLang builds its cache as it would without us
        report_failure("attach_error", exc)


def after_init(result: Any, self: Any, params: Any, *args: Any, **kwargs: Any) -> None:
    user_events = getattr(params, _USER_EVENTS, None)
    if user_events is None:
        return
    call_safely("attach_error", _attach, self, params, user_events)


def _attach(cache: Any, params: Any, user_events: bool) -> None:
    server_args = runtime_server_args()
    options = options_from_server_args(server_args)
    if options is None:
        return
    key = engine_key(server_args)
    dp_rank = runtime_ranks()[0]
    page = int(params.page_size)
    state = find_state(key)
    local = state is not None  # the request side lives in this process (tests, benchmarks)
    if state is None:
        state = get_state(key, options, page)
    state.engine_local = local
    if state.index.page_size != page:
        state.index.attach_engine(page)
    m = CacheMirror(state.index, page, keep_events=user_events)
    state.mirror = m.mirror
    cache.__dict__[ATTR] = m
    m.drain(cache)  # the AllBlocksCleared that __init__'s reset() recorded
    if not local and options.channel == "auto":
        server = ChannelServer(socket_path(key, dp_rank), m.mirror)
        server.start()
        state.server = server
        m.mirror.publisher = server
    logger.info("contextpilot: mirroring SGLang's radix cache of engine %s, DP rank %d (page %d tokens)",
                key, dp_rank, page)


def after_change(result: Any, self: Any, *args: Any, **kwargs: Any) -> None:
    m = self.__dict__.get(ATTR)  # switched off or not: the recorder we turned on is drained either way
    if m is None:
        return
    try:
        m.drain(self)
    except Exception as exc:  # fail open: the tree already did its work
        if m.mirror.enabled:
            report_failure("mirror_error", exc, "the mirror is switched off for this engine")
            m.mirror.disable(exc)


def around_take_events(original: Any, self: Any, *args: Any, **kwargs: Any) -> list:
    m = self.__dict__.get(ATTR)
    if m is None:
        return original(self, *args, **kwargs)
    events = list(original(self, *args, **kwargs) or ())
    if events and m.mirror.enabled:
        try:
            m.apply(events)
        except Exception as exc:
            report_failure("mirror_error", exc, "the mirror is switched off for this engine")
            m.mirror.disable(exc)
    if not m.keep_events:
        return []  # recording was on only for the mirror: nobody else asked for these
    out, m.pending = m.pending + events, []
    return out
