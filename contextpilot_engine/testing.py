"""Helpers the test suites of every environment share (the vLLM one in ``tests/``, the SGLang one in ``tests_sglang/``).

* :func:`isolate_tmpdir` / :func:`remove_tmpdir`: one temporary directory
  for a whole pytest session (``TMPDIR`` of the session and of every engine
  or server it starts), removed at the end, so no test leaves a file behind
  in the machine's temporary directory;
* :func:`pip_would_install`: what ``pip install`` of a requirement would
  install into an environment, without installing it (pip's dry-run report).

Not used at serving time.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile

__all__ = ["isolate_tmpdir", "remove_tmpdir", "pip_would_install", "foreign_code"]

_ENV = "CONTEXTPILOT_TEST_TMPDIR"


def isolate_tmpdir(prefix: str) -> str | None:
    """Make a session directory this process's and its children's TMPDIR; None inside an outer session."""
    if os.environ.get(_ENV) is not None:
        return None
    path = tempfile.mkdtemp(prefix=prefix)
    os.environ[_ENV] = path
    os.environ["TMPDIR"] = path
    tempfile.tempdir = path
    return path


def remove_tmpdir(path: str | None) -> None:
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)


def pip_would_install(python: str, requirement: str, workdir: str) -> list[str]:
    """Names of the distributions ``python -m pip install requirement`` would install (sorted)."""
    report = os.path.join(workdir, "pip-report.json")
    out = subprocess.run(
        [python, "-m", "pip", "install", "--dry-run", "--no-build-isolation", "--quiet", "--report", report,
         requirement],
        capture_output=True, text=True, timeout=600,
    )
    if out.returncode != 0:
        raise RuntimeError(f"pip could not resolve {requirement}: {out.stderr[-3000:]}")
    with open(report) as f:
        return sorted(item["metadata"]["name"] for item in json.load(f)["install"])


def foreign_code(root: str, *more: str) -> str | None:
    """Why the package under test is not ``root``'s code, or None when it is.

    The pinned venvs are shared between checkouts, and their editable
    install points at whichever one last ran its setup script: the core
    would then come from the current folder but the packages mapped to
    top-level folders (kernels, the engine adapters) from the other
    checkout, and a test run would judge code that is not this checkout's.
    """
    import importlib

    root = os.path.realpath(root)  # the editable finder stores resolved paths
    for name in ("contextpilot_engine", "contextpilot_engine.kernels", *more):
        where = os.path.realpath(getattr(importlib.import_module(name), "__file__", None) or "")
        if not where.startswith(root + os.sep):
            return (f"{name} is imported from {where}, not from this checkout ({root}); run this checkout's "
                    "scripts/setup_env.sh (or the engine's setup script) first")
    return None
