"""scripts/bench_real_engine.py without a server: what each run sends, and how usage is added up.

The script itself needs a vLLM server and minutes per run (it is run by
hand, see BENCHMARKS.md); here its request builders and its accounting are
checked on a small made-up workload, so a change that breaks them shows up
in the test suite.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from contextpilot_engine.bench.prompt_model import split_prompt
from contextpilot_engine.bench.workloads import Request, Workload

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_real_engine.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("bench_real_engine", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.fixture()
def workload() -> Workload:
    docs = [f"Chunk {i}: " + " ".join(f"w{i}x{j}" for j in range(30)) for i in range(8)]
    reqs = [Request([docs[(i + j) % 8] for j in range(4)], f"question {i}?") for i in range(10)]
    return Workload("made-up", reqs, {d: 40 for d in docs})


def test_library_runs_use_the_shared_layout_and_keep_every_block(script, workload):
    base = script.layout_requests(workload, [[0, 1, 2, 3]] * len(workload.requests))
    for req, r in zip(base, workload.requests):
        assert split_prompt(req.messages).blocks == r.contexts and not req.extra_body
    flipped = script.layout_requests(workload, [[3, 2, 1, 0]] * len(workload.requests))
    assert split_prompt(flipped[0].messages).blocks == workload.requests[0].contexts[::-1]
    batch = script.batch_requests(workload)
    assert len(batch) == len(workload.requests)
    sent = sorted(sorted(split_prompt(b.messages).blocks) for b in batch)
    assert sent == sorted(sorted(r.contexts) for r in workload.requests)


def test_plugin_runs_send_what_an_unaware_client_sends(script, workload):
    as_documents = script.plugin_requests(workload, "documents")
    system = as_documents[0].messages[0]["content"]
    assert system.count("<document>") == 4 and workload.requests[0].contexts[0] in system
    assert as_documents[0].messages[-1] == {"role": "user", "content": "question 0?"}
    as_contexts = script.plugin_requests(workload, "contexts")
    assert as_contexts[1].extra_body == {"contextpilot": {"contexts": workload.requests[1].contexts}}


def test_usage_is_summed_from_prompt_tokens_details(script):
    run = script.Run("plugin", "one at a time")
    for prompt, cached, report in ((100, 0, {"applied": True}), (120, 64, {"applied": False}), (90, 32, None)):
        usage = SimpleNamespace(prompt_tokens=prompt, prompt_tokens_details=SimpleNamespace(cached_tokens=cached))
        run.add(SimpleNamespace(usage=usage, model_extra={"contextpilot": report} if report else {}), 0.5)
    summary = run.summary()
    assert (run.prompt_tokens, run.cached_tokens, run.computed_tokens, run.applied) == (310, 96, 214, 1)
    assert summary["cached_share"] == pytest.approx(96 / 310) and summary["requests"] == 3


def test_groups_are_counted_from_the_reports_planned_with(script):
    run = script.Run("plugin burst", "burst")
    usage = SimpleNamespace(prompt_tokens=10, prompt_tokens_details=SimpleNamespace(cached_tokens=0))
    # a group of 3, one of 2, and one request that went through alone
    for planned_with in (2, 2, 1, 2, 1, 0):
        report = {"applied": True, "planned_with": planned_with} if planned_with else {"applied": True}
        run.add(SimpleNamespace(usage=usage, model_extra={"contextpilot": report}), 0.1)
    assert run.groups == {"planned_jointly": 5, "groups": 2, "largest_group": 3}
    summary = run.summary()
    assert summary["groups"] == 2 and "planned_with" not in summary
