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
        "import contextpilot_engine.integration, contextpilot_engine.integration.rewriting\n"
        "cp.ContextPilot().optimize(['a', 'b'], 'q')\n"
        "print(sorted(m for m in ('vllm', 'sglang', 'torch', 'triton') if m in sys.modules))"
    )
    assert out.strip() == "[]"


def test_entry_points_are_registered():
    out = run_outside(
        "from importlib.metadata import entry_points\n"
        "print([e.value for e in entry_points(group='vllm.general_plugins') if e.name == 'contextpilot'])\n"
        "print([e.value for e in entry_points(group='sglang.srt.plugins') if e.name == 'contextpilot'])\n"
        "print([e.value for e in entry_points(group='console_scripts') if e.name == 'contextpilot'])"
    )
    plugins, sglang_plugins, scripts = out.strip().splitlines()
    assert "contextpilot_engine.vllm_plugin:register" in plugins
    assert "contextpilot_engine.sglang_plugin:register" in sglang_plugins
    assert "contextpilot_engine.cli:main" in scripts


def test_console_script_runs():
    exe = shutil.which("contextpilot", path=os.path.dirname(sys.executable))
    if exe is None:
        pytest.skip("the contextpilot console script is not installed next to this interpreter")
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip()


def test_layers_import_only_downwards():
    """The core and the integration layer import no adapter; adapters never import each other."""
    import ast
    import pathlib

    root = pathlib.Path(__file__).resolve().parent.parent
    rules = {
        "contextpilot_engine": ("vllm", "sglang", "contextpilot_engine.vllm_plugin", "contextpilot_engine.sglang_plugin"),
        "vllm_plugin": ("sglang", "contextpilot_engine.sglang_plugin"),
        "sglang_plugin": ("vllm", "contextpilot_engine.vllm_plugin"),
    }
    for folder, banned in rules.items():
        for path in (root / folder).rglob("*.py"):
            if folder == "contextpilot_engine" and "bench" in path.parts:
                continue  # the benchmark harness drives engines on purpose
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    names = [node.module]
                for name in names:
                    assert not any(name == b or name.startswith(b + ".") for b in banned), f"{path}: imports {name}"
