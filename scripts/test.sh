#!/usr/bin/env bash
# Run the whole test suite in the pinned environments (built and cached on first use): the core, the
# vLLM plugin and the benchmark harness in the vLLM CPU environment (with the reference ContextPilot
# 0.5.0 in a venv of its own for the benchmark comparisons), then the Ray Serve router's application
# test in the Ray environment (the engine's lock plus requirements/ray.lock: two vLLM replicas under a
# local Ray, a few minutes), then the SGLang plugin's tests in the SGLang environment. Extra arguments
# go to every pytest run, e.g.  bash scripts/test.sh -k dedup
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="$(bash scripts/setup_env.sh | tail -n 1)"
REF_PY="$(bash scripts/setup_reference.sh | tail -n 1)"
SGL_PY="$(bash scripts/setup_sglang.sh | tail -n 1)"
RAY_PY="$(bash scripts/setup_ray.sh | tail -n 1)"
export CONTEXTPILOT_REF_PYTHON="$REF_PY"
# Engine, Triton and reference tests must run here, never silently skip.
export CONTEXTPILOT_REQUIRE_ENGINE=1

# pytest exits 5 when a -k/-m filter selects nothing in one of the suites: not a failure here.
run() { "$@" || { rc=$?; [[ $rc -eq 5 ]] || exit $rc; }; }
run "$PY" -m pytest -q tests --ignore=tests/test_ray_router.py "$@"
run "$RAY_PY" -m pytest -q tests/test_ray_router.py "$@"
run "$SGL_PY" -m pytest -q tests_sglang "$@"
