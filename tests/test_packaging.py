"""Packaging: installed names, entry points, and a core that imports no engine.

These run the installed package in a fresh interpreter started outside the
checkout, where a stray top-level module would show up.
"""

import os
import shutil
import subprocess
import sys

import pytest


def run_outside(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd="/", env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_no_top_level_kernels_module_is_installed():
    out = run_outside(
        "import importlib.util, contextpilot_engine.kernels as k\n"
        "print(importlib.util.find_spec('kernels') is None, k.__name__)"
    )
    assert out.split() == ["True", "contextpilot_engine.kernels"]


def test_the_core_imports_no_engine_and_no_gpu_stack():
    out = run_outside(
        "import sys, contextpilot_engine as cp\n"
        "cp.ContextPilot().optimize(['a', 'b'], 'q')\n"
        "print(sorted(m for m in ('vllm', 'sglang', 'torch', 'triton') if m in sys.modules))"
    )
    assert out.strip() == "[]"


def test_entry_points_are_registered():
    out = run_outside(
        "from importlib.metadata import entry_points\n"
        "print([e.value for e in entry_points(group='vllm.general_plugins') if e.name == 'contextpilot'])\n"
        "print([e.value for e in entry_points(group='console_scripts') if e.name == 'contextpilot'])"
    )
    plugins, scripts = out.strip().splitlines()
    assert "contextpilot_engine.vllm_plugin:register" in plugins
    assert "contextpilot_engine.cli:main" in scripts


def test_console_script_runs():
    exe = shutil.which("contextpilot", path=os.path.dirname(sys.executable))
    if exe is None:
        pytest.skip("the contextpilot console script is not installed next to this interpreter")
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip()
