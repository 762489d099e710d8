"""The cross-process channel: page events from the engine's cache to the request side.

When the engine's cache lives in another process than the request path
(vLLM's engine core, SGLang's scheduler), the request path cannot read the
engine side's index.  The engine side therefore listens on a Unix socket
whose path is derived from the engine's identity (:func:`.state.socket_path`);
the request side connects to it and applies what arrives to its own
:class:`~contextpilot_engine.index.ContextIndex`.  The engines' ZMQ KV-event
publishers are not used: they publish late and their events carry the
engines' own hashes, while this channel carries canonical page keys as soon
as the cache changes.

Design points:

* **Events leave with the cache call that made them, without blocking the
  engine.**  The mirror (:mod:`.mirror`) hands each event to
  :meth:`ChannelServer.sink` and calls :meth:`ChannelServer.flush` when the
  outermost wrapped cache call returns.  ``flush`` encodes one frame and
  writes it with a non-blocking send from the engine thread itself: handing
  it to a helper thread instead would add up to one interpreter switch
  interval (5 ms) whenever the engine thread is busy.  Bytes a slow
  subscriber does not take are queued in order and written by a helper
  thread; a subscriber stalled for long is dropped and reconnects.
* **Late subscribers get a snapshot.**  A connecting subscriber first
  receives every canonical key the mirror holds (with its copy count), then
  the events that follow.  The snapshot is taken under the mirror's lock
  after the pending events went to the older subscribers, so no event is
  missed or applied twice.  A request side that (re)connects at any time
  therefore converges exactly.
* **No file, no stranger.**  The socket lives in Linux's abstract namespace
  (:func:`.state.socket_path`), so no file is ever left behind, however the
  engine's processes end (vLLM kills its engine core on shutdown).  Both ends
  check with ``SO_PEERCRED`` that the other runs as the same user, and frames
  are fixed binary records (``struct``, no pickle): a stranger can neither
  connect nor make either side run code.
* **Lag is measured.**  Each frame carries the monotonic time of its oldest
  event; the subscriber records ``now - that`` when it has applied the frame
  (``CLOCK_MONOTONIC`` is shared by all processes of a Linux host).

Wire format (little endian): every frame is ``u32 length, u8 type, payload``.
``HELLO``: ``u32 page_size, u32 n, n x (16-byte key, u32 copies)``.
``EVENTS``: ``i64 oldest_event_ns, u32 n, n x (u8 op, 16-byte key)``.
"""

from __future__ import annotations

import atexit
import os
import select
import socket
import struct
import threading
import time
from typing import TYPE_CHECKING, Protocol

from . import metrics
from .failopen import logger, report_failure

if TYPE_CHECKING:
    from contextpilot_engine.index import ContextIndex

    from .state import LagStats

__all__ = ["ChannelServer", "ChannelSubscriber", "MirrorSource", "encode_events", "encode_hello",
           "STORED", "REMOVED", "CLEARED"]

#: page event opcodes (the mirror emits them, the wire carries them)
STORED, REMOVED, CLEARED = 1, 2, 3
#: frame types
HELLO, EVENTS = 1, 2
_HEADER = struct.Struct("<IB")
_HELLO_HEAD = struct.Struct("<II")
_EVENTS_HEAD = struct.Struct("<qI")
_KEY_BYTES = 16
_MAX_FRAME = 1 << 28


def _key_bytes(key: int) -> bytes:
    return key.to_bytes(_KEY_BYTES, "little", signed=False)


def encode_hello(page_size: int, counts: dict[int, int]) -> bytes:
    parts = [_HELLO_HEAD.pack(page_size, len(counts))]
    for key, copies in counts.items():
        parts.append(_key_bytes(key) + struct.pack("<I", copies))
    payload = b"".join(parts)
    return _HEADER.pack(len(payload), HELLO) + payload


def encode_events(oldest_ns: int, events: list[tuple[int, int]]) -> bytes:
    payload = _EVENTS_HEAD.pack(oldest_ns, len(events)) + b"".join(
        bytes((op,)) + _key_bytes(key) for op, key in events
    )
    return _HEADER.pack(len(payload), EVENTS) + payload


def is_abstract(path: str) -> bool:
    """Linux abstract-namespace socket names start with a NUL byte and have no file."""
    return path.startswith("\0")


def shown(path: str) -> str:
    """A socket name for logs (abstract names shown with a leading ``@``, as ``ss`` does)."""
    return "@" + path[1:] if is_abstract(path) else path


def same_user(sock: socket.socket) -> bool:
    """Whether the process at the other end of a Unix socket runs as this process's user (SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", creds)
    return uid == os.getuid()


class MirrorSource(Protocol):
    """What the server needs of the mirror it publishes: its lock, page size and a snapshot."""

    lock: threading.Lock
    page_size: int

    def canonical_counts_unlocked(self) -> dict[int, int]: ...


class _Subscriber:
    """One connected request side: a non-blocking socket and the bytes it has not taken yet.

    ``stalled_since`` is when the subscriber last took bytes while some were
    waiting (0.0: nothing waits; -1.0: gone), so a subscriber is dropped
    for taking nothing, never for a large backlog it is working through:
    a snapshot of a big cache is far more than a socket buffer holds.
    """

    __slots__ = ("sock", "backlog", "stalled_since")

    def __init__(self, sock: socket.socket):
        sock.setblocking(False)
        self.sock = sock
        self.backlog = bytearray()
        self.stalled_since = 0.0

    def queue(self, data: bytes) -> None:
        """Keep ``data`` for the sender thread, after what already waits."""
        if not self.backlog and self.stalled_since >= 0:
            self.stalled_since = time.monotonic()
        self.backlog += data

    def write(self, frame: bytes) -> None:
        """Send what the socket takes now; keep the rest, in order, for the sender thread."""
        if not self.backlog:
            try:
                sent = self.sock.send(frame)
            except BlockingIOError:
                sent = 0
            if sent == len(frame):
                return
            frame = frame[sent:]
        self.queue(frame)

    def drain(self) -> None:
        while self.backlog:
            try:
                sent = self.sock.send(self.backlog)
            except BlockingIOError:
                return
            del self.backlog[:sent]
            if self.stalled_since >= 0:
                self.stalled_since = time.monotonic()  # it is taking what waits

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class ChannelServer:
    """Engine-core side: accepts subscribers and streams the mirror's page events to them.

    The mirror calls :meth:`sink` for each event and :meth:`flush` when the
    block-pool call that produced them returns; both run on the engine thread
    under the mirror's lock.  ``flush`` encodes one frame and writes it with
    non-blocking sends, so the frame is in the subscriber's socket within
    microseconds of the change; whatever a slow subscriber does not take is
    kept in order and written by a helper thread.  A subscriber that takes
    nothing for ``STALL_LIMIT_S`` while bytes wait, or falls ``BACKLOG_LIMIT``
    bytes behind, is dropped; it reconnects and starts again from a snapshot.
    """

    STALL_LIMIT_S = 10.0
    BACKLOG_LIMIT = 64 << 20

    def __init__(self, path: str, mirror: MirrorSource):
        self.path = path
        self.mirror = mirror
        self._pending: list[tuple[int, int]] = []
        self._oldest_ns = 0
        self._subscribers: list[_Subscriber] = []
        self._wake = threading.Event()
        self._closed = False
        self._listener: socket.socket | None = None
        self.frames_sent = 0

    # ------------------------------------------------------- engine thread
    def sink(self, op: int, key: int) -> None:
        """One page event (engine thread, mirror lock held); nobody listening: nothing to keep."""
        if not self._subscribers:
            return
        if not self._pending:
            self._oldest_ns = time.monotonic_ns()
        self._pending.append((op, key))

    def flush(self) -> None:
        """Send the pending events as one frame (engine thread); never blocks."""
        if not self._pending:
            return
        with self.mirror.lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        if not self._pending:
            return
        frame = encode_events(self._oldest_ns, self._pending)
        self._pending = []
        self.frames_sent += 1
        backlog = False
        for sub in self._subscribers:
            try:
                sub.write(frame)
            except OSError:
                sub.stalled_since = -1.0  # gone: the sender thread drops it
            backlog = backlog or bool(sub.backlog) or sub.stalled_since < 0
        if backlog:
            self._wake.set()

    # ---------------------------------------------------------- lifecycle
    def start(self) -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if is_abstract(self.path):
            listener.bind(self.path)
        else:
            if os.path.exists(self.path):
                os.unlink(self.path)  # a stale socket of a crashed engine with the same identity
            old_umask = os.umask(0o177)
            try:
                listener.bind(self.path)
            finally:
                os.umask(old_umask)
        listener.listen(16)
        self._listener = listener
        atexit.register(self.close)
        threading.Thread(target=self._accept_loop, name="contextpilot-channel-accept", daemon=True).start()
        threading.Thread(target=self._send_loop, name="contextpilot-channel-send", daemon=True).start()
        logger.info("contextpilot: publishing the cache mirror on %s", shown(self.path))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        if self._listener is not None:
            try:
                self._listener.close()
            except OSError:
                pass
        if not is_abstract(self.path):
            try:
                os.unlink(self.path)
            except OSError:
                pass

    # ------------------------------------------------------------ threads
    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._listener.accept()  # type: ignore[union-attr]
            except OSError:
                return
            if not same_user(conn):
                logger.warning("contextpilot: refused a channel connection from another user")
                conn.close()
                continue
            sub = _Subscriber(conn)
            # Pending events go to the older subscribers only: the snapshot already holds them.
            with self.mirror.lock:
                self._flush_locked()
                snapshot = self.mirror.canonical_counts_unlocked()
                sub.queue(encode_hello(self.mirror.page_size, snapshot))
                self._subscribers.append(sub)
            self._wake.set()

    def _send_loop(self) -> None:
        while not self._closed:
            self._wake.wait(0.05)
            self._wake.clear()
            try:
                self._service()
            except Exception as exc:  # never let the channel take the engine down
                report_failure("channel_error", exc)

    def _service(self) -> None:
        now = time.monotonic()
        with self.mirror.lock:
            keep = []
            for sub in self._subscribers:
                try:
                    sub.drain()
                except OSError:
                    sub.stalled_since = -1.0
                stalled = sub.backlog and (
                    now - sub.stalled_since > self.STALL_LIMIT_S or len(sub.backlog) > self.BACKLOG_LIMIT
                )
                if sub.stalled_since < 0 or stalled:
                    sub.close()  # it reconnects and gets a fresh snapshot
                    continue
                if not sub.backlog:
                    sub.stalled_since = 0.0
                keep.append(sub)
            self._subscribers = keep
            waiting = [sub.sock for sub in keep if sub.backlog]
        if waiting:
            select.select([], waiting, [], 0.05)
            self._wake.set()


class ChannelSubscriber:
    """Request side: keeps a ContextIndex equal to the engine core's mirror."""

    #: how long to wait for an engine core that has not opened its socket yet
    CONNECT_PATIENCE_S = 600.0

    def __init__(self, path: str, index: "ContextIndex", lag: "LagStats"):
        self.path = path
        self.index = index
        self.lag = lag
        self.connected = threading.Event()
        self.hellos = 0
        self.frames = 0
        self._closed = False
        self._sock: socket.socket | None = None
        self._thread = threading.Thread(target=self._run, name="contextpilot-channel-subscribe", daemon=True)

    def start(self) -> "ChannelSubscriber":
        self._thread.start()
        return self

    def close(self) -> None:
        self._closed = True
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            except OSError:
                pass

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # ------------------------------------------------------------- thread
    def _run(self) -> None:
        waited_since = time.monotonic()
        ever_connected = False
        delay = 0.02
        while not self._closed:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.path)
                if not same_user(sock):
                    raise PermissionError("the channel's socket belongs to another user")
            except OSError:
                sock.close()
                gone_for = time.monotonic() - waited_since
                if ever_connected or gone_for > self.CONNECT_PATIENCE_S:
                    return  # the engine's cache side is gone (or never came); nothing more to mirror
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            ever_connected = True
            delay = 0.02
            self._sock = sock
            try:
                self._serve(sock)
            except Exception as exc:  # a broken stream: forget what it said, reconnect
                if not self._closed:
                    report_failure("channel_error", exc)
            finally:
                self.connected.clear()
                self._sock = None
                try:
                    sock.close()
                except OSError:
                    pass
                # Without the engine's stream the mirror would go stale: claim nothing is cached.
                self.index.pages_cleared()
                waited_since = time.monotonic()

    def _read(self, sock: socket.socket, n: int) -> bytes | None:
        chunks = []
        while n:
            data = sock.recv(min(n, 1 << 20))
            if not data:
                return None
            chunks.append(data)
            n -= len(data)
        return b"".join(chunks)

    def _serve(self, sock: socket.socket) -> None:
        while not self._closed:
            head = self._read(sock, _HEADER.size)
            if head is None:
                return
            length, kind = _HEADER.unpack(head)
            if length > _MAX_FRAME:
                raise ValueError(f"frame of {length} bytes is too large")
            payload = self._read(sock, length)
            if payload is None:
                return
            if kind == HELLO:
                self._apply_hello(payload)
            elif kind == EVENTS:
                self._apply_events(payload)
            else:
                raise ValueError(f"unknown frame type {kind}")

    def _apply_hello(self, payload: bytes) -> None:
        page_size, n = _HELLO_HEAD.unpack_from(payload)
        index = self.index
        if index.page_size != page_size:
            index.attach_engine(page_size)
        keys: list[int] = []
        off = _HELLO_HEAD.size
        for _ in range(n):
            key = int.from_bytes(payload[off : off + _KEY_BYTES], "little")
            (copies,) = struct.unpack_from("<I", payload, off + _KEY_BYTES)
            keys.extend([key] * copies)
            off += _KEY_BYTES + 4
        index.pages_cleared()
        index.pages_stored(keys)
        metrics.count_mirror_events(stored=len(keys), cleared=1)
        self.hellos += 1
        self.connected.set()

    def _apply_events(self, payload: bytes) -> None:
        oldest, n = _EVENTS_HEAD.unpack_from(payload)
        index = self.index
        off = _EVENTS_HEAD.size
        run_op, run = 0, []  # apply consecutive events of one kind in one call
        removals = 0

        def flush() -> None:
            if run_op == STORED:
                index.pages_stored(run)
            elif run_op == REMOVED:
                index.pages_removed(run)

        cleared = 0
        for _ in range(n):
            op = payload[off]
            key = int.from_bytes(payload[off + 1 : off + 1 + _KEY_BYTES], "little")
            off += 1 + _KEY_BYTES
            if op != STORED:
                removals += 1
            if op == CLEARED:
                cleared += 1
                flush()
                run_op, run = 0, []
                index.pages_cleared()
                continue
            if op != run_op:
                flush()
                run_op, run = op, []
            run.append(key)
        flush()
        self.frames += 1
        lag = (time.monotonic_ns() - oldest) / 1e9
        self.lag.add(lag, n, removals)
        metrics.count_mirror_events(stored=n - removals, removed=removals - cleared, cleared=cleared)
        metrics.observe_lag(lag)
