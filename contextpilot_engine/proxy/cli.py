"""``contextpilot serve``: the proxy in front of an OpenAI-compatible engine.

The proxy *is* contextpilot, so its switch is implied: ``--enable-contextpilot``
is accepted and changes nothing, and every ``--contextpilot-<option>`` flag
(the same flags as the engine plugins, :func:`~contextpilot_engine.integration.options.add_flags`)
applies without it.  Engine-side options (``cache_aware_scheduling``,
``max_overtakes``, ``scheduling_window``, ``channel``) have no effect here.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from contextpilot_engine.arg_types import int_at_least, non_negative_float, port, positive_float
from contextpilot_engine.integration.options import OptionError, add_flags, options_from_namespace

__all__ = ["add_arguments", "run", "config_from_args"]

_EPILOG = """\
KV events (exact mirror of the engine's cache), vLLM:
  --kv-events-config '{"enable_kv_cache_events": true, "publisher": "zmq",
      "endpoint": "tcp://*:5557", "replay_endpoint": "tcp://*:5558"}'
  contextpilot serve --backend http://127.0.0.1:8000 --kv-events tcp://127.0.0.1:5557 \\
      --kv-events-replay tcp://127.0.0.1:5558
An engine endpoint that names a host instead of * (tcp://127.0.0.1:5557) makes the engine connect:
then pass --kv-events-bind and the proxy binds that address. Without --kv-events the proxy models
the cache (capacity and LRU): approximate.

contextpilot is always on in the proxy: --enable-contextpilot is implied, and every
--contextpilot-<option> flag applies as given.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _EPILOG
    parser.add_argument("--backend", required=True, metavar="URL",
                        help="the OpenAI-compatible engine, e.g. http://127.0.0.1:8000")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=port, default=8765, help="port to listen on (default 8765)")
    parser.add_argument("--kv-events", metavar="ENDPOINT",
                        help="the engine's KV-event publisher, e.g. tcp://127.0.0.1:5557 (off: a modelled cache)")
    parser.add_argument("--kv-events-replay", metavar="ENDPOINT",
                        help="the engine's KV-event replay endpoint (repairs gaps and resyncs after restarts)")
    parser.add_argument("--kv-events-bind", action="store_true",
                        help="bind --kv-events here: the engine's endpoint names a host, so the engine connects")
    parser.add_argument("--kv-events-topic", default="", help="KV-event topic (default: all)")
    parser.add_argument("--data-parallel-size", type=int_at_least(1), default=1, metavar="N",
                        help="the engine's data-parallel size (vLLM --data-parallel-size, SGLang --dp-size): "
                             "subscribe to each rank's KV events (the --kv-events and --kv-events-replay ports plus "
                             "the rank) and pin each request to the rank it was planned for (vLLM's "
                             "X-data-parallel-rank header, SGLang's routed_dp_rank field) (default 1)")
    parser.add_argument("--block-size", type=int_at_least(1), metavar="N",
                        help="the engine's block size (page size); default: read from the engine, checked if given")
    parser.add_argument("--model-path", metavar="DIR",
                        help="the model's tokenizer (default: the path the backend reports, if it exists here)")
    parser.add_argument("--tokenizer", choices=("auto", "local", "backend", "none"), default="auto",
                        help="how served prompts are tokenized: the local tokenizer, the backend's /tokenize, or "
                             "not at all (prompts unbound) (default: auto)")
    parser.add_argument("--backend-timeout", type=positive_float, default=600.0, metavar="S",
                        help="seconds the backend may stay silent before a 504 (default 600)")
    parser.add_argument("--backend-connect-timeout", type=positive_float, default=5.0, metavar="S",
                        help="seconds to connect to the backend before a 504 (default 5)")
    parser.add_argument("--settle-ms", type=non_negative_float, default=10.0,
                        help="quiet time of the KV-event stream awaited after a response before planning the next "
                             "request, when nothing else is in flight (default 10)")
    parser.add_argument("--settle-max-ms", type=non_negative_float, default=100.0,
                        help="longest wait for the stream to go quiet (default 100)")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    add_flags(parser, "proxy")


def config_from_args(args: argparse.Namespace):
    from .app import ProxyConfig
    from .backend import BackendTimeouts
    from .cache_view import SettlePolicy
    from contextpilot_engine.integration.kv_events import EventSource

    args.enable_contextpilot = True  # implied: the proxy is contextpilot
    _, options = options_from_namespace(args)
    events = None
    if args.kv_events:
        bind = args.kv_events_bind or "*" in args.kv_events
        events = EventSource(args.kv_events, args.kv_events_replay, bind=bind, topic=args.kv_events_topic)
    elif args.kv_events_replay or args.kv_events_bind:
        raise OptionError("--kv-events-replay and --kv-events-bind need --kv-events")
    return ProxyConfig(
        backend=args.backend,
        events=events,
        block_size=args.block_size,
        model_path=args.model_path,
        tokenizer=args.tokenizer,
        options=options,
        timeouts=BackendTimeouts(connect_s=args.backend_connect_timeout, read_s=args.backend_timeout),
        settle=SettlePolicy(quiet_s=args.settle_ms / 1e3, max_wait_s=args.settle_max_ms / 1e3),
        data_parallel_size=args.data_parallel_size,
    )


async def serve(config, host: str, port: int, log_level: str = "info") -> None:
    """Start the proxy and serve until interrupted."""
    import uvicorn

    from . import collector
    from .app import Proxy

    proxy = await Proxy.open(config)
    collector.tune()  # after start-up: the start-up heap is frozen, out of every later collection's walk
    # keep idle client connections longer than uvicorn's 5 s: a busy client that reuses a pooled connection
    # just as the server closes it sees a dropped connection instead of an answer
    server = uvicorn.Server(uvicorn.Config(proxy.app, host=host, port=port, log_level=log_level, lifespan="off",
                                           access_log=False, backlog=4096, timeout_keep_alive=75))
    try:
        await server.serve()
    finally:
        await proxy.close()


def run(args: argparse.Namespace) -> int:
    from .app import ProxyStartError

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if args.log_level != "debug":
        logging.getLogger("httpx").setLevel(logging.WARNING)  # not one line per backend request
    try:
        config = config_from_args(args)
        asyncio.run(serve(config, args.host, args.port, args.log_level))
    except (ProxyStartError, OptionError) as exc:
        print(f"contextpilot serve: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0
