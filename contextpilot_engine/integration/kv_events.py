"""The KV-event subscription: one engine's cache changes, in order, with gaps and restarts repaired.

An engine started with ``--kv-events-config`` publishes its cache changes
on a ZMQ PUB socket, numbered by a sequence number, and (with a
``replay_endpoint``) keeps recent batches on a ROUTER socket that re-sends
them from a given number: a DEALER sends the 8-byte big-endian start
number and receives ``(topic, seq, payload)`` frames, then a frame whose
sequence number is -1.  :class:`KvEventSubscriber` is one thread that
turns that into an exact stream for an :class:`EventSink`:

* **Link up: resync.**  When the publisher's connection comes up (at start,
  or again after it dropped: a restarted engine), the sink is cleared and
  the publisher's whole buffer is replayed from number 0, so the mirror
  holds what the engine caches even if the engine served requests before
  the proxy started.  Without a replay endpoint the mirror starts empty
  (pages cached before the connection are unknown, a warning says so).
* **Gaps.**  A batch whose number is not the next one means batches were
  lost (a slow subscriber, ZMQ's high-water mark, a subscription that was
  not yet active); they are fetched from the replay socket.  If the
  replay cannot supply all of them, the sink is cleared (the mirror then
  claims nothing is cached, which can only under-promise) and the stream
  goes on from there.
* **Restarts behind a relay.**  A batch numbered like one already applied
  but stamped later than the newest applied batch comes from a publisher
  that started counting again (an engine restarted behind a forwarder,
  where no disconnect is seen): the sink is resynced from its buffer.
* **Link down: degrade.**  When the publisher's connection drops (ZMQ's
  socket monitor reports it), the sink is told, so that planning falls
  back to a modelled cache until the link is up and resynced again.  A
  publisher that never connects within ``connect_timeout_s`` is reported
  the same way, with a warning that names the endpoint.

Which side binds follows vLLM's rule for its own endpoint: an endpoint
with ``*`` (``tcp://*:5557``) is bound by the engine, so the proxy
connects to the engine's host; an engine whose endpoint names a host
(``tcp://127.0.0.1:5557``) connects to it, so the proxy binds there
(``bind=True``).  The replay socket is always bound by the engine.

**Data parallelism.**  Each data-parallel rank of an engine publishes on
its own sockets (:func:`offset_endpoint`: rank 0's port plus the rank);
one subscriber per rank (:meth:`EventSource.for_rank`) mirrors that rank's
cache.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Protocol

import msgspec

from .kv_wire import END_SEQ, EventBatch, decode_batch, decode_seq

__all__ = ["EventSink", "EventSource", "KvEventSubscriber", "SubscriberStats", "offset_endpoint"]

log = logging.getLogger("contextpilot.kv_events")


@dataclass(frozen=True)
class EventSource:
    """Where one engine publishes its KV events."""

    #: the PUB endpoint (``tcp://host:port``), connected to, or bound when ``bind``
    endpoint: str
    #: the engine's replay (ROUTER) endpoint, always connected to; None: gaps cannot be repaired
    replay_endpoint: str | None = None
    #: the engine connects to us (its ``endpoint`` names a host): bind ``endpoint`` here
    bind: bool = False
    topic: str = ""
    #: how long a replay may take (the publisher answers between two of its queue polls)
    replay_timeout_s: float = 2.0
    #: a publisher not connected this long after the start is reported as missing
    connect_timeout_s: float = 15.0

    def for_rank(self, rank: int) -> "EventSource":
        """The source of data-parallel rank ``rank`` of an engine configured with this one (vLLM's rule)."""
        if rank == 0:
            return self
        return replace(self, endpoint=offset_endpoint(self.endpoint, rank),
                       replay_endpoint=offset_endpoint(self.replay_endpoint, rank))


def offset_endpoint(endpoint: str | None, rank: int) -> str | None:
    """Where data-parallel rank ``rank`` publishes, given rank 0's endpoint.

    vLLM (and SGLang, which copied it) give each rank its own sockets: a
    ``tcp://`` port is offset by the rank (port 0 is left alone), any other
    transport gets the suffix ``_dp<rank>``.
    """
    if not endpoint or rank == 0:
        return endpoint
    if endpoint.startswith("tcp://") and ":" in endpoint[len("tcp://"):]:
        base, _, port = endpoint.rpartition(":")
        if not port.isdigit():
            raise ValueError(f"{endpoint}: expected tcp://host:port")
        return endpoint if int(port) == 0 else f"{base}:{int(port) + rank}"
    return f"{endpoint}_dp{rank}"


class EventSink(Protocol):
    """What the subscriber drives (the proxy's cache view, one per replica in the router)."""

    def apply(self, seq: int, batch: EventBatch) -> None:
        """One batch, in sequence order."""

    def clear(self, reason: str) -> None:
        """Forget every cached page: the engine's state before the next batch is unknown."""

    def link_up(self) -> None:
        """The stream is connected and the sink resynced: trust it."""

    def link_down(self, reason: str) -> None:
        """The stream dropped: stop trusting the sink until :meth:`link_up`."""


@dataclass
class SubscriberStats:
    batches: int = 0
    last_seq: int | None = None
    gaps: int = 0
    gaps_repaired: int = 0
    replays: int = 0
    resyncs: int = 0
    clears: int = 0
    malformed: int = 0
    unknown_events: int = 0
    links_up: int = 0
    links_down: int = 0
    duplicates: int = 0
    #: monotonic time the last batch was applied (0: none yet)
    last_batch_at: float = 0.0
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "errors"}
        out["recent_errors"] = list(self.errors[-5:])
        return out


class KvEventSubscriber:
    """A daemon thread subscribed to one publisher (see the module docstring)."""

    def __init__(self, source: EventSource, sink: EventSink):
        self.source = source
        self.sink = sink
        self.stats = SubscriberStats()
        self.linked = False
        self._peers = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._resync_reason: str | None = None
        self._start_error: BaseException | None = None
        #: the engine's timestamp of the newest batch applied (a restarted engine's batches are newer)
        self._last_ts = 0.0

    # ------------------------------------------------------------ lifecycle
    def start(self) -> "KvEventSubscriber":
        """Start the thread; raises if the endpoint cannot be bound or connected."""
        self._thread = threading.Thread(target=self._main, name="contextpilot-kv-events", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._start_error is not None:
            raise self._start_error
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def request_resync(self, reason: str) -> None:
        """Rebuild the sink from the replay buffer soon (from any thread), then report the link up again."""
        self._resync_reason = reason

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ----------------------------------------------------------------- loop
    def _main(self) -> None:
        import zmq
        from zmq.utils.monitor import recv_monitor_message

        ctx = zmq.Context()
        sub = ctx.socket(zmq.SUB)
        monitor = None
        try:
            sub.setsockopt(zmq.LINGER, 0)
            sub.setsockopt(zmq.RCVHWM, 0)  # never drop on our side: batches are small and ordered
            sub.setsockopt(zmq.SUBSCRIBE, self.source.topic.encode())
            monitor = sub.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
            if self.source.bind:
                sub.bind(self.source.endpoint)
            else:
                sub.connect(self.source.endpoint)
        except Exception as exc:  # a bad endpoint: the caller reports it at start-up
            self._start_error = exc
            self._ready.set()
            sub.close(0)
            ctx.term()
            return
        self._ready.set()
        poller = zmq.Poller()
        poller.register(sub, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        started = time.monotonic()
        missing_reported = False
        try:
            while not self._stop.is_set():
                ready = dict(poller.poll(50))
                reason, self._resync_reason = self._resync_reason, None
                if reason is not None and self.linked:
                    self._resync(ctx, reason)
                    self.sink.link_up()
                if monitor in ready:
                    self._on_monitor(recv_monitor_message(monitor), ctx)
                if sub in ready:
                    while True:
                        try:
                            frames = sub.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        if len(frames) >= 3:
                            self._on_frame(decode_seq(frames[1]), frames[2], ctx)
                if (not missing_reported and not self.linked and self.stats.links_up == 0
                        and time.monotonic() - started > self.source.connect_timeout_s):
                    missing_reported = True
                    self.sink.link_down(
                        f"no KV event publisher connected {'to' if self.source.bind else 'at'} "
                        f"{self.source.endpoint} within {self.source.connect_timeout_s:g} s "
                        "(check the engine's --kv-events-config)"
                    )
        except Exception as exc:  # the thread must not die silently: degrade, and say why
            self._error(f"subscriber stopped: {type(exc).__name__}: {exc}")
            self.linked = False
            self.sink.link_down(f"the KV event subscriber failed: {type(exc).__name__}: {exc}")
        finally:
            poller.unregister(sub)
            poller.unregister(monitor)
            sub.disable_monitor()
            monitor.close(0)
            sub.close(0)
            ctx.term()

    def _on_monitor(self, message: dict, ctx) -> None:
        import zmq

        event = message.get("event")
        if event in (zmq.EVENT_CONNECTED, zmq.EVENT_ACCEPTED):
            self._peers += 1
            if self._peers == 1:
                self._resync(ctx, "connected" if self.stats.links_up == 0 else "reconnected (engine restarted?)")
                self.linked = True
                self.stats.links_up += 1
                self.sink.link_up()
        elif event == zmq.EVENT_DISCONNECTED:
            self._peers = max(0, self._peers - 1)
            if self._peers == 0 and self.linked:
                self.linked = False
                self.stats.links_down += 1
                self.sink.link_down(f"the KV event publisher at {self.source.endpoint} disconnected")

    # ------------------------------------------------------------- batches
    def _on_frame(self, seq: int, payload: bytes, ctx) -> None:
        last = self.stats.last_seq
        if last is not None and seq <= last:
            if not self._restarted(payload):
                self.stats.duplicates += 1  # already applied (a replay overlapped the stream)
                return
            self._resync(ctx, "restarted (its sequence numbers started over)")
            if self.stats.last_seq is not None and seq <= self.stats.last_seq:
                return  # the replay brought this one
            last = self.stats.last_seq
        if last is not None and seq != last + 1:
            self.stats.gaps += 1
            self._repair(ctx, last + 1, seq)
            if self.stats.last_seq is not None and seq <= self.stats.last_seq:
                return  # the replay brought this one too
        self._apply(seq, payload)

    def _restarted(self, payload: bytes) -> bool:
        """A number already seen, on a batch newer than the last applied one: a new publisher counting from 0."""
        try:
            batch, _ = decode_batch(payload)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return False
        return batch.ts > self._last_ts

    def _apply(self, seq: int, payload: bytes) -> None:
        try:
            batch, unknown = decode_batch(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.stats.malformed += 1
            self._error(f"batch {seq} is not a KV event batch ({exc}); the mirror restarts empty")
            self._clear(f"undecodable batch {seq}")
            self.stats.last_seq = seq
            return
        self.stats.unknown_events += unknown
        self.sink.apply(seq, batch)
        self._last_ts = max(self._last_ts, batch.ts)
        self.stats.batches += 1
        self.stats.last_seq = seq
        self.stats.last_batch_at = time.monotonic()

    def _clear(self, reason: str) -> None:
        self.stats.clears += 1
        self.sink.clear(reason)

    # --------------------------------------------------------------- replay
    def _replay(self, ctx, start: int) -> list[tuple[int, bytes]] | None:
        """Buffered batches from ``start`` on, in order; None when the replay socket did not answer."""
        import zmq

        endpoint = self.source.replay_endpoint
        if endpoint is None:
            return None
        self.stats.replays += 1
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        frames: list[tuple[int, bytes]] = []
        try:
            dealer.connect(endpoint)
            dealer.send_multipart([b"", max(0, start).to_bytes(8, "big")])
            deadline = time.monotonic() + self.source.replay_timeout_s
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not dealer.poll(int(left * 1000) + 1):
                    self._error(f"the replay socket {endpoint} did not answer within "
                                f"{self.source.replay_timeout_s:g} s")
                    return None
                parts = dealer.recv_multipart()
                if len(parts) < 4:
                    continue
                seq = decode_seq(parts[2])
                if seq == END_SEQ:
                    break
                frames.append((seq, parts[3]))
        finally:
            dealer.close(0)
        frames.sort(key=lambda f: f[0])
        return frames

    def _resync(self, ctx, why: str) -> None:
        """Clear the sink and rebuild it from the publisher's whole buffer (or from nothing)."""
        self.stats.resyncs += 1
        self._clear(f"KV event stream {why}")
        self.stats.last_seq = None
        frames = self._replay(ctx, 0)
        if frames is None:
            log.warning(
                "contextpilot KV events: KV event stream %s without a working replay endpoint; pages the engine "
                "cached before now are unknown to the mirror (it under-promises until they are evicted)", why)
            return
        if frames and frames[0][0] != 0:
            log.warning(
                "contextpilot KV events: the engine's replay buffer starts at batch %d; pages cached by earlier "
                "batches are unknown to the mirror", frames[0][0])
        for seq, payload in frames:
            if self.stats.last_seq is None or seq > self.stats.last_seq:
                self._apply(seq, payload)
        if self.stats.last_seq is None:
            self.stats.last_seq = -1  # nothing published yet: the next batch is number 0

    def _repair(self, ctx, start: int, seen: int) -> None:
        """Fetch batches ``start .. seen - 1`` from the replay socket, or clear the sink if they are gone."""
        frames = self._replay(ctx, start) or []
        if frames and frames[0][0] == start:
            for seq, payload in frames:
                if seq == self.stats.last_seq + 1:  # type: ignore[operator]
                    self._apply(seq, payload)
            if self.stats.last_seq is not None and self.stats.last_seq >= seen - 1:
                self.stats.gaps_repaired += 1
                return
        self._error(f"batches {start}..{seen - 1} were lost and could not be replayed; the mirror restarts "
                    "empty")
        log.warning("contextpilot KV events: KV event batches %d..%d were lost and could not be replayed; the "
                    "mirror restarts empty (it under-promises until those pages are evicted)", start, seen - 1)
        self._clear(f"lost batches {start}..{seen - 1}")
        # what the replay still had after the hole helps: pages stored at a prompt's start chain again
        floor = start - 1 if self.stats.last_seq is None else self.stats.last_seq
        for seq, payload in frames:
            if floor < seq < seen:
                self._apply(seq, payload)
                floor = seq
        self.stats.last_seq = seen - 1

    def _error(self, text: str) -> None:
        self.stats.errors.append(text)
        del self.stats.errors[:-20]
