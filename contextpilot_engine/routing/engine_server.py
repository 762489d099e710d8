"""One vLLM OpenAI server with its KV events on: the engine a managed Ray Serve replica runs.

The router mirrors each replica's cache from the engine's own KV events, so
every server it starts publishes them (``--kv-events-config`` with a ZMQ
publisher and a replay socket on free local ports, bound by the engine).
:class:`EngineServer` starts ``python -m vllm.entrypoints.openai.api_server``
(the console script of the CPU build is broken) with the caller's engine
arguments, waits until ``/health`` answers, and stops it with the replica:

* the server runs in a process group of its own, so stopping it stops the
  engine core it may have started;
* it gets ``SIGTERM`` when the process that started it dies (Linux
  ``PR_SET_PDEATHSIG``), so a replica killed without a chance to clean up
  leaves no engine running.

:class:`ServerEndpoints` is what a replica publishes to the router (its
``record_replica_metadata``): the HTTP URL, the KV-event endpoints, the
block size and the model's local path, so the router's mirror and
tokenizer need no other configuration.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

__all__ = ["EngineServer", "EngineServerError", "ServerEndpoints", "free_port", "kv_events_config"]

#: the key of the replica metadata that holds a :class:`ServerEndpoints`
METADATA_KEY = "contextpilot"


class EngineServerError(RuntimeError):
    """The engine server could not be started (the message carries the end of its log)."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class ServerEndpoints:
    """Where one engine server listens (what the router needs to mirror and rewrite for it)."""

    url: str
    #: the KV-event PUB endpoint the router connects to (None: no events; the router models the cache)
    kv_events: str | None = None
    #: the replay (ROUTER) endpoint that repairs gaps
    kv_replay: str | None = None
    #: the engine's block size (None: read from the server)
    block_size: int | None = None
    #: the model's directory, for the tokenizer (None: the path the server reports)
    model_path: str | None = None
    #: the server's process id, when this replica started it (for operators and tests)
    pid: int | None = None

    def to_metadata(self) -> dict:
        return {METADATA_KEY: asdict(self)}

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any] | None) -> "ServerEndpoints | None":
        """The endpoints a replica published; None when it published none (not one of ours)."""
        data = (metadata or {}).get(METADATA_KEY)
        if not isinstance(data, Mapping) or not isinstance(data.get("url"), str):
            return None
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def kv_events_config(host: str, port: int, replay_port: int) -> str:
    """The ``--kv-events-config`` of a server whose publisher the router connects to."""
    return json.dumps({
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": f"tcp://*:{port}",
        "replay_endpoint": f"tcp://*:{replay_port}",
        "topic": "",
    }, separators=(",", ":"))


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # not Linux: the replica's own shutdown still stops it
        pass


@dataclass
class EngineServer:
    """A vLLM OpenAI server subprocess on ``host`` with KV events (use as a context manager, or start/stop)."""

    model: str
    #: engine arguments after the model (``--block-size``, ``--max-model-len``, ...)
    args: Sequence[str] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    served_model_name: str | None = None
    block_size: int = 32
    startup_timeout_s: float = 600.0
    python: str = sys.executable

    def __post_init__(self) -> None:
        self.port = free_port(self.host)
        self.kv_port = free_port(self.host)
        self.replay_port = free_port(self.host)
        self.url = f"http://{self.host}:{self.port}"
        self.tmpdir = tempfile.mkdtemp(prefix="cp-engine-")
        self.log_path = os.path.join(self.tmpdir, "server.log")
        self.proc: subprocess.Popen | None = None
        self.startup_seconds = 0.0

    @property
    def command(self) -> list[str]:
        args = list(self.args)
        if "--block-size" not in args:
            args += ["--block-size", str(self.block_size)]
        if self.served_model_name and "--served-model-name" not in args:
            args += ["--served-model-name", self.served_model_name]
        return [
            self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
            "--host", self.host, "--port", str(self.port),
            "--kv-events-config", kv_events_config(self.host, self.kv_port, self.replay_port),
            *args,
        ]

    def endpoints(self) -> ServerEndpoints:
        return ServerEndpoints(
            url=self.url,
            kv_events=f"tcp://{self.host}:{self.kv_port}",
            kv_replay=f"tcp://{self.host}:{self.replay_port}",
            block_size=self._given_block_size(),
            model_path=self.model if os.path.isdir(self.model) else None,
            pid=self.proc.pid if self.proc is not None else None,
        )

    def _given_block_size(self) -> int:
        args = list(self.args)
        if "--block-size" in args:
            return int(args[args.index("--block-size") + 1])
        return self.block_size

    def start(self) -> "EngineServer":
        start = time.monotonic()
        env = dict(os.environ, **dict(self.env))
        env.setdefault("TMPDIR", self.tmpdir)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.command, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True, preexec_fn=_die_with_parent)
        while True:
            if self.proc.poll() is not None:
                tail = self.log_tail()
                self.stop()
                raise EngineServerError(f"the engine server exited with {self.proc.returncode}:\n{tail}")
            if self.healthy(2.0):
                break
            if time.monotonic() - start > self.startup_timeout_s:
                tail = self.log_tail()
                self.stop()
                raise EngineServerError(
                    f"the engine server at {self.url} was not healthy within {self.startup_timeout_s:g} s:\n{tail}")
            time.sleep(0.5)
        self.startup_seconds = time.monotonic() - start
        return self

    def healthy(self, timeout: float = 2.0) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=timeout) as r:
                return r.status == 200
        except OSError:
            return False

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM to the server's process group, then SIGKILL after ``timeout`` (idempotent)."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        log = getattr(self, "_log", None)
        if log is not None and not log.closed:
            log.close()
        if proc is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)  # its log and whatever the engine left there

    def log_tail(self, n: int = 4000) -> str:
        try:
            with open(self.log_path) as f:
                return f.read()[-n:]
        except OSError:
            return ""

    def __enter__(self) -> "EngineServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
