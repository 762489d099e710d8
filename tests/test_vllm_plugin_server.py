"""The plugin in vLLM's OpenAI server, driven by the official ``openai`` client.

One server is started for the module with ``--enable-contextpilot`` and
``--contextpilot-*`` flags, on 127.0.0.1 and a free port, in vLLM's default
multiprocess mode: the engine core runs in its own process, so the request
path sees the cache only through the plugin's Unix-socket channel.  That the
second of two requests with the same documents expects (and gets) cached
tokens proves the channel carried the first request's pages across.

Also covered: the response's ``contextpilot`` field next to vLLM's intact
``usage.prompt_tokens_details.cached_tokens``, conversation dedup keyed by
the ``X-ContextPilot-Conversation`` header, implicit ``<document>``
elements, the report in the first streamed chunk, ``--help``, and malformed
``contextpilot`` fields answered with HTTP 400 naming the field.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.engine

DOCS = [f"Document {i}: " + " ".join(f"v{i}y{j}" for j in range(60)) for i in range(6)]


@pytest.fixture(scope="module")
def server(tiny_model_path):
    from contextpilot_engine.bench.engine import engine_env
    from contextpilot_engine.vllm_plugin.testing import OpenAIServer

    env = engine_env({"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}, apply=False)  # vLLM's default layout
    flags = ["--enable-contextpilot", "--contextpilot-tenant", "srv", "--contextpilot-max-overtakes", "4"]
    with OpenAIServer(tiny_model_path, flags, env=env) as srv:
        # The first chat request starts the API server's subscription to the engine core.
        srv.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=1)
        yield srv


def ask(client, docs=None, query="q", headers=None, **body):
    extra = dict(body)
    if docs is not None:
        extra.setdefault("contextpilot", {})["contexts"] = docs
    return client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": query}],
        max_tokens=1,
        temperature=0.0,
        extra_body=extra or None,
        extra_headers=headers,
    )


def test_reorder_through_the_channel_and_usage_kept(server):
    client = server.client()
    first = ask(client, [DOCS[0], DOCS[1], DOCS[2], DOCS[3]], "first")
    second = ask(client, [DOCS[2], DOCS[0], DOCS[3], DOCS[1]], "second")
    r1, r2 = first.model_extra["contextpilot"], second.model_extra["contextpilot"]
    assert r1["applied"] and r1["tenant"] == "srv" and r1["source"] == "explicit"
    # The request side only knows what is cached through the channel from the engine core.
    assert r2["expected_cached_tokens"] > 4 * 32
    assert r2["blocks_moved"] > 0
    details = second.usage.prompt_tokens_details
    assert details is not None and details.cached_tokens >= r2["expected_cached_tokens"]
    assert second.usage.prompt_tokens > details.cached_tokens


def test_header_conversation_dedups(server):
    client = server.client()
    headers = {"X-ContextPilot-Conversation": "srv-conv"}
    t1 = ask(client, DOCS[:3], "one", headers=headers)
    t2 = ask(client, DOCS[:3], "two", headers=headers)
    report = t2.model_extra["contextpilot"]
    assert report["conversation_id"] == "srv-conv" and report["turn"] == 2
    assert report["blocks_deduplicated"] == 3 and report["tokens_saved_by_dedup"] > 0
    assert t2.usage.prompt_tokens < t1.usage.prompt_tokens - 100


def test_implicit_documents_and_streaming_report(server):
    client = server.client()
    system = "Be brief.\n" + "".join(f'<document id="d{i}">{d}</document>\n' for i, d in enumerate(DOCS[3:]))
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "system", "content": system}, {"role": "user", "content": "q"}],
        max_tokens=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    report = chunks[0].model_extra.get("contextpilot")
    assert report and report["applied"] and report["source"] == "implicit" and report["blocks"] == 3
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens > 3 * 60


def test_plain_requests_are_left_alone(server):
    client = server.client()
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=1
    )
    assert "contextpilot" not in (reply.model_extra or {})
    assert reply.usage.prompt_tokens < 20


@pytest.mark.parametrize(
    "body, message",
    [
        ({"contextpilot": {"contexts": "not a list"}}, "contextpilot.contexts: expected a list of blocks"),
        ({"contextpilot": {"contexts": ["ok", ""]}}, r"contextpilot.contexts\[1\]: block text is empty"),
        ({"contextpilot": {"contexts": [{"id": 3}]}}, r"contextpilot.contexts\[0\]: a dict block needs a 'text' key"),
        ({"contextpilot": {"context": ["x"]}}, r"contextpilot: unknown field\(s\) \['context'\]"),
        ({"contextpilot": ["x"]}, "contextpilot: expected an object"),
        ({"contextpilot": {"conversation_id": 5}}, "contextpilot.conversation_id: expected a non-empty string"),
        ({"contextpilot": {"enabled": "yes"}}, "contextpilot.enabled: expected true or false"),
    ],
)
def test_malformed_field_is_a_400_naming_it(server, body, message):
    import openai

    client = server.client()
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "q"}], max_tokens=1, extra_body=body
        )
    assert err.value.status_code == 400
    assert err.match(message)


def test_server_still_healthy_after_bad_requests(server):
    reply = ask(server.client(), DOCS[:2], "after")
    assert reply.model_extra["contextpilot"]["applied"]


def test_flags_appear_in_help(vllm_ready):
    out = subprocess.run(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--help=ContextPilot"],
        capture_output=True, text=True, timeout=300, cwd="/",
    )
    text = out.stdout + out.stderr
    assert "--enable-contextpilot" in text
    for flag in (
        "--contextpilot-cache-aware-scheduling",
        "--contextpilot-max-overtakes",
        "--contextpilot-hint-template",
        "--contextpilot-implicit-documents",
        "--contextpilot-channel",
        "--contextpilot-tenant",
    ):
        assert flag in text, flag
