"""The engine core's mirror channel over a real Unix socket, without an engine.

The engine's hooks feed a real :class:`PageMirror` here (its ``stored``
calls are what the block-pool hooks make); the request side reads the
socket as :class:`ChannelSubscriber` would, but on the test's schedule, so a
request side that is slow to start reading is reproduced exactly.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time

from contextpilot_engine.index import ContextIndex
from contextpilot_engine.integration.channel import ChannelServer, ChannelSubscriber, encode_hello
from contextpilot_engine.integration.mirror import PageMirror
from contextpilot_engine.integration.state import LagStats


def big_mirror(pages: int) -> PageMirror:
    index = ContextIndex()
    index.attach_engine(16)
    mirror = PageMirror(index, 16)
    for h in range(pages):
        mirror.stored(("engine-hash", h), 10_000 + h)
    return mirror


def test_a_snapshot_larger_than_the_socket_buffer_reaches_a_subscriber_that_reads_late():
    mirror = big_mirror(20_000)  # a snapshot of several hundred kB, far past a socket buffer
    want = len(encode_hello(16, mirror.canonical_counts()))
    path = os.path.join(tempfile.gettempdir(), f"cp-test-channel-{os.getpid()}.sock")
    server = ChannelServer(path, mirror)
    server.start()
    mirror.publisher = server
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        time.sleep(0.3)  # the request side is busy for a moment before it reads
        sock.settimeout(2.0)
        got, closed = 0, False
        while got < want:
            data = sock.recv(1 << 20)
            if not data:
                closed = True
                break
            got += len(data)
        assert not closed and got == want  # the whole snapshot, and the server kept the subscriber
        assert len(server._subscribers) == 1

        remote = ContextIndex()
        sub = ChannelSubscriber(path, remote, LagStats()).start()
        deadline = time.monotonic() + 30  # a hang guard, not a timing assertion
        while remote.cached_pages() != mirror.index.cached_pages() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert remote.cached_pages() == mirror.index.cached_pages() and sub.hellos == 1
        sub.close()
    finally:
        sock.close()
        mirror.publisher = None
        server.close()
