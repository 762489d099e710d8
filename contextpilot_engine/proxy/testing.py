"""Helpers for the proxy's tests and benchmark (not used at serving time).

* :class:`ProxyThread` runs a proxy in a thread of this process (its own
  event loop and uvicorn server on 127.0.0.1), so a test can drive it over
  HTTP and still read its components.
* :class:`EventRelay` sits between an engine's KV-event publisher and the
  proxy: the engine connects to it, the proxy connects to it, and a test can
  drop one batch (a gap), cut the proxy's link (a dropped stream) and
  restore it, all without touching the engine.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

__all__ = ["ProxyThread", "EventRelay", "StubBackend"]


class ProxyThread:
    """A proxy on 127.0.0.1 in a background thread (use as a context manager)."""

    def __init__(self, config: Any, port: int | None = None):
        self.config = config
        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proxy: Any = None
        self._server: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._ready = threading.Event()

    def __enter__(self) -> "ProxyThread":
        self._thread = threading.Thread(target=self._run, name="contextpilot-proxy-test", daemon=True)
        self._thread.start()
        self._ready.wait(120)
        if self._error is not None:
            raise self._error
        if not self._ready.is_set():
            raise RuntimeError("the proxy did not start within 120 s")
        return self

    def _run(self) -> None:
        import uvicorn

        from .app import Proxy

        loop = asyncio.new_event_loop()
        self._loop = loop

        async def main() -> None:
            try:
                self.proxy = await Proxy.open(self.config)
                self._server = uvicorn.Server(uvicorn.Config(self.proxy.app, host="127.0.0.1", port=self.port,
                                                             log_level="warning", lifespan="off", access_log=False,
                                                             backlog=4096, timeout_keep_alive=75))
                task = asyncio.ensure_future(self._server.serve())
                while not self._server.started and not task.done():
                    await asyncio.sleep(0.01)
            except BaseException as exc:
                self._error = exc
                self._ready.set()
                return
            self._ready.set()
            try:
                await task
            finally:
                await self.proxy.close()

        try:
            loop.run_until_complete(main())
        finally:
            loop.close()

    def call(self, fn: Any, *args: Any) -> Any:
        """Run ``fn(*args)`` on the proxy's event loop and return its result."""
        assert self._loop is not None
        done = threading.Event()
        out: list = []

        def job() -> None:
            try:
                out.append((True, fn(*args)))
            except BaseException as exc:
                out.append((False, exc))
            done.set()

        self._loop.call_soon_threadsafe(job)
        done.wait(30)
        ok, value = out[0]
        if not ok:
            raise value
        return value

    def __exit__(self, *exc: Any) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(30)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EventRelay:
    """Forwards an engine's KV events to a proxy, with a switch and a way to lose one batch.

    The engine's publisher connects to ``engine_side`` (a SUB bound here, as
    with ``"endpoint": "tcp://127.0.0.1:PORT"`` in ``--kv-events-config``); the
    proxy connects to ``proxy_side`` (a PUB bound here).  :meth:`cut` closes
    the PUB (the proxy sees its publisher disconnect), :meth:`restore` binds
    it again, :meth:`drop_next` swallows the next batch.
    """

    def __init__(self) -> None:
        self.engine_port = _free_port()
        self.proxy_port = _free_port()
        self.engine_side = f"tcp://127.0.0.1:{self.engine_port}"
        self.proxy_side = f"tcp://127.0.0.1:{self.proxy_port}"
        self.forwarded = 0
        self.dropped = 0
        self._drop = 0
        self._up = threading.Event()
        self._up.set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="contextpilot-relay", daemon=True)

    def __enter__(self) -> "EventRelay":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(5)

    def drop_next(self, n: int = 1) -> None:
        self._drop += n

    def cut(self) -> None:
        self._up.clear()
        time.sleep(0.3)

    def restore(self) -> None:
        self._up.set()
        time.sleep(0.3)

    def _run(self) -> None:
        import zmq

        ctx = zmq.Context()
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.bind(self.engine_side)
        pub = None
        try:
            while not self._stop.is_set():
                if self._up.is_set() and pub is None:
                    pub = ctx.socket(zmq.PUB)
                    pub.setsockopt(zmq.LINGER, 0)
                    pub.bind(self.proxy_side)
                elif not self._up.is_set() and pub is not None:
                    pub.close(0)
                    pub = None
                if not sub.poll(20):
                    continue
                frames = sub.recv_multipart()
                if self._drop:
                    self._drop -= 1
                    self.dropped += 1
                    continue
                if pub is not None:
                    pub.send_multipart(frames)
                    self.forwarded += 1
                else:
                    self.dropped += 1
        finally:
            if pub is not None:
                pub.close(0)
            sub.close(0)
            ctx.term()


class StubBackend:
    """A minimal OpenAI-compatible backend on 127.0.0.1 in a thread: instant answers, or slow ones.

    ``delay_s`` holds every generation answer that long (a slow backend);
    ``status`` answers generation requests with that status instead.
    Requests received are kept in :attr:`received` (bounded).
    """

    def __init__(self, delay_s: float = 0.0, status: int = 200, model: str = "tiny"):
        #: the ``cached_tokens`` every answer reports
        self.cached_tokens = 0
        #: slow answers abandoned because their client disconnected first
        self.aborted = 0
        self.delay_s = delay_s
        self.status = status
        self.model = model
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        from collections import deque

        self.received: deque = deque(maxlen=10_000)
        #: the headers of each request in :attr:`received`, lower-cased names
        self.received_headers: deque = deque(maxlen=10_000)
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def app(self) -> Any:
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse, Response, StreamingResponse
        from starlette.routing import Route

        async def chat(request):
            body = await request.json()
            self.received.append(body)
            self.received_headers.append({k.lower(): v for k, v in request.headers.items()})
            if self.delay_s:  # like an engine, stop generating once the client has gone
                end = time.monotonic() + self.delay_s
                while time.monotonic() < end:
                    if await request.is_disconnected():
                        self.aborted += 1
                        return Response(status_code=499)
                    await asyncio.sleep(0.02)
            if self.status != 200:
                return JSONResponse({"error": {"message": "stub refuses", "code": self.status}},
                                    status_code=self.status)
            usage = {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11,
                     "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}
            if body.get("stream"):
                async def gen():
                    for word in ("a", "b"):
                        yield ("data: " + _json({"id": "stub-1", "object": "chat.completion.chunk", "choices": [
                            {"index": 0, "delta": {"content": word}}]}) + "\n\n").encode()
                    yield b"data: [DONE]\n\n"
                return StreamingResponse(gen(), media_type="text/event-stream")
            return JSONResponse({"id": f"stub-{len(self.received)}", "object": "chat.completion", "model": self.model,
                                 "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                                              "finish_reason": "stop"}], "usage": usage})

        async def models(request):
            return JSONResponse({"object": "list", "data": [{"id": self.model, "object": "model", "root": None,
                                                             "parent": None}]})

        async def health(request):
            return JSONResponse({})

        return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]),
                                 Route("/v1/completions", chat, methods=["POST"]),
                                 Route("/v1/models", models), Route("/health", health)])

    def __enter__(self) -> "StubBackend":
        import uvicorn

        self._server = uvicorn.Server(uvicorn.Config(self.app(), host="127.0.0.1", port=self.port,
                                                     log_level="warning", lifespan="off", access_log=False,
                                                     backlog=4096, timeout_keep_alive=75))
        self._thread = threading.Thread(target=self._server.run, name="contextpilot-stub-backend", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)


def _json(obj: Any) -> str:
    import json

    return json.dumps(obj)
