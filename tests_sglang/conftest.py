"""The SGLang adapter's tests, run with the SGLang environment (``scripts/setup_sglang.sh``).

SGLang's server needs a CUDA GPU or an AMX CPU; this machine has neither,
and the GPU machine sometimes lent has no SGLang.  So no test serves through
a real SGLang server; instead they run SGLang's own code around the model
runner on the CPU: ``UnifiedRadixCache`` on real memory pools (both tree
cores), ``SchedulePolicy``, ``ServerArgs`` and ``OpenAIServingChat``'s
request conversion, with the plugin loaded by SGLang's real plugin loader.
What stands in for the scheduler (inserting a served prompt's pages as a
finished request's checkpoint does) is ``contextpilot_engine.sglang_plugin.testing``.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

_SESSION_TMP: str | None = None


def pytest_configure(config) -> None:
    global _SESSION_TMP
    from contextpilot_engine.testing import foreign_code, isolate_tmpdir

    stray = foreign_code(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "contextpilot_engine.sglang_plugin")
    if stray:
        pytest.exit(stray, returncode=4)
    _SESSION_TMP = isolate_tmpdir("cp-sgl-tests-")


def pytest_unconfigure(config) -> None:
    from contextpilot_engine.testing import remove_tmpdir

    remove_tmpdir(_SESSION_TMP)


def _skip(reason: str) -> None:
    if os.environ.get("CONTEXTPILOT_REQUIRE_ENGINE") == "1":
        pytest.fail(f"required engine component missing: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def sglang_plugins():
    """SGLang importable, and its plugin loader run (which registers and applies contextpilot's hooks)."""
    if importlib.util.find_spec("sglang") is None:
        _skip("sglang is not installed; run scripts/setup_sglang.sh and use its python")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from sglang.srt.plugins import load_plugins

    load_plugins()
    from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

    assert hasattr(UnifiedRadixCache.insert, "__wrapped__"), "contextpilot's hooks were not applied"
    return True


@pytest.fixture(scope="session")
def tiny_model_dir(sglang_plugins) -> str:
    from contextpilot_engine.bench.tiny_model import cached_tiny_model

    return str(cached_tiny_model("tiny"))


@pytest.fixture
def published(sglang_plugins):
    """Publish server arguments with contextpilot on (``options``) and return a function to republish."""
    from contextpilot_engine.sglang_plugin.testing import publish_server_args

    def publish(role: str = "scheduler", **options):
        return publish_server_args(role, _contextpilot=options)

    return publish
