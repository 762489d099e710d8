"""scripts/bench_plan_headroom.py on a small synthetic batch: the search only ever keeps non-worsening moves."""

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_plan_headroom.py"


def test_headroom_search_never_loses_reuse_and_its_total_matches_the_tree():
    # the script asserts that its running total equals the reuse of the tree it rebuilt from the
    # final orders; a rejected move that left the tree changed would fail that check or this one
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--workload", "rag-top20", "--smoke", "--seconds", "2", "--neighbourhood", "6"],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout
    before = int(re.search(r"shares ([\d,]+) tokens", out.splitlines()[0]).group(1).replace(",", ""))
    last = out.strip().splitlines()[-1]
    after = int(re.search(r"shares ([\d,]+) tokens", last).group(1).replace(",", ""))
    moves = int(re.search(r"search: ([\d,]+) moves", last).group(1).replace(",", ""))
    assert before > 0 and moves > 0
    assert after >= before
