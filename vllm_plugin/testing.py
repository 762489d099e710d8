"""Helpers shared by the plugin's tests, benchmark and demo (not used at serving time).

* :func:`expected_canonical_counts` recomputes, independently of the mirror,
  which canonical page key every entry of a block pool stands for: it hashes
  the prompts that were sent with vLLM's own block-hash function and pairs
  each hash with :func:`contextpilot_engine.pages.chain_page_keys` of the
  same tokens.  Comparing that with the index is the mirror-exactness check.
* :class:`OpenAIServer` starts ``python -m vllm.entrypoints.openai.api_server``
  on 127.0.0.1 with a free port and waits until it is healthy.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any, Iterable, Sequence

__all__ = ["engine_hash_table", "expected_canonical_counts", "OpenAIServer", "free_port"]


def engine_hash_table(llm: Any, prompts: Iterable[Sequence[int]], salt: Any = None) -> dict:
    """vLLM hash key (group 0) -> canonical key, for every full page of every prompt."""
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core.kv_cache_utils import hash_block_tokens, make_block_hash_with_group_id

    from contextpilot_engine.pages import chain_page_keys

    config = llm.llm_engine.vllm_config
    page = config.cache_config.block_size
    hash_fn = get_hash_fn_by_name(config.cache_config.prefix_caching_hash_algo)
    table: dict = {}
    for tokens in prompts:
        tokens = list(tokens)
        canon = chain_page_keys(tokens, page, salt=salt)
        parent = None
        for j, c in enumerate(canon):
            parent = hash_block_tokens(hash_fn, parent, tokens[j * page : (j + 1) * page], None)
            table[make_block_hash_with_group_id(parent, 0)] = c
    return table


def expected_canonical_counts(pool: Any, table: dict) -> dict:
    """Copies per canonical key in ``pool`` right now, named through ``table`` (KeyError if unknown)."""
    from .block_pool import pool_canonical_counts

    return pool_canonical_counts(pool, table.__getitem__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OpenAIServer:
    """A vLLM OpenAI server subprocess on 127.0.0.1 (use as a context manager)."""

    def __init__(self, model: str, extra_args: Sequence[str] = (), env: dict | None = None,
                 startup_timeout: float = 300.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.model = model = os.fspath(model)
        #: the server's own TMPDIR (its sockets, our channel's socket) and log, removed on exit
        self.tmpdir = tempfile.mkdtemp(prefix="cp-server-")
        self.log_path = os.path.join(self.tmpdir, "server.log")
        self.cmd = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", model, "--served-model-name", "tiny",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--dtype", "bfloat16", "--max-model-len", "4096", "--enforce-eager",
            "--enable-prefix-caching", "--enable-prompt-tokens-details", "--block-size", "32",
            "--seed", "0", *extra_args,
        ]
        self.env = dict(os.environ, **(env or {}), TMPDIR=self.tmpdir)
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self.startup_seconds = 0.0

    def __enter__(self) -> "OpenAIServer":
        start = time.monotonic()
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2):
                    break
            except OSError:
                if time.monotonic() - start > self.startup_timeout:
                    self.__exit__(None, None, None)
                    raise RuntimeError(f"the server did not become healthy:\n{self.log_tail()}")
                time.sleep(0.5)
        self.startup_seconds = time.monotonic() - start
        return self

    def stop(self) -> None:
        """SIGTERM, as an orchestrator stops a server, then wait for it to exit (idempotent)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self._log.closed:
            self._log.close()

    def leftovers(self) -> list[str]:
        """Files the stopped server left in its TMPDIR (other than its log)."""
        return sorted(n for n in os.listdir(self.tmpdir) if n != "server.log")

    def __exit__(self, *exc: Any) -> None:
        self.stop()
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    def log_tail(self, n: int = 4000) -> str:
        try:
            with open(self.log_path) as f:
                return f.read()[-n:]
        except OSError:
            return ""

    def client(self):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120)
