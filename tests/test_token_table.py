"""One byte-length table per tokenizer object, shared by every state that uses it.

The tokenizer is the tiny model's real byte-level BPE tokenizer (Hugging Face
``transformers``), loaded twice to have two distinct objects.
"""

from __future__ import annotations

import pytest

from contextpilot_engine.integration.binding import TokenByteTable
from contextpilot_engine.integration.options import PluginOptions
from contextpilot_engine.integration.state import EngineState

pytestmark = pytest.mark.engine


@pytest.fixture()
def load_tokenizer(tiny_model_path):
    from transformers import AutoTokenizer

    return lambda: AutoTokenizer.from_pretrained(str(tiny_model_path))


def test_states_over_one_tokenizer_share_one_table(load_tokenizer):
    tok = load_tokenizer()
    a = EngineState("share-a", PluginOptions(), page_size=16)
    b = EngineState("share-b", PluginOptions(), page_size=16)
    a.pilot_for(tok)
    b.pilot_for(tok)
    assert a.token_table is not None
    assert a.token_table is b.token_table


def test_another_tokenizer_object_gets_its_own_equal_table(load_tokenizer):
    first, second = load_tokenizer(), load_tokenizer()
    t1, t2 = TokenByteTable.shared(first), TokenByteTable.shared(second)
    assert t1 is not t2
    assert t1.pieces == t2.pieces


def test_a_grown_vocabulary_is_rebuilt(load_tokenizer):
    tok = load_tokenizer()
    before = TokenByteTable.shared(tok)
    tok.add_tokens(["<cp-marker-added>"], special_tokens=True)
    after = TokenByteTable.shared(tok)
    assert after is not before
    assert len(after.lengths) == len(before.lengths) + 1
    assert after.pieces[-1] == b"<cp-marker-added>"
    ids = tok("x <cp-marker-added> y")["input_ids"]
    assert after.decode(ids) == tok.decode(ids)


class _WordPieceLike:
    """A vocabulary whose tokens are not byte strings, and which takes no weak reference."""

    __slots__ = ("calls",)

    def __init__(self) -> None:
        self.calls = 0

    def __len__(self) -> int:
        return 3

    def convert_ids_to_tokens(self, ids):
        self.calls += 1
        return ["hello", "##wörld", "[CLS]\u0100\u2603"][: len(ids)]


def test_no_table_is_remembered_for_an_object_without_weak_references():
    tok = _WordPieceLike()
    assert TokenByteTable.shared(tok) is None
    assert TokenByteTable.shared(tok) is None
    assert tok.calls == 1
