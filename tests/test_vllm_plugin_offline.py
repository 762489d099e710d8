"""The plugin through the offline ``LLM`` API on the real engine (in-process engine core).

* hit ratio on a RAG trace from the benchmark generators: the same chat
  messages (documents as ``<document>`` elements in the system message, in
  retrieval order) through an engine without the plugin and one with
  ``additional_config={"contextpilot": {}}``; the engine's own counters must
  show clearly more cached prompt tokens with the plugin;
* the ``additional_config`` path and the message-field convention: blocks are
  reordered, a conversation's repeated blocks are replaced by hints, and
  ``vllm_plugin.reports`` says what was done;
* fail-open on the request side (a core function made to raise) and on the
  engine side (the mirror's key function made to raise): requests are served
  unmodified and the engine keeps serving.

Engines are built one after another (an in-process engine's shutdown breaks
any other open one, see ``contextpilot_engine.bench.engine``).
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.engine

BLOCK = 32


def rag_trace(n: int = 40):
    from contextpilot_engine.bench.workloads import materialise, rag_batch

    return materialise(
        rag_batch(n_queries=n, top_k=6, n_chunks=30, n_topics=4, min_tokens=60, max_tokens=160, seed=3)
    )


def document_messages(docs, query):
    """What a RAG client sends without knowing about the plugin: documents in retrieval order."""
    system = "You answer from the documents.\n" + "".join(f"<document>{d}</document>\n" for d in docs)
    return [{"role": "system", "content": system}, {"role": "user", "content": query}]


def test_plugin_raises_the_cached_token_ratio_on_a_rag_trace(tiny_model_path):
    from contextpilot_engine.bench.engine import close_llm, make_llm, prefill_timed, prefix_cache_counters

    wl = rag_trace()
    conversations = [document_messages(r.contexts, r.query) for r in wl.requests]
    ratios = {}
    for name, extra in (("without", {}), ("with", {"additional_config": {"contextpilot": {}}})):
        llm = make_llm(tiny_model_path, **extra)
        try:
            results = prefill_timed(llm, conversations)
            counters = prefix_cache_counters(llm)
        finally:
            close_llm(llm)
        prompt = sum(r.prompt_tokens for r in results)
        cached = sum(r.cached_tokens for r in results)
        assert counters["hits"] == cached  # the per-request numbers are the engine's counters
        ratios[name] = cached / prompt
    assert ratios["with"] > ratios["without"] + 0.15, ratios
    assert ratios["with"] > 1.5 * ratios["without"], ratios


@pytest.fixture(scope="module")
def plugin_llm(tiny_model_path):
    from contextpilot_engine.bench.engine import close_llm, make_llm

    llm = make_llm(tiny_model_path, additional_config={"contextpilot": {"tenant": "offline"}})
    yield llm
    close_llm(llm)


DOCS = [f"Document {i}: " + " ".join(f"w{i}x{j}" for j in range(50)) for i in range(6)]


def chat(llm, messages):
    from contextpilot_engine.bench.engine import prefill_timed

    (result,) = prefill_timed(llm, [messages])
    return result


def prompt_ids(llm, messages):
    from vllm import SamplingParams

    (out,) = llm.chat([messages], SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
    return list(out.prompt_token_ids)


def with_field(docs, query, **spec):
    return [{"role": "user", "content": query, "contextpilot": {"contexts": list(docs), **spec}}]


def test_additional_config_reorders_and_reports(plugin_llm):
    from contextpilot_engine import vllm_plugin

    state = vllm_plugin.engine_state(plugin_llm)
    assert state is not None and state.options.pilot.tenant == "offline"
    plugin_llm.reset_prefix_cache()
    first = chat(plugin_llm, with_field([DOCS[0], DOCS[1], DOCS[2], DOCS[3]], "first?"))
    second = chat(plugin_llm, with_field([DOCS[3], DOCS[2], DOCS[1], DOCS[0]], "second?"))
    r1, r2 = vllm_plugin.reports(plugin_llm)[-2:]
    assert r1["applied"] and r1["source"] == "explicit" and r1["tenant"] == "offline" and r1["bound"]
    assert r2["expected_cached_tokens"] > 0  # the index saw the first prompt's pages in the engine
    assert r2["blocks_moved"] > 0  # retrieval order reversed, prompt order kept
    assert second.cached_tokens >= r2["expected_cached_tokens"]
    assert second.cached_tokens > 4 * BLOCK
    assert first.cached_tokens < second.cached_tokens


def test_conversation_dedup_points_only_at_copies_in_the_prompt(plugin_llm):
    """A block is replaced only where the messages served still hold its text (here: a tool output)."""
    from contextpilot_engine import vllm_plugin
    from contextpilot_engine.integration.reports import REPORT_KEYS

    tok = plugin_llm.get_tokenizer()
    turn1 = with_field(DOCS[:3], "turn one?", conversation_id="conv-1")
    first = prompt_ids(plugin_llm, turn1)
    assert all(d in tok.decode(first) for d in DOCS[:3])
    # Turn two resends nothing of turn one: every block again, in full.
    second = prompt_ids(plugin_llm, with_field(DOCS[1:4], "turn two?", conversation_id="conv-1"))
    report = vllm_plugin.reports(plugin_llm)[-1]
    assert report["turn"] == 2 and report["blocks_deduplicated"] == 0
    assert all(d in tok.decode(second) for d in DOCS[1:4])
    # Turn three carries a tool output holding DOCS[4] and DOCS[5]: those become hints to it.
    history = [
        {"role": "user", "content": "run the tool"},
        {"role": "assistant", "content": "running"},
        {"role": "tool", "content": "result:\n" + DOCS[4] + "\n" + DOCS[5]},
        {"role": "user", "content": "turn three?", "contextpilot": {"contexts": DOCS[3:6], "conversation_id": "conv-1"}},
    ]
    third = tok.decode(prompt_ids(plugin_llm, history))
    report = vllm_plugin.reports(plugin_llm)[-1]
    assert report["blocks_deduplicated"] == 2 and report["tokens_saved_by_dedup"] > 0
    assert set(report) == set(REPORT_KEYS) and report["order"] == [0]
    assert "message 4 (tool)" in third  # the served prompt is [system, user, assistant, tool, user]
    assert all(third.count(d) == 1 for d in DOCS[3:6])  # every document once: no text hidden, none twice


def test_request_can_opt_out(plugin_llm):
    raw = [{"role": "system", "content": "<document>alpha</document><document>beta</document>"},
           {"role": "user", "content": "q"}]
    opted_out = [dict(raw[0], contextpilot={"enabled": False}), raw[1]]
    rewritten = prompt_ids(plugin_llm, raw)
    unchanged = prompt_ids(plugin_llm, opted_out)
    tok = plugin_llm.get_tokenizer()
    assert "<document>alpha</document>" in tok.decode(unchanged)
    assert "<document>" not in tok.decode(rewritten)  # implicit documents lifted into the layout


def test_malformed_message_field_is_a_clear_error(plugin_llm):
    bad = [{"role": "user", "content": "q", "contextpilot": {"contexts": [""]}}]
    with pytest.raises(ValueError, match=r"messages\[0\]\.contextpilot\.contexts\[0\]: block text is empty"):
        prompt_ids(plugin_llm, bad)
    with pytest.raises(ValueError, match="unknown field"):
        prompt_ids(plugin_llm, [{"role": "user", "content": "q", "contextpilot": {"docs": ["x"]}}])


def test_request_side_failure_serves_the_request_unmodified(plugin_llm, monkeypatch):
    from contextpilot_engine import vllm_plugin
    from contextpilot_engine import pilot as pilot_module
    from contextpilot_engine.integration.failopen import failure_counts

    messages = [{"role": "system", "content": "".join(f"<document>{d}</document>" for d in DOCS[:3])},
                {"role": "user", "content": "q"}]
    unmodified = prompt_ids(plugin_llm, [dict(messages[0], contextpilot={"enabled": False}), messages[1]])
    before = failure_counts().get("rewrite_error", 0)

    def broken(*args, **kwargs):
        raise RuntimeError("injected failure")

    # the request pipeline's two entries (alone, or planned with the requests that arrived with it)
    monkeypatch.setattr(pilot_module, "serve_request", broken)
    monkeypatch.setattr(pilot_module, "serve_group", broken)
    served = prompt_ids(plugin_llm, messages)
    assert served == unmodified
    assert failure_counts()["rewrite_error"] == before + 1
    assert vllm_plugin.reports(plugin_llm)[-1]["applied"] is False
    # Explicit contexts exist only in the field: failing open keeps them, in the order given.
    explicit = prompt_ids(plugin_llm, with_field([DOCS[2], DOCS[0]], "q"))
    text = plugin_llm.get_tokenizer().decode(explicit)
    assert text.index(DOCS[2]) < text.index(DOCS[0])
    assert "Importance ranking" not in text
    monkeypatch.undo()
    # The engine and the plugin keep working.
    rewritten = prompt_ids(plugin_llm, messages)
    assert rewritten != unmodified
    assert vllm_plugin.reports(plugin_llm)[-1]["applied"] is True


def test_rewritten_prompt_rejected_by_vllm_is_retried_as_sent(plugin_llm, monkeypatch):
    """Our rewrite must not turn a request that fits into one vLLM refuses."""
    from contextpilot_engine import vllm_plugin
    from contextpilot_engine.prompts import PromptLayout
    from contextpilot_engine.integration.failopen import failure_counts

    state = vllm_plugin.engine_state(plugin_llm)
    tok = plugin_llm.get_tokenizer()
    doc = "lantern quartz meadow " * 40
    n_docs = 1
    while len(tok.encode(doc * (n_docs + 1))) < 3600:
        n_docs += 1
    messages = [{"role": "system", "content": "".join(f"<document>{i} {doc}</document>" for i in range(n_docs))},
                {"role": "user", "content": "q"}]
    unmodified = prompt_ids(plugin_llm, [dict(messages[0], contextpilot={"enabled": False}), messages[1]])
    assert len(unmodified) < 4096
    # A long fixed instruction pushes the rewritten prompt over max_model_len (4096).
    monkeypatch.setattr(state.pilot, "layout", PromptLayout("Be careful. " * 400))
    before = failure_counts().get("rewrite_rejected", 0)
    assert prompt_ids(plugin_llm, messages) == unmodified
    assert failure_counts()["rewrite_rejected"] == before + 1


# Keep last in this module: it switches this engine's mirror off.
def test_engine_side_failure_keeps_the_engine_serving(plugin_llm, monkeypatch):
    from contextpilot_engine import vllm_plugin
    from contextpilot_engine.bench.engine import prefill
    from contextpilot_engine.vllm_plugin import block_pool as mirror_module
    from contextpilot_engine.integration.failopen import failure_counts

    state = vllm_plugin.engine_state(plugin_llm)
    assert state.mirror.enabled
    plugin_llm.reset_prefix_cache()

    def broken(*args, **kwargs):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(mirror_module, "chain_page_keys", broken)
    prompt = list(range(100, 100 + 6 * BLOCK + 3))
    cold, warm = prefill(plugin_llm, [prompt, prompt])
    assert (cold, warm) == (0, 6 * BLOCK)  # vLLM's own caching is unaffected
    assert not state.mirror.enabled and state.index.cached_pages() == {}
    assert failure_counts().get("mirror_error", 0) >= 1
    # Requests are still rewritten (popularity order only) and served.
    result = chat(plugin_llm, with_field(DOCS[:2], "still serving?"))
    assert result.prompt_tokens > 2 * 50
