#!/usr/bin/env bash
# Run the whole test suite in the pinned engine environment (built and cached on first use), with
# the reference ContextPilot 0.5.0 in a venv of its own for the benchmark comparisons.
# Extra arguments go to pytest, e.g.  bash scripts/test.sh -k dedup
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="$(bash scripts/setup_env.sh | tail -n 1)"
REF_PY="$(bash scripts/setup_reference.sh | tail -n 1)"
export CONTEXTPILOT_REF_PYTHON="$REF_PY"
# Engine, Triton and reference tests must run here, never silently skip.
export CONTEXTPILOT_REQUIRE_ENGINE=1
exec "$PY" -m pytest -q "$@"
