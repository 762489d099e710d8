"""The chat request path on SGLang's real ``OpenAIServingChat``, with the tiny model's real tokenizer.

The request conversion (``_convert_to_internal_request``) runs as SGLang
runs it; what stands in for the scheduler inserts each served prompt into a
real ``UnifiedRadixCache`` in this process, whose mirror feeds the index the
next request is planned against (in SGLang the two live in different
processes and the channel joins them; ``tests/test_vllm_plugin_mirror.py``
covers the channel).  The request fields, headers, response field and
errors are the vLLM plugin's.
"""

from __future__ import annotations

import asyncio
import json

import pytest

DOCS = [f"Document {i}: " + " ".join(f"w{i}x{j}" for j in range(50)) for i in range(6)]


class RawRequest:
    """What the hook reads of Starlette's request: headers, and the body FastAPI already read."""

    def __init__(self, body: dict | None = None, headers: dict | None = None):
        self._body = json.dumps(body).encode() if body is not None else b""
        self.headers = {k.lower(): v for k, v in (headers or {}).items()}


@pytest.fixture(scope="module")
def serving(sglang_plugins, tiny_model_dir):
    from contextpilot_engine.sglang_plugin.frontend import state_for_serving
    from contextpilot_engine.sglang_plugin.testing import make_cache, make_serving_chat, publish_server_args

    args = publish_server_args("tokenizer", _contextpilot={"tenant": "chat"})
    chat = make_serving_chat(tiny_model_dir, args)
    state = state_for_serving(chat)  # the request side first: the cache below then shares its index
    cache, alloc = make_cache("rust", 16, slots=4096)
    assert state.engine_local and state.index.page_size == 16
    return chat, state, cache, alloc


def convert(chat, messages, body=None, headers=None):
    from sglang.srt.entrypoints.openai.protocol import ChatCompletionRequest

    request = ChatCompletionRequest(model="tiny", messages=messages, max_tokens=4)
    return chat._convert_to_internal_request(request, RawRequest(body, headers))


def served_text(chat, adapted) -> str:
    return chat.tokenizer_manager.tokenizer.decode(adapted.input_ids)


def prefill(cache, alloc, adapted):
    """What SGLang's scheduler does with the prompt once prefilled: its full pages enter the tree."""
    from contextpilot_engine.sglang_plugin.testing import insert_tokens

    insert_tokens(cache, alloc, adapted.input_ids, 16)


def test_blocks_reorder_against_the_live_tree_and_ride_in_kv_hints(serving):
    from contextpilot_engine.sglang_plugin.testing import cached_prefix

    chat, state, cache, alloc = serving
    first, _ = convert(chat, [{"role": "user", "content": "first?"}], {"contextpilot": {"contexts": DOCS[:4]}})
    assert all(d in served_text(chat, first) for d in DOCS[:4])
    prefill(cache, alloc, first)
    second, _ = convert(chat, [{"role": "user", "content": "second?"}],
                        {"contextpilot": {"contexts": [DOCS[3], DOCS[2], DOCS[1], DOCS[0]]}})
    (action,) = second.kv_hints.actions
    assert action.action_type == "contextpilot.blocks" and action.payload["applied"] is True
    expected = action.payload["expected_cached_tokens"]
    assert expected > 4 * 16
    assert cached_prefix(cache, second.input_ids) >= expected  # the tree really holds what the index expected
    assert action.payload["tenant"] == "chat" and second.cache_salt is None  # the default tenant: no salt


def test_the_response_field_has_the_same_keys_as_vllms(serving):
    from contextpilot_engine.integration.reports import REPORT_KEYS

    chat, state, cache, alloc = serving
    adapted, request = convert(chat, [{"role": "user", "content": "keys?"}], {"contextpilot": {"contexts": DOCS[:2]}})
    ret = [{"text": "ok", "output_ids": [5, 6], "meta_info": {
        "id": adapted.rid, "finish_reason": {"type": "length", "length": 2}, "prompt_tokens": len(adapted.input_ids),
        "completion_tokens": 2, "cached_tokens": 0, "weight_version": "default"}}]
    response = chat._build_chat_response(request, ret, 0)
    report = response.model_dump()["contextpilot"]
    assert set(report) == set(REPORT_KEYS) and report["applied"] and report["bound"]
    assert response.choices[0].message.content is not None  # SGLang's own response is intact


def test_streaming_puts_the_report_in_the_first_chunk(serving):
    from contextpilot_engine.sglang_plugin.frontend import around_generate_chat_stream

    chat, state, cache, alloc = serving
    adapted, request = convert(chat, [{"role": "user", "content": "stream?"}], {"contextpilot": {"contexts": DOCS[:2]}})

    async def sglang_stream(self, adapted_request, *args):
        yield 'data: {"id": "x", "choices": []}\n\n'
        yield "data: [DONE]\n\n"

    async def collect():
        return [c async for c in around_generate_chat_stream(sglang_stream, chat, adapted, request, None)]

    first, done = asyncio.run(collect())
    assert json.loads(first[len("data: "):])["contextpilot"]["applied"] is True and done == "data: [DONE]\n\n"


def test_headers_implicit_documents_and_tenant_salt(serving):
    chat, state, cache, alloc = serving
    system = "Be brief.\n" + "".join(f"<document>{d}</document>\n" for d in DOCS[3:])
    adapted, _ = convert(chat, [{"role": "system", "content": system}, {"role": "user", "content": "q"}],
                         headers={"X-ContextPilot-Tenant": "team-b", "X-ContextPilot-Conversation": "c1"})
    payload = adapted.kv_hints.actions[0].payload
    assert payload["tenant"] == "team-b" and payload["conversation_id"] == "c1" and payload["blocks"] == 3
    assert adapted.cache_salt == "contextpilot-tenant=team-b"  # tenants never share KV pages
    text = served_text(chat, adapted)
    assert "<document>" not in text and all(d in text for d in DOCS[3:])


def test_a_client_salt_cannot_spell_a_tenant_namespace(serving):
    from sglang.srt.entrypoints.openai.protocol import ChatCompletionRequest

    from contextpilot_engine.integration.requests import ContextPilotRequestError

    chat, state, cache, alloc = serving
    request = ChatCompletionRequest(model="tiny", messages=[{"role": "user", "content": "q"}], max_tokens=4,
                                    cache_salt="contextpilot-tenant=team-b")
    with pytest.raises(ContextPilotRequestError, match="cache_salt"):
        chat._convert_to_internal_request(request, RawRequest({"contextpilot": {"contexts": DOCS[:2]}}, None))


def test_dedup_points_only_at_copies_in_the_prompt(serving):
    chat, state, cache, alloc = serving
    history = [{"role": "user", "content": "run it"}, {"role": "assistant", "content": "ran"},
               {"role": "tool", "content": "output:\n" + DOCS[5], "tool_call_id": "t1"},
               {"role": "user", "content": "what now?"}]
    body = {"contextpilot": {"contexts": [DOCS[5], DOCS[4]], "conversation_id": "agent-1"}}
    adapted, request = convert(chat, history, body)
    text = served_text(chat, adapted)
    assert text.count(DOCS[5]) == 1 and DOCS[4] in text and "message 4 (tool)" in text


def test_disabled_request_sends_the_contexts_as_given(serving):
    chat, state, cache, alloc = serving
    adapted, _ = convert(chat, [{"role": "user", "content": "as given"}],
                         {"contextpilot": {"contexts": [DOCS[4], DOCS[0]], "enabled": False}})
    text = served_text(chat, adapted)
    assert text.index(DOCS[4]) < text.index(DOCS[0]) and "Importance ranking" not in text


@pytest.mark.parametrize(
    "body, message",
    [
        ({"contextpilot": {"contexts": ["ok", ""]}}, r"contextpilot.contexts\[1\]: block text is empty"),
        ({"contextpilot": {"context": ["x"]}}, r"contextpilot: unknown field\(s\) \['context'\]"),
    ],
)
def test_malformed_field_is_a_client_error_naming_it(serving, body, message):
    """A ValueError, which SGLang's handle_request answers with HTTP 400 and the message."""
    chat, state, cache, alloc = serving
    with pytest.raises(ValueError, match=message):
        convert(chat, [{"role": "user", "content": "q"}], body)


def test_plain_requests_are_left_alone(serving):
    chat, state, cache, alloc = serving
    adapted, _ = convert(chat, [{"role": "user", "content": "hello"}])
    assert adapted.kv_hints is None and "hello" in served_text(chat, adapted)
