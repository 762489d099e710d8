#!/usr/bin/env bash
# Prepare the SGLang 0.5.23 plugin-development venv (CPU only) and print its python as the last line of
# stdout.
#
#   PY="$(bash scripts/setup_sglang.sh | tail -n 1)"
#   "$PY" -m pytest -q tests/...
#
# Same scheme as scripts/setup_env.sh (read its header for the reasons):
# * the venv is keyed by the hash of requirements/sglang.lock and lives under
#   ${CONTEXTPILOT_CACHE:-$HOME/.cache/contextpilot-engine}/sglang-venv-<hash>;
# * the lock is a complete pinned set installed with --no-deps (sglang's own metadata would pull the
#   CUDA serving stack and a second torch);
# * a marker file is written last, so an interrupted build is deleted and rebuilt; a flock serialises
#   concurrent runs; pip's output goes to a log, progress to stderr.
# Specific to SGLang:
# * triton is not installed (~1 GB); SGLang hard-imports it but runs no kernel on CPU. This script
#   writes a stand-in into site-packages on every run (a .pth line plus a ~100-line module that builds
#   the mock modules of sglang/_platform_stubs.py), so a change to the stub below needs no rebuild.
#   Its finder is appended to sys.meta_path, so a real triton would still take precedence.
# * The first (cold) build also compiles SGLang's native page-hash extension, which the Python tree
#   core needs and torch builds on first use (see warm_native_hash).
# * torch 2.14.1 is the CUDA build (the only one of that version); it runs on CPU, but importing it
#   needs the nvidia-* libraries the lock pins (about 3 GB of the venv).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOCK="$REPO_ROOT/requirements/sglang.lock"
TAG=setup_sglang
# shellcheck source=lib/cached_venv.sh
source "$REPO_ROOT/scripts/lib/cached_venv.sh"

cached_venv_paths "$LOCK" sglang-venv
# The lock pins cp311 wheels (sglang 0.5.23 and torch 2.14.1 are used as cp311 builds here).
require_python_311 requirements/sglang.lock
grep -qi '^setuptools==' "$LOCK" || die "$LOCK must pin setuptools (needed by --no-build-isolation)"

build_venv() {
    local t0=$SECONDS
    install_lock "$LOCK"
    install_triton_stub
    warm_native_hash
    mark_built "$t0" " ($(du -sh "$VENV" | cut -f1))"
}

# SGLang's Python tree core hashes KV pages with a C++ extension that torch JIT-compiles on first use
# (sglang/srt/mem_cache/cpp_utils/native_hash.py: g++, ninja and OpenSSL headers; ~10 s; cached in
# ~/.cache/torch_extensions). Build it once here so tests do not pay for it; the Rust tree core (the
# default) does not need it, so a failure is only a warning.
warm_native_hash() {
    local t0=$SECONDS
    printf '\n### %s: warm hicache_hash_cpp\n' "$(date -Is)" >>"$LOGFILE"
    if (cd / && "$PY" -c 'from sglang.srt.mem_cache.cpp_utils.native_hash import _load_native_hash_module as f; f()' \
        >>"$LOGFILE" 2>&1); then
        log "native page-hash extension ready ($((SECONDS - t0)) s)"
    else
        log "WARNING: could not build sglang's native page-hash extension (needs g++, ninja, libssl-dev);" \
            "the python tree core (SGLANG_UNIFIED_RADIX_TREE_CORE_BACKEND=python) will fail to hash. See $LOGFILE"
    fi
}

# Write the triton stand-in (module + .pth) into the venv's site-packages.
install_triton_stub() {
    local site
    site="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    write_triton_stub >"$site/_contextpilot_triton_stub.py.tmp"
    mv -f "$site/_contextpilot_triton_stub.py.tmp" "$site/_contextpilot_triton_stub.py"
    printf 'import _contextpilot_triton_stub\n' >"$site/_contextpilot_triton_stub.pth"
}

write_triton_stub() {
    cat <<'PYEOF'
"""Stand-in for the `triton` package in the CPU-only SGLang venv of contextpilot-engine.

Written by scripts/setup_sglang.sh (with a one-line .pth that imports it); not part of any wheel.
SGLang hard-imports triton (sglang/srt/utils/common.py) but never launches a kernel on CPU, and
the real wheel is ~1 GB. The finder sits at the END of sys.meta_path, so a real triton, if one is
ever installed, still wins. The mock objects come from SGLang's own macOS stub,
sglang/_platform_stubs.py, loaded by file path without importing the sglang package (loading it imports torch;
its install_platform_stubs() only acts on
darwin/arm64 with MPS and would also patch torch.mps / Tensor.to, which is not wanted here).
"""
import importlib.abc
import importlib.machinery
import importlib.util
import sys

_STUBS = None


def _platform_stubs():
    global _STUBS
    if _STUBS is None:
        spec = importlib.machinery.PathFinder.find_spec("sglang")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("triton stub: sglang is not installed")
        path = list(spec.submodule_search_locations)[0] + "/_platform_stubs.py"
        sspec = importlib.util.spec_from_file_location("_contextpilot_sglang_platform_stubs", path)
        mod = importlib.util.module_from_spec(sspec)
        sys.modules[sspec.name] = mod  # dataclasses needs it registered while executing
        sspec.loader.exec_module(mod)
        _STUBS = mod
    return _STUBS


def _build_triton():
    """Same module tree as _platform_stubs.install_platform_stubs() builds for triton."""
    s = _platform_stubs()
    mk = s._make_mock
    triton = mk("triton")
    triton.__version__ = "3.0.0"
    triton.cdiv, triton.next_power_of_2, triton.Config = s._cdiv, s._next_power_of_2, s._Config
    tl = mk("triton.language")

    class constexpr:
        def __init__(self, value=None):
            self.value = value

    tl.constexpr = constexpr
    triton.language = tl
    tl.extra = mk("triton.language.extra")
    tl.extra.libdevice = mk("triton.language.extra.libdevice")
    runtime = triton.runtime = mk("triton.runtime")
    jit = runtime.jit = mk("triton.runtime.jit")
    jit.JITFunction = type("JITFunction", (), {})
    jit.KernelInterface = type("KernelInterface", (s._StubBase,), {})
    cache = runtime.cache = mk("triton.runtime.cache")
    cache.triton_key = s._triton_key
    autotuner = runtime.autotuner = mk("triton.runtime.autotuner")
    autotuner.OutOfResources = type("OutOfResources", (Exception,), {})
    autotuner.PTXASError = type("PTXASError", (Exception,), {})
    compiler = triton.compiler = mk("triton.compiler")
    compiler.CompiledKernel = type("CompiledKernel", (s._StubBase,), {})
    cimpl = compiler.compiler = mk("triton.compiler.compiler")
    cimpl.ASTSource = type("ASTSource", (s._StubBase,), {})
    cimpl.triton_key = s._triton_key
    runtime.driver = mk("triton.runtime.driver")
    triton.testing = mk("triton.testing")
    tools = triton.tools = mk("triton.tools")
    tools.tensor_descriptor = mk("triton.tools.tensor_descriptor")
    backends = triton.backends = mk("triton.backends")
    backends.compiler = mk("triton.backends.compiler")
    backends.compiler.GPUTarget = type("GPUTarget", (s._StubBase,), {})
    triton.__contextpilot_stub__ = True
    return triton


class _TritonStubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == "triton" or fullname.startswith("triton."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        if spec.name == "triton":
            return sys.modules.get("triton") or _build_triton()
        if spec.name in sys.modules:
            return sys.modules[spec.name]
        if "triton" not in sys.modules:
            _build_triton()
        return sys.modules.get(spec.name) or _platform_stubs()._MockModule(spec.name)

    def exec_module(self, module):
        pass


if not any(isinstance(f, _TritonStubFinder) for f in sys.meta_path):
    sys.meta_path.append(_TritonStubFinder())
PYEOF
}

# Modules a plugin and its tests need; checked after every (re)use of the venv.
IMPORTS='import torch, triton, transformers, tokenizers, numpy, xxhash, pytest, hypothesis, pytest_timeout
import sglang
assert sglang.__version__ == "0.5.23", sglang.__version__
assert getattr(triton, "__contextpilot_stub__", False) or hasattr(triton, "__file__")
import sglang.srt.mem_cache.unified_radix_cache, sglang.srt.mem_cache.memory_pool
import sglang.srt.mem_cache.allocator, sglang.srt.mem_cache.common
import sglang.srt.managers.schedule_policy, sglang.srt.server_args, sglang.srt.plugins
from sglang.srt.entrypoints.openai.serving_chat import OpenAIServingChat
from transformers import PreTrainedTokenizerFast
import contextpilot_engine'

ensure_venv build_venv "$IMPORTS" "sglang 0.5.23 cache/scheduler/server-args/plugin/chat modules and contextpilot_engine" \
    install_triton_stub

log "ok"
printf '%s\n' "$PY" >&3
