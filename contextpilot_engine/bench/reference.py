"""Find and drive the reference ContextPilot 0.5.0 in its own virtual environment.

The reference has heavy dependencies (scipy, transformers, datasets,
fastapi, ...) and must not leak into this project's environment, so it
lives in a venv built by ``scripts/setup_reference.sh`` from
``requirements/reference.txt`` and is driven through a subprocess running
:mod:`.ref_driver` (JSON files in and out).

Where the venv is looked for, in order:

1. ``$CONTEXTPILOT_REF_PYTHON`` (a python executable);
2. ``${CONTEXTPILOT_CACHE:-~/.cache/contextpilot-engine}/ref-venv-<hash>/bin/python``
   where ``<hash>`` is the lock's hash, as the setup script names it, with
   its completion marker present;
3. any other complete ``ref-venv-*`` there (newest first).

When none is found the suite skips the reference with that message.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

__all__ = ["ReferenceUnavailable", "ReferenceRunner", "find_reference_python", "REQUIREMENTS"]

REQUIREMENTS = Path(__file__).resolve().parents[2] / "requirements" / "reference.txt"
MARKER = ".contextpilot-ref-venv-complete"
DRIVER = Path(__file__).with_name("ref_driver.py")


class ReferenceUnavailable(RuntimeError):
    """The reference venv is missing or broken (the message says how to build it)."""


def _cache_root() -> Path:
    env = os.environ.get("CONTEXTPILOT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "contextpilot-engine"


def _lock_hash() -> str | None:
    if not REQUIREMENTS.is_file():
        return None
    return hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()[:16]


def find_reference_python() -> tuple[str | None, str]:
    """``(python, where)`` of the reference venv, or ``(None, why not)``."""
    env = os.environ.get("CONTEXTPILOT_REF_PYTHON")
    if env:
        if os.access(env, os.X_OK):
            return env, "CONTEXTPILOT_REF_PYTHON"
        return None, f"CONTEXTPILOT_REF_PYTHON={env} is not an executable"
    root = _cache_root()
    wanted = _lock_hash()
    if wanted:
        venv = root / f"ref-venv-{wanted}"
        if (venv / MARKER).is_file():
            return str(venv / "bin" / "python"), str(venv)
    others = sorted(
        (p for p in root.glob("ref-venv-*") if (p / MARKER).is_file()), key=lambda p: p.stat().st_mtime, reverse=True
    )
    if others:
        return str(others[0] / "bin" / "python"), f"{others[0]} (not built from the current requirements/reference.txt)"
    return None, (
        f"reference ContextPilot not found (no complete {root}/ref-venv-*); build it with "
        "`bash scripts/setup_reference.sh` (about 1 minute, ~0.8 GB) or set CONTEXTPILOT_REF_PYTHON"
    )


class ReferenceRunner:
    """Runs reference jobs in subprocesses; blocks are passed as integer ids."""

    def __init__(self, python: str, timeout: float = 3600.0):
        self.python = python
        self.timeout = timeout
        self.version: str | None = None

    @classmethod
    def locate(cls, timeout: float = 3600.0) -> "ReferenceRunner":
        python, where = find_reference_python()
        if python is None:
            raise ReferenceUnavailable(where)
        return cls(python, timeout)

    def _run(self, job: dict) -> dict:
        with tempfile.TemporaryDirectory(prefix="cp-ref-") as tmp:
            src, dst = Path(tmp) / "in.json", Path(tmp) / "out.json"
            src.write_text(json.dumps(job))
            env = dict(os.environ, PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
            env.pop("PYTHONPATH", None)  # never let this project's modules shadow the reference's
            try:
                proc = subprocess.run(
                    [self.python, str(DRIVER), str(src), str(dst)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                    timeout=self.timeout,
                    env=env,
                    cwd=tmp,
                )
            except subprocess.TimeoutExpired as exc:
                raise ReferenceUnavailable(f"the reference took more than {self.timeout:.0f} s") from exc
            if proc.returncode != 0 or not dst.is_file():
                tail = "\n".join((proc.stderr or "").strip().splitlines()[-8:])
                raise ReferenceUnavailable(f"reference driver failed (exit {proc.returncode}):\n{tail}")
            result = json.loads(dst.read_text())
        self.version = result.get("version", self.version)
        return result

    def offline(self, contexts: Sequence[Sequence[int]], repeats: int = 1) -> dict:
        """``{"order", "reordered", "seconds"}`` of one batch reorder (median time over ``repeats``)."""
        return self._run({"mode": "offline", "contexts": [list(c) for c in contexts], "repeats": repeats})

    def offline_many(self, batches: Sequence[Sequence[Sequence[int]]]) -> list[dict]:
        return self._run({"mode": "offline_many", "batches": [[list(c) for c in b] for b in batches]})["results"]

    def online(self, contexts: Sequence[Sequence[int]], conversations: Sequence[str | None] | None = None) -> dict:
        """``{"reordered", "latencies", "crashed_after", "error", "seconds"}``, one call per request."""
        job = {"mode": "online", "contexts": [list(c) for c in contexts]}
        if conversations is not None and any(c is not None for c in conversations):
            job["conversations"] = list(conversations)
        return self._run(job)


def main() -> int:  # pragma: no cover - a convenience for humans
    python, where = find_reference_python()
    print(python or "", where, file=sys.stderr if python is None else sys.stdout)
    return 0 if python else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
