"""The reference driver and its scoring, against a fake ``contextpilot`` package.

The fake behaves like the reference where it matters here: it treats a
context as a set (dropping repeated blocks) and its online path fails after
a few calls, as the real one does once a tree level passes 1,000 children.
"""

from __future__ import annotations

import os
import stat
import sys
import textwrap

import pytest

from contextpilot_engine.bench.methods import _Renderer, run_reference_offline, run_reference_online
from contextpilot_engine.bench.reference import ReferenceRunner, ReferenceUnavailable, find_reference_python
from contextpilot_engine.bench.scoring import conservation
from contextpilot_engine.bench.workloads import Request, Workload

FAKE = '''
class ContextPilot:
    def __init__(self, use_gpu=False):
        self.calls = 0

    def reorder(self, contexts, conversation_id=None):
        self.calls += 1
        if self.calls > 3 and len(contexts) == 1:
            raise AttributeError("Can't pickle local object 'compute_distances_batch.<locals>.worker'")
        order = list(range(len(contexts)))[::-1]
        out = [list(dict.fromkeys(reversed(contexts[j]))) for j in order]  # sets: repeats vanish
        print("banner that must not reach the driver's output")
        return out, order
'''


@pytest.fixture()
def fake_runner(tmp_path):
    pkg = tmp_path / "site" / "contextpilot" / "server"
    pkg.mkdir(parents=True)
    (tmp_path / "site" / "contextpilot" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "live_index.py").write_text(textwrap.dedent(FAKE))
    wrapper = tmp_path / "python"
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH="{tmp_path / "site"}" exec "{sys.executable}" "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    return ReferenceRunner(str(wrapper), timeout=120)


def _workload():
    reqs = [
        Request(["spec", "doc a", "out 1", "out 1"], "q0"),
        Request(["spec", "doc a", "out 2"], "q1"),
        Request(["spec", "doc b", "out 2", "out 3"], "q2"),
        Request(["spec", "doc b", "out 3", "out 4"], "q3"),
        Request(["spec", "doc a", "out 4", "out 4", "out 4"], "q4"),
    ]
    tokens = {t: 10 + len(t) for r in reqs for t in r.contexts}
    return Workload("toy", reqs, tokens)


def test_offline_drops_are_detected_and_scored_honestly(fake_runner):
    wl = _workload()
    res = run_reference_offline(wl, _Renderer(wl.token_counter()), fake_runner)
    c = conservation(res, wl)
    assert not c["conserved"] and c["dropped_blocks"] == 3 and c["requests_with_drops"] == 2
    assert c["bookkeeping_errors"] == 0
    assert res.order == [4, 3, 2, 1, 0]
    # scoring re-appends what it dropped: every prompt still holds every block
    for i, r in enumerate(wl.requests):
        body = res.messages[i][0]["content"]
        assert sum(body.count(f"] {t}\n") for t in set(r.contexts)) == len(r.contexts)


def test_online_crash_is_reported_not_raised(fake_runner):
    wl = _workload()
    res = run_reference_online(wl, _Renderer(wl.token_counter()), fake_runner)
    assert res.crashed_after == 3
    assert "crashed after 3 requests" in res.note and "pickle" in res.error
    assert len(res.latencies) == 3
    assert res.served[4] == [0, 1, 2, 3, 4]  # never served: scored in retrieval order


def test_locating_the_reference(monkeypatch, tmp_path):
    monkeypatch.setenv("CONTEXTPILOT_REF_PYTHON", str(tmp_path / "nope"))
    python, why = find_reference_python()
    assert python is None and "CONTEXTPILOT_REF_PYTHON" in why
    monkeypatch.delenv("CONTEXTPILOT_REF_PYTHON")
    monkeypatch.setenv("CONTEXTPILOT_CACHE", str(tmp_path))
    python, why = find_reference_python()
    assert python is None and "setup_reference.sh" in why
    with pytest.raises(ReferenceUnavailable):
        ReferenceRunner.locate()


def test_a_broken_reference_gives_a_clear_error(tmp_path):
    bad = tmp_path / "python"
    bad.write_text(f'#!/bin/sh\nexec "{sys.executable}" -c "import sys; sys.exit(3)"\n')
    bad.chmod(bad.stat().st_mode | stat.S_IEXEC)
    with pytest.raises(ReferenceUnavailable, match="exit 3"):
        ReferenceRunner(str(bad)).offline([[1, 2]])
    assert os.path.exists(bad)


@pytest.fixture(scope="module")
def real_runner():
    """The real reference ContextPilot 0.5.0 (scripts/test.sh builds its venv; elsewhere it may be absent)."""
    try:
        return ReferenceRunner.locate()
    except ReferenceUnavailable as exc:
        from conftest import _skip

        _skip(f"reference ContextPilot not installed: {exc}")


def test_real_reference_drops_repeats_and_we_report_it(real_runner):
    """The weakness we measure against, on the real package: repeated blocks vanish from its output.

    The pattern is the reference's own "5 memories x 10 repeats" setting.
    """
    five, seven = [f"memory {i}" for i in range(5)], [f"memory {i}" for i in range(7)]
    reqs = [Request(five * 10, "q0"), Request(seven * 3, "q1"), Request(five * 10, "q2")]
    wl = Workload("repeats", reqs, {t: 20 for t in seven})
    res = run_reference_offline(wl, _Renderer(wl.token_counter()), real_runner)
    c = conservation(res, wl)
    assert c["bookkeeping_errors"] == 0
    assert sorted(res.order) == [0, 1, 2]
    assert not c["conserved"] and c["dropped_blocks"] > 0
    # ours, on the same batch, keeps every block as many times as it came in
    from contextpilot_engine import ContextPilot

    ours, _ = ContextPilot(use_gpu=False).reorder([r.contexts for r in reqs])
    assert sorted(map(sorted, ours)) == sorted(sorted(r.contexts) for r in reqs)
