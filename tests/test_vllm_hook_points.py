"""The plugin's hook points are the installed vLLM's, and the release checker says so.

``scripts/check_vllm_signatures.py`` reads a vLLM release's sources (a wheel
or a directory) without importing it; here it runs on the vLLM this
environment has installed, where every hook point must match.  A changed
signature is also recognised (a copied source with one parameter renamed).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.engine

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts", "check_vllm_signatures.py")


@pytest.fixture(scope="module")
def site_packages(vllm_ready) -> str:
    spec = importlib.util.find_spec("vllm")
    return os.path.dirname(list(spec.submodule_search_locations)[0])


def check(release: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, release], capture_output=True, text=True, timeout=120)


def test_every_hook_point_matches_the_installed_vllm(site_packages):
    out = check(site_packages)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("ok   ") == len(out.stdout.splitlines()) >= 16


def test_a_changed_signature_is_reported(site_packages, tmp_path):
    rel = os.path.join("vllm", "v1", "core", "block_pool.py")
    os.makedirs(tmp_path / os.path.dirname(rel))
    source = open(os.path.join(site_packages, rel)).read()
    changed = source.replace("def reset_prefix_cache(self)", "def reset_prefix_cache(self, block_mask=None)", 1)
    assert changed != source
    (tmp_path / rel).write_text(changed)
    for mod in ("vllm/engine", "vllm/renderers", "vllm/entrypoints", "vllm/v1/core/sched"):
        shutil.copytree(os.path.join(site_packages, mod), tmp_path / mod, dirs_exist_ok=True)
    out = check(str(tmp_path))
    assert out.returncode == 1
    assert "FAIL vllm.v1.core.block_pool.BlockPool.reset_prefix_cache: differs" in out.stdout
