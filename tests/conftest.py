"""Shared pytest fixtures."""

from __future__ import annotations

import importlib.util
import os

import pytest

# ---------------------------------------------------------------------------
# One temporary directory for the whole session (TMPDIR for this process and
# every engine or server it starts), removed at the end: the tests leave no
# file behind in the machine's temporary directory, whatever the engines put
# there (vLLM's IPC sockets, our channel's socket, server logs).

_SESSION_TMP: str | None = None


def pytest_configure(config) -> None:
    global _SESSION_TMP
    from contextpilot_engine.testing import foreign_code, isolate_tmpdir

    stray = foreign_code(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if stray:
        pytest.exit(stray, returncode=4)
    _SESSION_TMP = isolate_tmpdir("cp-tests-")


def pytest_unconfigure(config) -> None:
    from contextpilot_engine.testing import remove_tmpdir

    remove_tmpdir(_SESSION_TMP)


# ---------------------------------------------------------------------------
# vLLM engine fixtures (tests marked `engine`).
#
# vLLM is imported only inside these fixtures, after engine_env() has set the
# variables it reads at import, so collecting the suite stays fast and other
# tests never see those settings unless engine tests actually run.  Tests skip,
# with the reason, where vllm (or transformers/torch for the tiny model) cannot
# be imported; scripts/setup_env.sh builds a venv where they can.


def _skip_unless_importable(*modules: str) -> None:
    for name in modules:
        if importlib.util.find_spec(name) is None:
            _skip(f"{name} is not installed; run scripts/setup_env.sh and use its python")


def _skip(reason: str) -> None:
    """Skip, unless CONTEXTPILOT_REQUIRE_ENGINE=1 (CI, scripts/test.sh): there a missing engine is a failure."""
    if os.environ.get("CONTEXTPILOT_REQUIRE_ENGINE") == "1":
        pytest.fail(f"required engine component missing: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def vllm_ready() -> None:
    """Apply the engine environment and check that `from vllm import LLM` works."""
    _skip_unless_importable("vllm")
    from contextpilot_engine.bench.engine import engine_env

    engine_env()
    try:
        from vllm import LLM  # noqa: F401
    except Exception as exc:  # a broken install raises more than ImportError
        _skip(f"vllm is installed but not importable: {type(exc).__name__}: {exc}")


@pytest.fixture(scope="session")
def tiny_model_path(vllm_ready):
    """The ~0.8M-parameter random Llama model, built once into the shared cache."""
    _skip_unless_importable("torch", "transformers", "tokenizers")
    from contextpilot_engine.bench.tiny_model import cached_tiny_model

    return cached_tiny_model("tiny")


@pytest.fixture(scope="module")
def engine_llm(tiny_model_path):
    """One in-process vLLM engine over the tiny model (block 32, 1 GiB KV cache, prefix caching)."""
    from contextpilot_engine.bench.engine import close_llm, make_llm

    llm = make_llm(tiny_model_path)
    yield llm
    close_llm(llm)


@pytest.fixture(scope="session")
def triton_ready() -> None:
    """torch and triton importable (the Triton kernel then runs under TRITON_INTERPRET=1 on CPU)."""
    _skip_unless_importable("torch", "triton")
