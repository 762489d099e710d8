"""A multi-turn RAG chat on the real engine: no turn ever loses a document, and none loses cache hits.

Every turn resends the conversation so far (user and assistant messages) and
a system message with that turn's documents as ``<document>`` elements, the
way an ordinary RAG chat client does; the conversation id rides in a
``contextpilot`` message field (offline ``LLM.chat``).  The same messages go
to a plain engine (the field removed) and, afterwards, to an engine with the
plugin.  For every turn the served token ids are decoded: each document's
text must be in the prompt, and the plugin's engine must have found at least
as many cached tokens as the plain one.  Engines are built one after the
other (see ``contextpilot_engine.bench.engine.close_llm``).
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.engine

DOCS = {name: f"Document {name}: " + " ".join(f"{name.lower()}{j}x{j % 7}" for j in range(70))
        for name in ("Alpha", "Beta", "Gamma", "Delta")}
#: the documents retrieved for each turn, in retrieval order
TURNS = [
    (["Alpha", "Beta", "Gamma"], "What does Alpha say?"),
    (["Alpha", "Beta", "Gamma"], "And Beta?"),  # same documents: a follow-up question
    (["Gamma", "Delta", "Alpha"], "Compare Gamma and Delta."),  # retrieval changed
]


def system_message(names):
    return {"role": "system", "content": "Answer from the documents.\n"
            + "".join(f'<document id="{n}">{DOCS[n]}</document>\n' for n in names)}


def run_chat(llm, with_field: bool):
    """The three turns; per turn (cached tokens, decoded prompt)."""
    from vllm import SamplingParams

    tok = llm.get_tokenizer()
    history: list[dict] = []
    out = []
    for names, question in TURNS:
        user = {"role": "user", "content": question}
        if with_field:
            user["contextpilot"] = {"conversation_id": "rag-chat"}
        messages = [system_message(names), *history, user]
        (result,) = llm.chat([messages], SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)
        out.append((int(result.num_cached_tokens or 0), tok.decode(result.prompt_token_ids)))
        history += [{"role": "user", "content": question}, {"role": "assistant", "content": result.outputs[0].text}]
    return out


def test_every_turn_holds_every_document_and_caches_at_least_as_much_as_plain_vllm(tiny_model_path):
    from contextpilot_engine import vllm_plugin
    from contextpilot_engine.bench.engine import close_llm, make_llm

    plain = make_llm(tiny_model_path)
    try:
        baseline = run_chat(plain, with_field=False)
    finally:
        close_llm(plain)
    llm = make_llm(tiny_model_path, additional_config={"contextpilot": {}})
    try:
        served = run_chat(llm, with_field=True)
        reports = vllm_plugin.reports(llm)[-3:]
    finally:
        close_llm(llm)
    for turn, ((names, _), (cached, prompt), (plain_cached, _)) in enumerate(zip(TURNS, served, baseline), 1):
        for name in names:
            assert DOCS[name] in prompt, f"turn {turn}: document {name} is missing from the served prompt"
        assert cached >= plain_cached, f"turn {turn}: {cached} cached tokens, plain vLLM had {plain_cached}"
    assert [r["turn"] for r in reports] == [1, 2, 3] and all(r["applied"] for r in reports)
    assert all(r["blocks_deduplicated"] == 0 for r in reports)  # no copy elsewhere in these prompts
    assert served[1][0] > 0 and served[2][0] > 0
