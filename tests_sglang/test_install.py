"""Installing the package with the ``sglang`` extra into SGLang's environment changes nothing else there."""

from __future__ import annotations

import os
import sys

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def test_installing_with_the_sglang_extra_leaves_sglang_and_torch_alone(sglang_plugins, tmp_path):
    from contextpilot_engine.testing import pip_would_install

    assert pip_would_install(sys.executable, f"{REPO}[sglang]", str(tmp_path)) == ["contextpilot-engine"]
