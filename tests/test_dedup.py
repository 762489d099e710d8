"""Conversation deduplication and content-defined chunking."""

import random

import pytest

from contextpilot_engine import ContextPilot
from contextpilot_engine.chunking import chunk_text

LONG_DOC = " ".join(f"word{i}" for i in range(800))


def test_repeats_become_hints_that_never_contain_the_text():
    pilot = ContextPilot()
    first = "The first memory says something long enough to be worth a hint. " * 4
    second = "Another memory, also long enough to deduplicate profitably here. " * 4
    r1, r2 = pilot.deduplicate([[first, second], [second, "brand new memory", first]], conversation_id="c")
    assert r1["overlapping_docs"] == [] and r1["new_docs"] == [first, second] and r1["turn"] == 1
    assert r2["new_docs"] == ["brand new memory"]
    assert r2["overlapping_docs"] == [second, first]
    assert len(r2["reference_hints"]) == 2
    for hint in r2["reference_hints"]:
        assert first[:30] not in hint and second[:30] not in hint
    assert "turn 1" in r2["reference_hints"][0] and "[2]" in r2["reference_hints"][0]
    assert r2["deduplicated_docs"][1] == "brand new memory"
    assert r2["deduplicated_docs"][0] == r2["reference_hints"][0]
    assert r2["tokens_saved"] > 0


def test_hint_names_the_callers_id_and_template_is_configurable():
    pilot = ContextPilot()
    doc = {"id": "mem-9", "text": "a memory that is long enough to replace with a hint " * 3}
    pilot.deduplicate([[doc]], conversation_id="c")
    (r,) = pilot.deduplicate([[doc]], conversation_id="c", hint_template="<see {doc_id} @ turn {turn}>")
    assert r["reference_hints"] == ["<see mem-9 @ turn 1>"]


def test_short_blocks_are_resent_rather_than_hinted():
    pilot = ContextPilot()
    pilot.deduplicate([["tiny"]], conversation_id="c")
    (r,) = pilot.deduplicate([["tiny"]], conversation_id="c")
    assert r["new_docs"] == ["tiny"] and r["reference_hints"] == []


def test_partial_repeats_of_long_blocks_are_caught():
    pilot = ContextPilot()
    pilot.deduplicate([[LONG_DOC]], conversation_id="agent")
    edited = LONG_DOC.replace("word400 ", "CHANGED ") + " appended tail"
    (r,) = pilot.deduplicate([[edited]], conversation_id="agent")
    assert r["overlapping_docs"] == []
    (sent,) = r["new_docs"]
    assert "CHANGED" in sent and "appended tail" in sent
    assert "identical to turn 1" in sent
    assert len(sent) < len(edited) / 2
    assert r["tokens_saved"] > 0


def test_conversations_and_tenants_are_separate():
    pilot = ContextPilot()
    doc = "shared memory text that is long enough to be deduplicated " * 3
    pilot.deduplicate([[doc]], conversation_id="c1", tenant="alice")
    (other_conv,) = pilot.deduplicate([[doc]], conversation_id="c2", tenant="alice")
    (other_tenant,) = pilot.deduplicate([[doc]], conversation_id="c1", tenant="bob")
    assert other_conv["overlapping_docs"] == [] and other_tenant["overlapping_docs"] == []
    assert pilot.conversation_turns("c1", tenant="alice") == 1
    pilot.end_conversation("c1", tenant="alice")
    with pytest.raises(ValueError, match="c1"):
        pilot.conversation_turns("c1", tenant="alice")


def test_optimize_with_conversation_dedups_and_reports():
    pilot = ContextPilot()
    doc_a = "first document text long enough for a hint to pay off " * 3
    doc_b = "second document text long enough for a hint to pay off " * 3
    pilot.optimize([doc_a, doc_b], "q1", conversation_id="chat")
    messages, report = pilot.optimize_with_report([doc_b, "new doc"], "q2", conversation_id="chat")
    system = messages[0]["content"]
    assert doc_b not in system and "new doc" in system
    assert report["blocks_deduplicated"] == 1 and report["tokens_saved_by_dedup"] > 0
    assert system.index("</documents>") < system.index("already provided")


def test_conversation_memory_is_bounded():
    pilot = ContextPilot(max_conversations=3, max_conversation_entries=10)
    for c in range(10):
        pilot.deduplicate([[f"doc {c} {j}" for j in range(30)]], conversation_id=f"c{c}")
    assert len(pilot.conversations) == 3
    conv = pilot.conversations.get("default", "c9")
    assert len(conv.blocks) + len(conv.chunks) <= 10


def test_chunks_reassemble_exactly_and_are_content_defined():
    rng = random.Random(0)
    words = [f"w{rng.randrange(500)}" for _ in range(3000)]
    text = " ".join(words) + "\n  trailing  spaces \n"
    chunks = chunk_text(text, 48)
    assert "".join(c.text for c in chunks) == text
    assert all(c.words <= 48 * 4 for c in chunks)
    edited = text.replace(words[1500], "EDITED", 1)
    before = [c.key for c in chunks]
    after = [c.key for c in chunk_text(edited, 48)]
    common = len(set(before) & set(after))
    assert common >= len(before) - 3  # an edit only disturbs the chunks around it
