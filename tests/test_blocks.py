"""Blocks: content identity, token weights, pluggable counters."""

import pytest

from contextpilot_engine.blocks import Block, block_key, estimate_tokens, make_block, tokenizer_counter


def test_identity_is_the_content_hash():
    a = make_block("same text", estimate_tokens, "x")
    b = make_block({"id": "doc-7", "text": "same text"}, estimate_tokens, "y")
    c = make_block("other text", estimate_tokens, "z")
    assert a.key == b.key == block_key("same text")
    assert a.key != c.key
    assert b.label == "doc-7" and a.label is None
    assert b.source == {"id": "doc-7", "text": "same text"}
    assert a.key.bit_length() <= 128 and len(a.short_id) == 16


def test_weight_comes_from_the_counter():
    assert make_block("x" * 400, estimate_tokens, "w").tokens == 100
    assert make_block("abc", lambda t: 42, "w").tokens == 42
    assert make_block("abc", lambda t: 0, "w").tokens == 1  # never weightless


def test_tokenizer_counter_uses_encode_without_special_tokens():
    class Tok:
        def __init__(self):
            self.calls = []

        def encode(self, text, add_special_tokens=True):
            self.calls.append(add_special_tokens)
            return list(range(len(text.split()) + (1 if add_special_tokens else 0)))

    tok = Tok()
    count = tokenizer_counter(tok)
    assert count("one two three") == 3
    assert tok.calls == [False]


@pytest.mark.parametrize(
    "item, exc, words",
    [
        (None, TypeError, "got NoneType"),
        (5, TypeError, "got int"),
        (["a"], TypeError, "got list"),
        ("", ValueError, "empty"),
        ("   ", ValueError, "empty"),
        ({"id": 1}, ValueError, "'text'"),
        ({"text": 3}, TypeError, "['text']"),
        ({"text": "ok", "id": 1.5}, TypeError, "['id']"),
    ],
)
def test_bad_blocks_name_the_element(item, exc, words):
    with pytest.raises(exc) as err:
        make_block(item, estimate_tokens, "docs[3]")
    assert "docs[3]" in str(err.value) and words in str(err.value)


def test_bad_counter_output_is_reported():
    with pytest.raises(ValueError, match="token counter returned"):
        make_block("abc", lambda t: -1, "docs[0]")
    with pytest.raises(ValueError, match="token counter returned"):
        make_block("abc", lambda t: "3", "docs[0]")


def test_blocks_compare_by_identity():
    a = make_block("t", estimate_tokens, "a")
    b = make_block("t", estimate_tokens, "b")
    assert isinstance(a, Block) and a != b and a.key == b.key
