"""The backend engine, over HTTP: requests with explicit timeouts, failures as 502/504 naming it.

A proxy must never hang on its backend and never leave a client guessing
which hop failed.  Every call has a connect timeout and a read timeout
(the longest the backend may stay silent, which for a streamed answer is
the gap between two chunks); a refused or dropped connection is a
:class:`BackendError` with status 502, a timeout one with status 504, and
the message names the backend's URL.

:func:`probe` reads, once at start, what the proxy needs to know about the
backend and checks against it: the served models (a LoRA adapter is a model
with a ``parent``), the model's local path, the engine's block size (vLLM:
the ``vllm:cache_config_info`` metric; SGLang: ``page_size`` in its server
info) and whether ``/tokenize`` renders chat messages.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import httpx

__all__ = ["Backend", "BackendError", "BackendInfo", "BackendTimeouts", "HOP_HEADERS", "probe"]

#: headers that describe one hop, never forwarded (RFC 9110 section 7.6.1), plus ours
HOP_HEADERS = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "host", "content-length", "content-encoding", "accept-encoding",
})


class BackendError(Exception):
    """The backend could not be reached or did not answer in time."""

    def __init__(self, status: int, kind: str, message: str):
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message


@dataclass(frozen=True)
class BackendTimeouts:
    connect_s: float = 5.0
    #: the longest the backend may stay silent (a whole answer, or between two streamed chunks)
    read_s: float = 600.0
    write_s: float = 60.0
    #: waiting for a free connection of the pool
    pool_s: float = 60.0


@dataclass
class BackendInfo:
    """What :func:`probe` learned (None: unknown)."""

    reachable: bool = False
    models: list[str] = field(default_factory=list)
    #: the first model's ``root`` (vLLM: the path it was loaded from)
    model_root: str | None = None
    lora_names: set[str] = field(default_factory=set)
    block_size: int | None = None
    num_blocks: int | None = None
    #: POST /tokenize renders chat messages (vLLM)
    tokenize: bool = False
    #: the engine, when it gave itself away ("vllm": its cache metric; "sglang": its server info)
    engine: str | None = None
    error: str | None = None


class Backend:
    """``httpx.AsyncClient`` lanes bound to one backend URL.

    httpcore's connection pool walks every pooled connection (and polls each
    idle socket) whenever a request is queued or a response released, so one
    pool's cost per request grows with the connections that many concurrent
    clients keep open, and that cost runs on the proxy's event loop.  Requests
    therefore take :data:`LANES` clients in turn, each pool holding a share of
    the connections; the total connection limit is the same.
    """

    #: clients the generation requests rotate over
    LANES = 16

    def __init__(self, url: str, timeouts: BackendTimeouts = BackendTimeouts(), max_connections: int = 1024):
        self.url = url.rstrip("/")
        self.timeouts = timeouts
        lanes = max(1, min(self.LANES, max_connections))
        per_lane = -(-max_connections // lanes)
        timeout = httpx.Timeout(connect=timeouts.connect_s, read=timeouts.read_s, write=timeouts.write_s,
                                pool=timeouts.pool_s)
        self._lanes = [httpx.AsyncClient(base_url=self.url, timeout=timeout,
                                         limits=httpx.Limits(max_connections=per_lane,
                                                             max_keepalive_connections=per_lane))
                       for _ in range(lanes)]
        self._turn = 0
        #: the client for probes and other one-off calls (not per request: those take :meth:`next_lane`)
        self.client = self._lanes[0]

    def next_lane(self) -> httpx.AsyncClient:
        """The client for the next per-request call (every request's traffic rotates over the lanes)."""
        self._turn = (self._turn + 1) % len(self._lanes)
        return self._lanes[self._turn]

    async def aclose(self) -> None:
        for client in self._lanes:
            await client.aclose()

    def error(self, exc: Exception) -> BackendError:
        """The 502/504 that ``exc`` (an httpx error) stands for."""
        if isinstance(exc, httpx.ConnectTimeout):
            return BackendError(504, "timeout", f"backend {self.url} did not accept a connection within "
                                                f"{self.timeouts.connect_s:g} s")
        if isinstance(exc, httpx.PoolTimeout):
            return BackendError(504, "timeout", f"backend {self.url}: no free connection within "
                                                f"{self.timeouts.pool_s:g} s")
        if isinstance(exc, httpx.TimeoutException):
            return BackendError(504, "timeout", f"backend {self.url} did not answer within "
                                                f"{self.timeouts.read_s:g} s")
        return BackendError(502, "unreachable", f"backend {self.url} is unreachable: {type(exc).__name__}: {exc}")

    async def open(self, method: str, path: str, *, headers: Mapping[str, str | bytes] | None = None,
                   content: bytes | None = None, params: Any = None) -> httpx.Response:
        """Send a request and return the response with its body still to be read (close it after)."""
        client = self.next_lane()
        request = client.build_request(method, path, headers=headers, content=content, params=params)
        try:
            return await client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise self.error(exc) from None

    async def read(self, response: httpx.Response) -> bytes:
        try:
            return await response.aread()
        except httpx.HTTPError as exc:
            raise self.error(exc) from None
        finally:
            await response.aclose()

    async def get_json(self, path: str, timeout: float = 5.0) -> Any:
        """GET ``path`` as JSON; None on any failure (for probes)."""
        try:
            r = await self.client.get(path, timeout=timeout)
            return r.json() if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None

    async def health(self, timeout: float = 2.0) -> dict:
        """``{"url", "healthy", "status" or "error"}`` from the backend's ``/health``."""
        try:
            r = await self.client.get("/health", timeout=timeout)
        except httpx.HTTPError as exc:
            return {"url": self.url, "healthy": False, "error": self.error(exc).message}
        return {"url": self.url, "healthy": r.status_code == 200, "status": r.status_code}


_BLOCK_SIZE = re.compile(r'^vllm:cache_config_info\{[^}]*\bblock_size="(\d+)"')
_NUM_BLOCKS = re.compile(r'^vllm:cache_config_info\{[^}]*\bnum_gpu_blocks="(\d+)"')


async def probe(backend: Backend) -> BackendInfo:
    """What the backend says about itself (see the module docstring); never raises."""
    info = BackendInfo()
    models = await backend.get_json("/v1/models")
    if models is None:
        health = await backend.health()
        info.error = health.get("error") or f"GET {backend.url}/v1/models failed"
        return info
    info.reachable = True
    for entry in models.get("data") or []:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
            continue
        info.models.append(entry["id"])
        if entry.get("parent"):
            info.lora_names.add(entry["id"])
        elif info.model_root is None and isinstance(entry.get("root"), str):
            info.model_root = entry["root"]
    try:
        r = await backend.client.get("/metrics", timeout=5.0)
        text = r.text if r.status_code == 200 else ""
    except httpx.HTTPError:
        text = ""
    for line in text.splitlines():
        m = _BLOCK_SIZE.match(line)
        if m:
            info.block_size = int(m.group(1))
            info.engine = "vllm"
            n = _NUM_BLOCKS.match(line)
            info.num_blocks = int(n.group(1)) if n else None
            break
    if info.block_size is None:
        for path in ("/get_server_info", "/server_info"):  # SGLang
            server = await backend.get_json(path)
            if isinstance(server, dict) and isinstance(server.get("page_size"), int):
                info.block_size = server["page_size"]
                info.engine = "sglang"
                break
    if info.models:
        try:
            r = await backend.client.post("/tokenize", json={"model": info.models[0], "messages": [
                {"role": "user", "content": "hi"}], "add_generation_prompt": True}, timeout=5.0)
            info.tokenize = r.status_code == 200 and isinstance(r.json().get("tokens"), list)
        except (httpx.HTTPError, ValueError, AttributeError):
            info.tokenize = False
    return info
