"""Reading a method's prompt back with its own blocks, and scoring what was really sent.

Real documents hold lines that look like the layout's block labels (the
PostgreSQL manual's footnotes start ``[2] ...``); the label-only splitter cuts
such a block in two, which mis-scores the prompt and made ``ours online``'s
bookkeeping fail on a real trace.  :func:`split_known` must keep them whole
and agree with the label-only splitter everywhere else.
"""

from __future__ import annotations

from contextpilot_engine.bench.methods import _Renderer, run_ours_offline, run_ours_online, run_retrieval, split_known
from contextpilot_engine.bench.prompt_model import split_prompt
from contextpilot_engine.bench.workloads import Request, Workload

FOOTNOTED = "Sorting\n\nUse ORDER BY to sort.\n\n[2] While SELECT * is useful for off-the-cuff queries, ..."
PLAIN = ["Alpha is about rivers.", "Beta is about mountains.", "Gamma: the third document."]


def _count(text: str) -> int:
    return max(1, len(text) // 4)


def test_a_block_holding_a_label_like_line_stays_whole():
    r = _Renderer(_count)
    msgs = r.render([FOOTNOTED, PLAIN[0]], [0, 1], "q")  # block [1] holds a line "[2] ..."
    assert split_prompt(msgs).blocks != [FOOTNOTED, PLAIN[0]], "the label-only split cuts it (the case guarded)"
    known = split_known(msgs, [FOOTNOTED, PLAIN[0]])
    assert known.blocks == [FOOTNOTED, PLAIN[0]]
    assert known.tail == split_prompt(r.render(PLAIN[:2], [0, 1], "q")).tail  # the same ranking note and query
    assert known.preamble == split_prompt(msgs).preamble


def test_it_agrees_with_the_label_split_on_ordinary_prompts_and_counts_copies():
    r = _Renderer(_count)
    texts = [PLAIN[2], PLAIN[0], PLAIN[2], PLAIN[1]]  # a block twice: each copy is used once
    for perm in ([0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2]):
        msgs = r.render(texts, perm, "q")
        assert split_known(msgs, texts) == split_prompt(msgs)


def test_a_block_that_is_not_an_input_is_read_up_to_the_next_label():
    r = _Renderer(_count)
    msgs = r.render(["(see message 3)", PLAIN[1]], [0, 1], "q")  # a hint in place of a block
    assert split_known(msgs, PLAIN) == split_prompt(msgs)


def test_methods_keep_footnoted_blocks_whole_and_conserve_them():
    docs = [FOOTNOTED, *PLAIN, "Delta [1] inline, not at a line start.", "Epsilon\n[3] another footnote line."]
    reqs = [Request([docs[j % 6] for j in range(i, i + 4)], f"question {i}") for i in range(12)]
    wl = Workload("footnotes", reqs, {d: _count(d) for d in docs})
    count = wl.token_counter()
    for result in (run_retrieval(wl, _Renderer(count)), run_ours_offline(wl, count), run_ours_online(wl, count, None)):
        assert result.conserved(), result.name
        for i, req in enumerate(wl.requests):
            assert sorted(result.splits[i].blocks) == sorted(req.contexts), (result.name, i)
        assert all(len(p) == 4 + 2 for p in result.prompts(count))  # preamble, four blocks, tail
