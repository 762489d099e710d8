#!/usr/bin/env bash
# Set up the pinned environment (cached after the first run), then run the main job:
# the same RAG requests through a real vLLM engine on a local tiny model, with and without contextpilot.
# Extra arguments go to `contextpilot demo` (see --help).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="$(bash scripts/setup_env.sh | tail -n 1)"
cd /  # import the installed package, not the checkout's folder
exec "$PY" -m contextpilot_engine.cli demo "$@"
