"""Trace round trips: requests JSONL and the Mooncake format."""

from __future__ import annotations

import json

import pytest

from contextpilot_engine.bench.methods import _Renderer, run_retrieval
from contextpilot_engine.bench.scenarios import memory_chat
from contextpilot_engine.bench.scoring import method_prompts
from contextpilot_engine.bench.simulator import simulate
from contextpilot_engine.bench.traces import load_mooncake, load_requests, mooncake_rows, save_mooncake, save_requests
from contextpilot_engine.bench.workloads import rag_batch


def test_requests_jsonl_round_trip(tmp_path):
    wl = memory_chat(n_conversations=2, sessions=(3, 4), seed=2)
    path = tmp_path / "memory.jsonl"
    save_requests(wl, path)
    back = load_requests(path)
    assert back.causal and back.name == "memory"
    key = lambda w: [(r.contexts, r.query, r.conversation, r.timestamp, r.output_tokens) for r in w.requests]  # noqa: E731
    assert key(back) == key(wl)
    count, count_back = wl.token_counter(), back.token_counter()
    assert all(count(t) == count_back(t) for r in wl.requests for t in r.contexts)


def test_requests_jsonl_rejects_bad_rows(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"query": "q", "contexts": "not a list"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_requests(path)
    path.write_text(json.dumps({"query": "q", "contexts": ["a"], "context_tokens": [1, 2]}) + "\n")
    with pytest.raises(ValueError, match="context_tokens"):
        load_requests(path)


def test_mooncake_hash_ids_name_shared_prefixes():
    rows = mooncake_rows([[("a", 600), ("b", 500)], [("a", 600), ("c", 100)], [("a", 400)]], block_tokens=512)
    assert [r["input_length"] for r in rows] == [1100, 700, 400]
    assert rows[0]["hash_ids"] == [0, 1, 2]  # ceil(1100 / 512) blocks, the last one partial
    assert rows[1]["hash_ids"][0] == 0 and rows[1]["hash_ids"][1] not in rows[0]["hash_ids"]
    assert rows[1]["hash_ids"] == [0, 3]
    assert rows[2]["hash_ids"] == [4]  # 400 tokens of "a": a partial block of its own, not block 0


def test_mooncake_round_trip_keeps_per_request_hits(tmp_path):
    wl = rag_batch(n_queries=40, top_k=6, n_chunks=60, seed=3)
    count = wl.token_counter()
    prompts = method_prompts(run_retrieval(wl, _Renderer(count)), count)
    path = tmp_path / "rag.mooncake.jsonl"
    save_mooncake(path, prompts, timestamps_ms=list(range(0, 4000, 100)))
    back = load_mooncake(path)
    assert len(back.requests) == 40 and back.causal
    assert back.requests[3].timestamp == pytest.approx(0.3)
    bcount = back.token_counter()
    imported = [[(t, bcount(t)) for t in r.contexts] for r in back.requests]
    assert [sum(t for _, t in p) for p in imported] == [sum(t for _, t in p) for p in prompts]
    original = simulate(prompts, page_size=512)
    replayed = simulate(imported, page_size=512)
    assert replayed.hits == original.hits and sum(original.hits) > 0
    # and the trace written back out is the same trace
    again = tmp_path / "again.jsonl"
    save_mooncake(again, imported, timestamps_ms=list(range(0, 4000, 100)))
    assert again.read_text() == path.read_text()


def test_mooncake_rejects_inconsistent_rows(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"timestamp": 0, "input_length": 2000, "output_length": 1, "hash_ids": [1, 2]}) + "\n")
    with pytest.raises(ValueError, match="does not fit"):
        load_mooncake(path)
