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
