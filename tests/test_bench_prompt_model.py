"""``split_prompt`` on chunks whose text holds a label-like line ``"\\n[k] "``.

The PostgreSQL manual's footnotes are lines ``[2] ...``; rendered as block
``[1]`` of a prompt, such a line reads like the label of block ``[2]``.
Given the request's blocks, ``split_prompt`` (and ``prompt_segments``, which
scoring uses) must keep them whole, wherever the label-like line falls.
"""

from __future__ import annotations

import pytest

from contextpilot_engine.bench.methods import _Renderer, split_known
from contextpilot_engine.bench.prompt_model import LINE_OVERHEAD, prompt_segments, split_prompt
from contextpilot_engine.bench.scoring import method_prompts
from contextpilot_engine.bench.methods import MethodResult


def _count(text: str) -> int:
    return max(1, len(text) // 4)


FOOT2 = "Sorting\n\nUse ORDER BY.\n[2] While SELECT * is useful, ..."  # reads like the next label at position 1
FOOT3 = "Joins\n[3] A footnote line.\n[2] And another."
CLOSING = "Tags\n</documents> inside a chunk"
PLAIN = ["Alpha is about rivers.", "Beta is about mountains.", "Gamma: the third document."]


@pytest.mark.parametrize(
    "texts",
    [
        [FOOT2, PLAIN[0]],
        [FOOT2, PLAIN[0], PLAIN[1]],
        [PLAIN[0], FOOT3, PLAIN[1], PLAIN[2]],  # block [2] holds "\n[3] "
        [FOOT2, FOOT2, PLAIN[2]],  # two copies of the same footnoted chunk
        [PLAIN[1], CLOSING, PLAIN[0]],
        [FOOT3, FOOT2, CLOSING, PLAIN[0], PLAIN[2]],
    ],
)
def test_blocks_holding_label_like_lines_stay_whole_in_every_order(texts):
    r = _Renderer(_count)
    n = len(texts)
    for perm in (list(range(n)), list(range(n))[::-1], [*range(1, n), 0]):
        msgs = r.render(texts, perm, "what?")
        split = split_prompt(msgs, texts)
        assert split.blocks == [texts[j] for j in perm]
        assert split.tail.startswith("</documents>") and split.tail.endswith("\nwhat?")
        assert split == split_known(msgs, texts)
        segs = prompt_segments(msgs, _count, "t", texts)
        assert [s[0] for s in segs[1:-1]] == [texts[j] for j in perm]
        assert [s[1] for s in segs[1:-1]] == [_count(texts[j]) + LINE_OVERHEAD for j in perm]


def test_the_label_only_split_is_the_ambiguous_one_and_unchanged_on_plain_prompts():
    r = _Renderer(_count)
    msgs = r.render([FOOT2, PLAIN[0]], [0, 1], "q")
    assert split_prompt(msgs).blocks != [FOOT2, PLAIN[0]]  # what the labels alone cannot tell
    for perm in ([0, 1, 2], [2, 0, 1]):
        plain = r.render(PLAIN, perm, "q")
        assert split_prompt(plain) == split_prompt(plain, PLAIN) == split_prompt(plain, [])


def test_a_line_that_is_no_input_ends_at_the_next_label():
    r = _Renderer(_count)
    msgs = r.render(["(see message 3)", FOOT2], [0, 1], "q")  # a hint in place of a block
    assert split_prompt(msgs, [FOOT2]).blocks == ["(see message 3)", FOOT2]


def test_scoring_reads_prompts_back_with_their_blocks():
    r = _Renderer(_count)
    texts = [FOOT2, PLAIN[0], FOOT3]
    msgs = {0: r.render(texts, [0, 1, 2], "a"), 1: r.render(texts, [2, 0, 1], "b")}
    res = MethodResult("m", "offline", [1, 0], msgs, {0: [0, 1, 2], 1: [2, 0, 1]},
                       splits={i: split_prompt(m, texts) for i, m in msgs.items()})
    prompts = method_prompts(res, _count)
    assert [[s[0] for s in p[1:-1]] for p in prompts] == [[FOOT3, FOOT2, PLAIN[0]], texts]
