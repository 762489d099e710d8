"""Bad input gets a clear error naming the argument and index, and never changes any state."""

import copy

import pytest

from contextpilot_engine import ContextPilot, UnknownIdError


def warmed_pilot() -> ContextPilot:
    pilot = ContextPilot(use_gpu=False, capacity_tokens=10_000)
    pilot.optimize(["doc a", "doc b", "doc c"], "q1", conversation_id="conv")
    pilot.optimize_batch([["doc a", "doc d"], ["doc d", "doc e"]], ["q2", "q3"])
    pilot.deduplicate([["doc a", "doc z"]], conversation_id="conv2")
    return pilot


def state(pilot: ContextPilot):
    convs = {k: (v.turns, dict(v.blocks), dict(v.chunks)) for k, v in pilot.conversations._convs.items()}
    return copy.deepcopy(pilot.index.snapshot()), convs


CALLS = [
    # (method, args, kwargs, exception, words that must appear in the message)
    ("optimize", (None, "q"), {}, TypeError, "docs"),
    ("optimize", ([], "q"), {}, ValueError, "docs"),
    ("optimize", (["ok", 7], "q"), {}, TypeError, "docs[1]"),
    ("optimize", (["ok", ""], "q"), {}, ValueError, "docs[1]"),
    ("optimize", ("just a string", "q"), {}, TypeError, "docs"),
    ("optimize", (["ok"], None), {}, TypeError, "query"),
    ("optimize", (["ok"], "  "), {}, ValueError, "query"),
    ("optimize", (["ok"], "q"), {"conversation_id": 5}, TypeError, "conversation_id"),
    ("optimize", (["ok"], "q"), {"tenant": ""}, ValueError, "tenant"),
    ("optimize", (["ok"], "q"), {"system_instruction": 3}, TypeError, "system_instruction"),
    ("optimize", (["x"] * 5000, "q"), {}, ValueError, "limit"),
    ("optimize_batch", ([["a"], ["b"]], ["q"]), {}, ValueError, "all_queries has 1 entries but all_docs has 2"),
    ("optimize_batch", ([["a"], None], ["q", "r"]), {}, TypeError, "all_docs[1]"),
    ("optimize_batch", ([["a"], []], ["q", "r"]), {}, ValueError, "all_docs[1]"),
    ("optimize_batch", ([["a"], ["b", {"text": 1}]], ["q", "r"]), {}, TypeError, "all_docs[1][1]['text']"),
    ("optimize_batch", ([["a"], ["b"]], ["q", 5]), {}, TypeError, "all_queries[1]"),
    ("optimize_batch", ([["a"], ["b"]], "qr"), {}, TypeError, "all_queries"),
    ("optimize_batch", ([], []), {}, ValueError, "all_docs"),
    ("optimize_batch", (["a", "b"], ["q", "r"]), {}, TypeError, "all_docs[0]"),
    ("reorder", ([["a", "b"], ["c", None]],), {}, TypeError, "contexts[1][1]"),
    ("reorder", ([["a"]], -1), {}, ValueError, "initial_tokens_per_context"),
    ("reorder", ([["a"]], 0, 12), {}, TypeError, "conversation_id"),
    ("deduplicate", ([["a", 3.5]], "c"), {}, TypeError, "contexts[0][1]"),
    ("deduplicate", ([["a"]], None), {}, TypeError, "conversation_id"),
    ("deduplicate", ([["a"]], "c", "{nope}"), {}, ValueError, "hint_template"),
    ("reorder", ([["\u00e9", "\ud800 lone surrogate"]],), {}, ValueError, "contexts[0][1]: the text is not valid Unicode"),
    ("optimize", (["ok", "fine", "bad \udfff"], "q"), {"conversation_id": "conv"}, ValueError, "docs[2]"),
    ("end_conversation", ("never-seen",), {}, UnknownIdError, "never-seen"),
    ("conversation_turns", ("never-seen",), {}, UnknownIdError, "never-seen"),
]


@pytest.mark.parametrize("method, args, kwargs, exc, words", CALLS)
def test_rejected_call_names_the_problem_and_changes_nothing(method, args, kwargs, exc, words):
    pilot = warmed_pilot()
    before = state(pilot)
    with pytest.raises(exc) as err:
        getattr(pilot, method)(*args, **kwargs)
    assert words in str(err.value)
    assert state(pilot) == before


def test_unknown_conversation_is_a_value_error():
    assert issubclass(UnknownIdError, ValueError)


def test_bad_constructor_options():
    with pytest.raises(ValueError, match="capacity_tokens"):
        ContextPilot(capacity_tokens=0)
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\): unknown option\(s\) \['no_such_option'\]; "
                       r"known options: \[.*'capacity_tokens'"):
        ContextPilot(no_such_option=1)
    with pytest.raises(TypeError, match="use_gpu"):
        ContextPilot(use_gpu="yes")
    with pytest.raises(ValueError, match="strategies"):
        ContextPilot(strategies=("magic",))
    with pytest.raises(ValueError, match="hint_template"):
        ContextPilot(hint_template="{unknown_field}")
    with pytest.raises(ValueError, match="popularity_decay"):
        ContextPilot(popularity_decay=0)


def test_bad_constructor_options_that_would_fail_later_calls():
    with pytest.raises(ValueError, match=r"chunk_target_words: expected an int >= 4, got 2"):
        ContextPilot(chunk_target_words=2)
    with pytest.raises(ValueError, match=r"copy_hint_template: .*'where'"):
        ContextPilot(copy_hint_template="(as above: {words} words)")  # a block hint has no word count
    with pytest.raises(ValueError, match=r"copy_chunk_hint_template"):
        ContextPilot(copy_chunk_hint_template="(see {doc_id})")  # a chunk run has no document id
    pilot = ContextPilot(copy_hint_template="[{doc_id} is in {where}, {hash}]",
                         copy_chunk_hint_template="[{words} words are in {where}]")
    text = "The same passage appears twice in this prompt, once as a document. " * 3
    out = pilot.optimize([text, "another document"], "q", conversation_id="c",
                         messages=[{"role": "user", "content": text}])
    assert "is in message 2" in out[0]["content"]  # the accepted template formats


def test_a_token_count_past_32_bits_is_refused_by_name():
    pilot = ContextPilot(tokenizer=lambda text: 2**31 if "huge" in text else 1)
    with pytest.raises(ValueError, match=r"docs\[1\]: the token counter returned 2147483648"):
        pilot.optimize(["fine", "huge block"], "q")
    many = ContextPilot(tokenizer=lambda text: 2**30)
    with pytest.raises(ValueError, match=r"docs: 3221225472 tokens in one context is more than the limit"):
        many.optimize(["a", "b", "c"], "q")


def test_serve_checks_parsed_requests_before_serving_any():
    from contextpilot_engine.request_pipeline import PendingRequest

    pilot = warmed_pilot()
    before = state(pilot)
    good = PendingRequest(pilot.parse_docs(["doc a", "doc q"]), "q", conversation_id="conv")
    with pytest.raises(TypeError, match=r"requests\[1\]\.blocks\[0\]: expected Block"):
        pilot.serve_group([good, PendingRequest(["doc a"], "q")])
    with pytest.raises(TypeError, match=r"requests\[1\]\.query: expected str"):
        pilot.serve_group([good, PendingRequest(pilot.parse_docs(["doc b"]), None)])
    with pytest.raises(TypeError, match=r"^query: expected str"):
        pilot.serve(pilot.parse_docs(["doc b"]), None)
    assert state(pilot) == before


def test_reset_keeps_a_shared_index_and_forgets_its_tenants():
    from contextpilot_engine.index import ContextIndex

    shared = ContextIndex()
    shared.attach_engine(16)  # an engine's mirror feeds it
    pilot = ContextPilot(index=shared)
    pilot.optimize(["doc a", "doc b"], "q")
    assert shared.tenant_names()
    pilot.reset()
    assert pilot.index is shared and shared.page_size == 16
    assert not list(shared.tenant_names())
