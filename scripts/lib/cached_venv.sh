# Shared by the scripts/setup_*.sh scripts (source it, do not run it).
#
# Each builds a venv once under the cache root, keyed by the hash of a requirements file, and prints
# its python as the last line of stdout. A venv is not relocatable (scripts carry absolute
# shebangs), so it is built in place and a marker file is written as the very last step: a venv
# without the marker (an interrupted build) is deleted and rebuilt. A flock on LOCKFILE serialises
# concurrent runs. pip's output goes to a log file and progress lines to stderr.
#
# The caller sets TAG (the log prefix) before sourcing, then calls cached_venv_paths.

CACHE="${CONTEXTPILOT_CACHE:-$HOME/.cache/contextpilot-engine}"
BASE_PYTHON="${CONTEXTPILOT_BASE_PYTHON:-python3}"

# Keep the real stdout on fd 3 and send everything else to stderr.
exec 3>&1 1>&2

log() { printf '[%s] %s\n' "$TAG" "$*" >&2; }
die() { printf '[%s] ERROR: %s\n' "$TAG" "$*" >&2; exit 1; }

# cached_venv_paths REQUIREMENTS PREFIX: sets HASH VENV PY MARKER LOGFILE LOCKFILE.
cached_venv_paths() {
    local reqs="$1" prefix="$2"
    [[ -f "$reqs" ]] || die "requirements file not found: $reqs"
    command -v "$BASE_PYTHON" >/dev/null || die "base interpreter '$BASE_PYTHON' not found"
    HASH="$(sha256sum "$reqs" | cut -c1-16)"
    VENV="$CACHE/$prefix-$HASH"
    PY="$VENV/bin/python"
    MARKER="$VENV/.contextpilot-$prefix-complete"
    LOGFILE="$CACHE/logs/setup-$prefix-$HASH.log"
    LOCKFILE="$CACHE/$prefix-$HASH.lock"
    mkdir -p "$CACHE" "$CACHE/logs"
}

# Run a command with its output appended to the log; on failure show the log's tail and stop.
run_logged() {
    local what="$1"; shift
    printf '\n### %s: %s\n' "$(date -Is)" "$*" >>"$LOGFILE"
    if ! "$@" >>"$LOGFILE" 2>&1; then
        printf '[%s] ERROR: %s failed; last lines of %s:\n' "$TAG" "$what" "$LOGFILE" >&2
        tail -n 40 "$LOGFILE" >&2
        exit 1
    fi
}

# Delete a venv left without its marker by an interrupted build, then create an empty one.
fresh_venv() {
    if [[ -e "$VENV" ]]; then
        log "removing incomplete venv $VENV (no completion marker)"
        rm -rf "$VENV"
    fi
    run_logged "venv creation" "$BASE_PYTHON" -m venv "$VENV"
}

# Fail with the log's tail unless the venv's python (run from / so that it sees the installed
# packages, not a checkout) can execute the given code.
check_import() {
    local code="$1" what="$2"
    if ! (cd / && "$PY" -c "$code" >>"$LOGFILE" 2>&1); then
        tail -n 40 "$LOGFILE" >&2
        die "venv $VENV cannot import $what (see above)"
    fi
}

# Die unless the base interpreter is Python 3.11 (the locks pin cp311 wheels); $1 names the lock.
require_python_311() {
    "$BASE_PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
        || die "$BASE_PYTHON is $("$BASE_PYTHON" -V 2>&1); $1 needs Python 3.11"
}

# Point the venv's editable install of this project at the checkout REPO_ROOT: the same venv serves
# every clone, whose path may differ (cheap; --no-build-isolation needs setuptools>=68 in the venv).
install_checkout() {
    run_logged "editable install of $REPO_ROOT" "$PY" -m pip install --no-deps --no-build-isolation \
        --progress-bar off -e "$REPO_ROOT"
}

# Create a fresh venv and install the complete pinned lock $1 into it, with --no-deps (resolution
# was done once, when the lock was written).
install_lock() {
    log "creating $VENV from $1 (cold install, a few minutes; log: $LOGFILE)"
    fresh_venv
    run_logged "pip install of the lock" "$PY" -m pip install --no-deps --progress-bar off -r "$1"
}

# Used only if an engine lock ever stops pinning setuptools (pip freeze omits it by default).
SETUPTOOLS_FALLBACK_PIN="setuptools==78.1.1"

# install_lock for an engine lock $1, plus setuptools>=68 when the lock does not pin it
# (install_checkout's --no-build-isolation needs it in the venv).
install_engine_lock() {
    install_lock "$1"
    if ! grep -qi '^setuptools==' "$1"; then
        run_logged "setuptools install" "$PY" -m pip install --no-deps --progress-bar off \
            "$SETUPTOOLS_FALLBACK_PIN"
    fi
}

# The build's very last step: the completion marker; logs the time since $1 (a $SECONDS reading)
# and any further words.
mark_built() {
    local t0="$1"; shift
    printf 'lock=%s\nbuilt=%s\n' "$HASH" "$(date -Is)" >"$MARKER"
    log "venv ready in $((SECONDS - t0)) s$*"
}

# ensure_venv BUILD CODE WHAT [REUSE]: under the cache's flock (it serialises every run that shares
# this cache), run the function BUILD unless the venv's completion marker is there (else the
# function REUSE, when given), point the venv's editable install at this checkout, and fail unless
# the venv can run CODE (WHAT names it in the error).
ensure_venv() {
    local build="$1" code="$2" what="$3" reuse="${4:-}"
    {
        flock 9
        if [[ ! -f "$MARKER" ]]; then
            "$build"
        else
            log "reusing $VENV"
            [[ -z "$reuse" ]] || "$reuse"
        fi
        install_checkout
        check_import "$code" "$what"
    } 9>"$LOCKFILE"
}
