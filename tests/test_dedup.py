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


def test_optimize_never_hides_a_document_the_prompt_does_not_hold():
    """Without the conversation's messages there is no copy in the prompt: every block is sent in full."""
    pilot = ContextPilot()
    doc_a = "first document text long enough for a hint to pay off " * 3
    doc_b = "second document text long enough for a hint to pay off " * 3
    pilot.optimize([doc_a, doc_b], "q1", conversation_id="chat")
    messages, report = pilot.optimize_with_report([doc_b, "new doc"], "q2", conversation_id="chat")
    system = messages[0]["content"]
    assert doc_b in system and "new doc" in system
    assert report["blocks_deduplicated"] == 0 and report["tokens_saved_by_dedup"] == 0


def test_optimize_with_messages_hints_at_the_copy_in_the_prompt():
    pilot = ContextPilot()
    doc_a = "first document text long enough for a hint to pay off " * 3
    doc_b = "second document text long enough for a hint to pay off " * 3
    history = [{"role": "user", "content": "look at this"}, {"role": "tool", "content": "output:\n" + doc_b}]
    messages, report = pilot.optimize_with_report(
        [doc_b, doc_a], "q2", conversation_id="chat", messages=history
    )
    assert [m["role"] for m in messages] == ["system", "user", "tool", "user"]
    assert messages[1:3] == history and messages[-1]["content"] == "q2"
    system = messages[0]["content"]
    assert doc_a in system and doc_b not in system
    assert report["blocks_deduplicated"] == 1 and report["tokens_saved_by_dedup"] > 0 and report["order"] == [1]
    assert "message 3 (tool)" in system and system.index("</documents>") < system.index("message 3 (tool)")
    # every document's text is somewhere in the prompt served
    served = "".join(m["content"] for m in messages)
    assert doc_a in served and doc_b in served
    # without a conversation id, or with deduplicate off, nothing is replaced
    _, plain = pilot.optimize_with_report([doc_b, doc_a], "q3", messages=history)
    off = ContextPilot(deduplicate=False).optimize_with_report([doc_b], "q", conversation_id="c", messages=history)[1]
    assert plain["blocks_deduplicated"] == 0 and off["blocks_deduplicated"] == 0


def test_a_block_in_the_cached_prefix_is_never_replaced():
    """Replacing a cached block would break the prefix the engine reuses; it stays, in full."""
    pilot = ContextPilot()
    doc_a = "first document text long enough for a hint to pay off " * 3
    doc_b = "second document text long enough for a hint to pay off " * 3
    first = pilot.optimize([doc_a, doc_b], "q1", conversation_id="chat")
    history = [{"role": "assistant", "content": doc_a + doc_b}]
    messages, report = pilot.optimize_with_report([doc_b, doc_a], "q2", conversation_id="chat", messages=history)
    assert report["blocks_deduplicated"] == 0 and report["expected_cached_tokens"] > 0
    assert messages[0]["content"].split("</documents>")[0] == first[0]["content"].split("</documents>")[0]


def test_long_block_runs_present_in_the_prompt_are_replaced_chunk_by_chunk():
    pilot = ContextPilot(chunk_min_tokens=64)
    words = " ".join(f"log{i} line{i % 7}" for i in range(400))
    shown = words[: len(words) // 2]
    history = [{"role": "tool", "content": shown}]
    messages, report = pilot.optimize_with_report([words], "q", conversation_id="c", messages=history)
    system = messages[0]["content"]
    assert report["blocks_deduplicated"] == 0 and report["tokens_saved_by_dedup"] > 0
    assert "words identical to message 2 (tool)" in system
    assert words[-200:] in system  # the part the prompt does not hold elsewhere is sent


def test_optimize_messages_are_validated():
    pilot = ContextPilot()
    with pytest.raises(TypeError, match=r"messages\[0\]"):
        pilot.optimize(["d"], "q", messages=["not a dict"])
    with pytest.raises(ValueError, match=r"messages\[0\]: 'role'"):
        pilot.optimize(["d"], "q", messages=[{"content": "x"}])


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
