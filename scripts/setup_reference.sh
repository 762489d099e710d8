#!/usr/bin/env bash
# Build (once) the venv holding the reference ContextPilot 0.5.0 and print its python as the last
# line of stdout.
#
#   REF_PY="$(bash scripts/setup_reference.sh | tail -n 1)"
#   contextpilot bench ...        # finds it by itself; or export CONTEXTPILOT_REF_PYTHON="$REF_PY"
#
# Why it looks like this (same scheme as scripts/setup_env.sh):
# * The venv is keyed by the hash of requirements/reference.txt and lives under the cache root
#   (${CONTEXTPILOT_CACHE:-$HOME/.cache/contextpilot-engine}/ref-venv-<hash>), so editing the pins
#   gives a new venv and never mutates one another clone may be using.
# * The reference is a benchmark opponent, not a dependency: it gets its own venv (its scipy,
#   transformers, datasets, fastapi... would otherwise mix with the engine's pinned set).
# * A venv is not relocatable, so it is built in place and a marker file is written as the very
#   last step; a venv without the marker (an interrupted build) is deleted and rebuilt. A flock
#   serialises concurrent runs. The suite only uses venvs that have the marker.
# * pip's output goes to a log file and progress to stderr, so stdout's last line is the python.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REQS="$REPO_ROOT/requirements/reference.txt"
TAG=setup_reference
# shellcheck source=lib/cached_venv.sh
source "$REPO_ROOT/scripts/lib/cached_venv.sh"

cached_venv_paths "$REQS" ref-venv
"$BASE_PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 10))' \
    || die "$BASE_PYTHON is $("$BASE_PYTHON" -V 2>&1); contextpilot 0.5.0 needs Python >= 3.10"

{
    flock 9
    if [[ ! -f "$MARKER" ]]; then
        t0=$SECONDS
        log "creating $VENV from $REQS (about a minute, ~0.8 GB; log: $LOGFILE)"
        fresh_venv
        run_logged "pip install" "$PY" -m pip install --progress-bar off -r "$REQS"
        # The suite drives the reference through this import; check it before declaring success.
        check_import 'from contextpilot.server.live_index import ContextPilot' "the reference contextpilot"
        printf 'requirements=%s\nbuilt=%s\n' "$HASH" "$(date -Is)" >"$MARKER"
        log "reference venv ready in $((SECONDS - t0)) s"
    else
        log "reusing $VENV"
    fi
} 9>"$LOCKFILE"

printf '%s\n' "$PY" >&3
