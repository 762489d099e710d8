"""The ``contextpilot`` command: a value out of range is argparse's one-line error naming the flag, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from contextpilot_engine import arg_types


@pytest.mark.parametrize("argv, flag, words", [
    (["serve", "--backend", "http://x", "--port", "99999"], "--port", "from 0 to 65535"),
    (["serve", "--backend", "http://x", "--backend-timeout", "0"], "--backend-timeout", "> 0"),
    (["serve", "--backend", "http://x", "--data-parallel-size", "0"], "--data-parallel-size", ">= 1"),
    (["bench", "--pages", "16,0"], "--pages", ">= 1"),
    (["bench", "--seed", "-1"], "--seed", ">= 0"),
    (["bench", "--capacity", "1.5"], "--capacity", "(0, 1]"),
    (["bench", "--trace", "/nonexistent/trace.jsonl"], "--trace", "no such file"),
    (["demo", "--requests", "0"], "--requests", ">= 1"),
    (["demo", "--top-k", "x"], "--top-k", "expected an integer"),
])
def test_a_bad_value_is_a_one_line_error_naming_the_flag(argv, flag, words):
    out = subprocess.run([sys.executable, "-m", "contextpilot_engine.cli", *argv], capture_output=True, text=True,
                         timeout=120, cwd="/")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"argument {flag}" in out.stderr and words in out.stderr


def test_the_types_accept_what_they_should():
    assert arg_types.int_at_least(1)("100_000") == 100_000
    assert arg_types.int_list(1)("1, 16,32") == [1, 16, 32]
    assert arg_types.share("0.25") == 0.25 and arg_types.port("0") == 0
    assert arg_types.non_negative_float("0") == 0.0  # --settle-ms 0: do not wait for the event stream
