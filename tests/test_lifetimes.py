"""How long blocks stay in a conversation, and the order that follows from it."""

import pytest

from contextpilot_engine import ContextPilot
from contextpilot_engine.lifetimes import MAX_RUN, MIN_OBSERVATIONS, RunLengthOdds, advance_runs


def test_odds_need_enough_evidence_and_a_majority_of_departures():
    odds = RunLengthOdds()
    for _ in range(MIN_OBSERVATIONS - 1):
        odds.observe(3, stayed=False)
    assert not odds.likely_to_leave(3), "too few observations to predict"
    odds.observe(3, stayed=False)
    assert odds.likely_to_leave(3)
    for _ in range(MIN_OBSERVATIONS):
        odds.observe(3, stayed=True)
    assert not odds.likely_to_leave(3), "as many stayed as left"
    for _ in range(MIN_OBSERVATIONS):
        odds.observe(MAX_RUN + 5, stayed=False)
    assert odds.likely_to_leave(MAX_RUN) and odds.likely_to_leave(10 * MAX_RUN), "long runs share a counter"


def test_runs_advance_and_every_previous_block_is_one_observation():
    odds = RunLengthOdds()
    runs = advance_runs({}, [1, 2], odds)
    assert runs == {1: 1, 2: 1}
    runs = advance_runs(runs, [2, 3, 3], odds)
    assert runs == {2: 2, 3: 1}
    assert odds.stayed[1] == 1 and odds.ended[1] == 1


def _window_turns(n_turns: int, history: int = 3):
    """An agent-style conversation: every turn resends the last ``history`` tool outputs plus a new one."""
    outputs = [f"tool output {t}: " + " ".join(f"line{t}x{j}" for j in range(60 + 7 * t)) for t in range(n_turns)]
    return [outputs[max(0, t - history) : t + 1] for t in range(n_turns)]


def _served_hits(pilot: ContextPilot, turns, conversation_id):
    hits = []
    for t, docs in enumerate(turns):
        _, report = pilot.optimize_with_report(docs, f"step {t}", conversation_id=conversation_id)
        hits.append(report["expected_cached_tokens"])
    return hits


def test_block_about_to_leave_goes_last_and_the_next_turn_reuses_more():
    turns = _window_turns(40)
    pilot = ContextPilot(deduplicate=False)
    with_conv = _served_hits(pilot, turns, "agent-1")
    without = _served_hits(ContextPilot(deduplicate=False), turns, None)
    # after a few turns the odds are learnt: the output in its fourth turn is predicted to leave
    next_turn = pilot.parse_docs(turns[-1][1:] + ["next output"])
    plan = pilot.conversations.check("default", "agent-1", next_turn, len, deduplicate=False)
    assert plan.leaving == {0}, "the oldest output, in its fourth turn in a row, should be predicted to leave"
    assert sum(with_conv[10:]) > 1.3 * sum(without[10:]), (sum(with_conv[10:]), sum(without[10:]))


def test_deduplicate_off_resends_blocks_but_keeps_the_conversation():
    doc = "a document long enough that a hint would replace it " * 4
    pilot = ContextPilot(deduplicate=False)
    pilot.optimize([doc, "first"], "q1", conversation_id="c")
    messages, report = pilot.optimize_with_report([doc, "second"], "q2", conversation_id="c")
    assert doc.strip() in messages[0]["content"] and report["blocks_deduplicated"] == 0
    assert pilot.conversation_turns("c") == 2


def test_forgetting_a_tenant_forgets_its_odds():
    pilot = ContextPilot(deduplicate=False)
    for t, docs in enumerate(_window_turns(20)):
        pilot.optimize(docs, f"step {t}", conversation_id="c", tenant="alice")
    assert "alice" in pilot.conversations._odds
    pilot.reset(tenant="alice")
    assert "alice" not in pilot.conversations._odds


def test_deduplicate_option_must_be_a_bool():
    with pytest.raises(ValueError, match="deduplicate"):
        ContextPilot(deduplicate="no")
