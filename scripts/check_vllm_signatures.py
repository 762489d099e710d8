#!/usr/bin/env python
"""Check the plugin's hook points against a vLLM release, without installing it.

Reads the Python sources of a vLLM wheel (or an unpacked tree) and compares
the parameters of every method the plugin wraps with the signature its
wrapper expects (``vllm_plugin/hook_points.py``).  Prints one line per hook
point and exits 1 if a required one does not match.

    pip download --no-deps vllm==0.33.0 -d /tmp/w
    PY=$(bash scripts/setup_env.sh | tail -n 1)
    $PY scripts/check_vllm_signatures.py /tmp/w/vllm-0.33.0-*.whl

It needs contextpilot-engine importable (the hook list), not the vLLM it checks.
"""

from __future__ import annotations

import ast
import os
import sys
import zipfile


def _source(release: str, module: str) -> str | None:
    rel = module.replace(".", "/") + ".py"
    if os.path.isdir(release):
        path = os.path.join(release, rel)
        return open(path).read() if os.path.exists(path) else None
    with zipfile.ZipFile(release) as wheel:
        try:
            return wheel.read(rel).decode()
        except KeyError:
            return None


def _params(source: str, owner: str, method: str) -> list[str] | None:
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and node.name == owner:
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name == method:
                    a = item.args
                    return [x.arg for x in a.posonlyargs + a.args] + [x.arg for x in a.kwonlyargs]
    return None


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    from contextpilot_engine.integration.hook_points import matches
    from contextpilot_engine.vllm_plugin.hook_points import HOOK_POINTS

    failed = 0
    for point in HOOK_POINTS:
        source = _source(argv[0], point.module)
        params = _params(source, point.owner, point.method) if source is not None else None
        if params is None:
            status = "missing"
        else:
            status = "ok" if matches(point, params) else f"differs: {params}"
        required = not point.optional
        if status != "ok" and required:
            failed += 1
        print(f"{'ok  ' if status == 'ok' else ('FAIL' if required else 'warn')} {point.path}: {status}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
