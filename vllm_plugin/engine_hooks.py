"""Engine-core wiring: where the mirror, the channel and the scheduling option are attached.

The one hook here wraps ``vllm.v1.core.sched.scheduler.Scheduler.__init__``.
It is the first place in the engine-core process that holds both the engine's
``VllmConfig`` (is the plugin on? which engine is this?) and the block pool
the scheduler just built, and it runs before any request can reach that pool.
After vLLM's own ``__init__`` returns, for an engine with the plugin on:

1. the ``BlockPool`` class hooks are installed (once; see :mod:`.block_pool`);
2. a :class:`~contextpilot_engine.integration.mirror.PageMirror` is attached
   to *this* scheduler's pool; its index is the request side's own index when
   the request side lives in this process (offline ``LLM`` with
   ``VLLM_ENABLE_V1_MULTIPROCESSING=0``), otherwise a fresh one published
   over the integration layer's channel;
3. with ``cache_aware_scheduling``, the waiting queue is replaced
   (:mod:`.scheduling`).

A second hook wraps ``Scheduler.shutdown`` (which the engine core calls on
exit, SIGTERM included) to stop the channel and remove its socket file.
Subclasses of ``Scheduler`` (``AsyncScheduler``, a user's ``--scheduler-cls``
subclass) call this ``__init__`` too.  Everything runs fail-open: a failure
leaves the scheduler exactly as vLLM built it.
"""

from __future__ import annotations

from typing import Any

from contextpilot_engine.integration.channel import shown
from contextpilot_engine.integration.failopen import call_safely, logger, once
from contextpilot_engine.integration.mirror import PageMirror
from contextpilot_engine.integration.state import find_state, socket_path

from .config import engine_key, options_from_vllm_config, state_for_config
from .hook_points import patch

__all__ = ["install_engine_hooks", "attach_to_scheduler", "detach_from_scheduler"]

#: attribute of a Scheduler holding the plugin state it was attached to
_STATE_ATTR = "_contextpilot_state"


@once
def install_engine_hooks() -> bool:
    """Patch ``Scheduler.__init__`` (and prepare the BlockPool hooks) once per process."""
    from vllm.v1.core.sched.scheduler import Scheduler

    from .block_pool import install_block_pool_hooks

    pool_ok = install_block_pool_hooks()

    def make(orig):
        def __init__(self, vllm_config, *args, **kwargs):
            orig(self, vllm_config, *args, **kwargs)
            call_safely("attach_error", attach_to_scheduler, self, vllm_config)

        return __init__

    sched_ok = patch(Scheduler, "__init__", make)

    def make_shutdown(orig):
        def shutdown(self, *args, **kwargs):
            try:
                return orig(self, *args, **kwargs)
            finally:
                call_safely("attach_error", detach_from_scheduler, self)

        return shutdown

    patch(Scheduler, "shutdown", make_shutdown)
    return pool_ok and sched_ok


def detach_from_scheduler(scheduler: Any) -> None:
    """The engine core shuts down (also on SIGTERM): stop publishing and remove the channel's socket file."""
    state = scheduler.__dict__.pop(_STATE_ATTR, None)
    if state is not None and state.server is not None:
        state.server.close()
        state.server = None


def attach_to_scheduler(scheduler: Any, vllm_config: Any) -> None:
    options = options_from_vllm_config(vllm_config)
    if options is None:
        return
    from .block_pool import ATTR, install_block_pool_hooks

    if not getattr(scheduler.cache_config, "enable_prefix_caching", False):
        logger.warning("contextpilot: prefix caching is off for this engine; there is no cache to mirror or reuse")
        return
    pool = scheduler.kv_cache_manager.block_pool
    page = int(pool.hash_block_size)
    groups = scheduler.kv_cache_config.kv_cache_groups
    sizes = {int(g.kv_cache_spec.block_size) for g in groups}
    if len(groups) != 1 or sizes != {page}:
        logger.warning(
            "contextpilot: this model has %d KV cache groups with block sizes %s (hash block size %d); "
            "the cache mirror supports one attention group only and stays off",
            len(groups),
            sorted(sizes),
            page,
        )
    elif install_block_pool_hooks():
        key, rank = engine_key(vllm_config)
        state = find_state(key)
        local = state is not None
        if state is None:
            state = state_for_config(vllm_config, options, page)
        state.engine_local = local
        if state.index.page_size != page:
            state.index.attach_engine(page)
        mirror = PageMirror(state.index, page)
        state.mirror = mirror
        pool.__dict__[ATTR] = mirror
        scheduler.__dict__[_STATE_ATTR] = state
        if not local and options.channel == "auto":
            if rank == 0:
                from contextpilot_engine.integration.channel import ChannelServer

                server = ChannelServer(socket_path(key, rank), mirror)
                server.start()
                state.server = server
                mirror.publisher = server
            else:
                logger.info("contextpilot: data-parallel rank %d keeps its mirror local (only rank 0 publishes)", rank)
        logger.info(
            "contextpilot: mirroring the prefix cache of engine %s (page %d tokens, %s)",
            key,
            page,
            "shared in-process index" if local else (
                "published on " + shown(state.server.path) if state.server is not None else "not published"
            ),
        )
    if options.cache_aware_scheduling:
        from .scheduling import install_cache_aware_queue

        if install_cache_aware_queue(scheduler, options):
            logger.info(
                "contextpilot: cache-aware waiting queue on (window %d, at most %d overtakes)",
                options.scheduling_window,
                options.max_overtakes,
            )
