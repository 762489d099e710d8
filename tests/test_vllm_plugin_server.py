"""The plugin in vLLM's OpenAI server, driven by the official ``openai`` client.

One server is started for the module with ``--enable-contextpilot`` and
``--contextpilot-*`` flags, on 127.0.0.1 and a free port, in vLLM's default
multiprocess mode: the engine core runs in its own process, so the request
path sees the cache only through the plugin's Unix-socket channel.  That the
second of two requests with the same documents expects (and gets) cached
tokens proves the channel carried the first request's pages across.

Also covered: the response's ``contextpilot`` field (the same keys every
time) next to vLLM's intact ``usage.prompt_tokens_details.cached_tokens``; a
three-turn RAG chat keyed by the ``X-ContextPilot-Conversation`` header,
whose served prompts always hold every document and cache at least what
vLLM alone caches on the same messages; tenant isolation of the KV cache
(cache salt); ``enabled: false`` sending the contexts as given; client
errors passed through as vLLM's own 400 and never counted as ours; implicit
``<document>`` elements; the report in the first streamed chunk; the
Prometheus metrics on vLLM's ``/metrics``; ``--help``; one-line errors for bad
flag values; malformed ``contextpilot`` fields answered with HTTP 400 naming
the field; and, last, that SIGTERM leaves no file in the server's TMPDIR.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.engine

DOCS = [f"Document {i}: " + " ".join(f"v{i}y{j}" for j in range(60)) for i in range(6)]


@pytest.fixture(scope="module")
def server(tiny_model_path):
    from contextpilot_engine.bench.engine import engine_env
    from contextpilot_engine.vllm_plugin.testing import OpenAIServer

    # vLLM's default layout; dev mode for POST /reset_prefix_cache
    env = engine_env({"VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_SERVER_DEV_MODE": "1"}, apply=False)
    flags = ["--enable-contextpilot", "--contextpilot-tenant", "srv", "--contextpilot-max-overtakes", "4"]
    with OpenAIServer(tiny_model_path, flags, env=env) as srv:
        # The first chat request starts the API server's subscription to the engine core.
        srv.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=1)
        yield srv


def ask(client, docs=None, query="q", headers=None, contextpilot=None, **body):
    extra = dict(body)
    if contextpilot is not None:
        extra["contextpilot"] = dict(contextpilot)
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


CHAT_DOCS = {n: f"Document {n}: " + " ".join(f"{n.lower()}{j}q{j % 5}" for j in range(70))
             for n in ("Alpha", "Beta", "Gamma", "Delta")}
CHAT_TURNS = [
    (["Alpha", "Beta", "Gamma"], "What does Alpha say?"),
    (["Alpha", "Beta", "Gamma"], "And Beta?"),
    (["Gamma", "Delta", "Alpha"], "Compare Gamma and Delta."),
]


def reset_cache(server) -> None:
    import urllib.request

    urllib.request.urlopen(urllib.request.Request(server.url + "/reset_prefix_cache", method="POST"), timeout=30)


def chat_turns(server, enabled: bool):
    """A RAG chat: every turn resends the history and a system message with that turn's documents."""
    client = server.client()
    history, out = [], []
    for names, question in CHAT_TURNS:
        system = "Answer from the documents.\n" + "".join(f"<document>{CHAT_DOCS[n]}</document>\n" for n in names)
        reply = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "system", "content": system}, *history, {"role": "user", "content": question}],
            max_tokens=3, temperature=0.0, extra_headers={"X-ContextPilot-Conversation": "srv-chat"},
            extra_body={"return_token_ids": True, **({} if enabled else {"contextpilot": {"enabled": False}})},
        )
        out.append((reply.usage.prompt_tokens_details.cached_tokens, reply))
        history += [{"role": "user", "content": question}, {"role": "assistant", "content": reply.choices[0].message.content}]
    return out


def served_text(server, reply) -> str:
    """The prompt the engine ran, decoded from the token ids the response returns."""
    import json
    import urllib.request

    ids = reply.model_extra.get("prompt_token_ids") or getattr(reply, "prompt_token_ids", None)
    body = json.dumps({"model": "tiny", "tokens": ids}).encode()
    req = urllib.request.Request(server.url + "/detokenize", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())["prompt"]


def test_conversation_turns_keep_every_document_and_every_cache_hit(server):
    from contextpilot_engine.integration.reports import REPORT_KEYS

    reset_cache(server)
    plain = chat_turns(server, enabled=False)  # the same messages, served exactly as sent
    reset_cache(server)
    ours = chat_turns(server, enabled=True)
    for turn, ((names, _), (cached, reply), (plain_cached, _)) in enumerate(zip(CHAT_TURNS, ours, plain), 1):
        report = reply.model_extra["contextpilot"]
        assert set(report) == set(REPORT_KEYS) and report["applied"] and report["turn"] == turn
        text = served_text(server, reply)
        for name in names:
            assert CHAT_DOCS[name] in text, f"turn {turn}: document {name} missing from the served prompt"
        assert cached >= plain_cached, f"turn {turn}: {cached} cached tokens against {plain_cached} without us"
    assert ours[1][0] > 0 and plain[0][1].model_extra["contextpilot"]["reason"] == "disabled_by_request"


def test_tenants_never_share_kv_pages(server):
    client = server.client()
    docs = [f"Tenant document {i}: " + " ".join(f"t{i}w{j}" for j in range(60)) for i in range(3)]
    a1 = ask(client, docs, "qa", contextpilot={"tenant": "tenant-a"})
    b = ask(client, docs, "qb", contextpilot={"tenant": "tenant-b"})
    a2 = ask(client, docs, "qa2", contextpilot={"tenant": "tenant-a"})
    assert a1.model_extra["contextpilot"]["tenant"] == "tenant-a"
    assert b.usage.prompt_tokens_details.cached_tokens == 0  # the same text, another tenant: no hit
    assert a2.usage.prompt_tokens_details.cached_tokens > 3 * 32  # the same tenant reuses its pages
    assert a2.model_extra["contextpilot"]["expected_cached_tokens"] <= a2.usage.prompt_tokens_details.cached_tokens


def test_completions_get_the_tenant_namespace_and_refuse_a_forged_salt(server):
    import openai

    client = server.client()
    prompt = "Completion tenant prompt: " + " ".join(f"c{j}" for j in range(200))

    def complete(tenant, **body):
        return client.completions.create(model="tiny", prompt=prompt, max_tokens=1, temperature=0.0,
                                         extra_headers={"X-ContextPilot-Tenant": tenant}, extra_body=body or None)

    first = complete("tenant-c")
    other = complete("tenant-d")
    again = complete("tenant-c")
    assert first.usage.prompt_tokens > 4 * 32
    assert other.usage.prompt_tokens_details.cached_tokens == 0  # the same prompt, another tenant: no hit
    assert again.usage.prompt_tokens_details.cached_tokens > 3 * 32  # the same tenant reuses its pages
    with pytest.raises(openai.BadRequestError, match="cache_salt"):
        client.completions.create(model="tiny", prompt=prompt, max_tokens=1,
                                  extra_body={"cache_salt": "contextpilot-tenant=tenant-c"})
    with pytest.raises(openai.BadRequestError, match="contextpilot.contexts"):
        complete("tenant-c", contextpilot={"contexts": ["a"]})


def test_disabled_request_sends_the_contexts_as_given(server):
    client = server.client()
    docs = [DOCS[4], DOCS[1], DOCS[3]]
    reply = ask(client, docs, "as given?", contextpilot={"enabled": False}, return_token_ids=True)
    report = reply.model_extra["contextpilot"]
    assert report["applied"] is False and report["reason"] == "disabled_by_request"
    text = served_text(server, reply)
    assert text.index(DOCS[4]) < text.index(DOCS[1]) < text.index(DOCS[3])
    assert "[1] " + DOCS[4] in text and "Importance ranking" not in text
    assert reply.usage.prompt_tokens > 3 * 60


def test_debug_shows_the_rewritten_prompt(server):
    reply = ask(server.client(), DOCS[:2], "debug?", contextpilot={"debug": True})
    messages = reply.model_extra["contextpilot"]["prompt_messages"]
    assert messages[0]["role"] == "system" and DOCS[0] in messages[0]["content"]
    assert messages[-1] == {"role": "user", "content": "debug?"}


def test_client_errors_are_vllms_own_400_and_not_our_failure(server):
    import openai

    client = server.client()
    before = scrape(server)
    with pytest.raises(openai.BadRequestError):  # no messages at all, as plain vLLM
        client.chat.completions.create(model="tiny", messages=[], max_tokens=1,
                                       extra_body={"contextpilot": {"contexts": ["a document"]}})
    with pytest.raises(openai.BadRequestError) as err:  # over the model length, with or without our rewrite
        ask(client, ["word " * 5000], "too long?")
    assert "contextpilot" not in str(err.value).lower()
    after = scrape(server)
    assert metric(after, "contextpilot:failures_total") == metric(before, "contextpilot:failures_total")
    assert "rewrite_rejected" not in server.log_tail(200_000)


def scrape(server) -> str:
    import urllib.request

    with urllib.request.urlopen(server.url + "/metrics", timeout=30) as r:
        return r.read().decode()


def metric(text: str, name: str, **labels) -> float:
    """Sum of a metric's samples whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line[len(name) : len(name) + 1] not in ("{", " "):
            continue
        head, value = line.rsplit(" ", 1)
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


def test_metrics_on_vllms_endpoint(server):
    ask(server.client(), DOCS[:3], "metrics?")
    text = scrape(server)
    assert metric(text, "contextpilot:requests_total", outcome="rewritten") > 0
    assert metric(text, "contextpilot:requests_total", outcome="skipped", reason="disabled_by_request") >= 0
    assert metric(text, "contextpilot:blocks_total") >= 3
    assert metric(text, "contextpilot:blocks_moved_total") >= 0
    assert metric(text, "contextpilot:expected_cached_tokens_total") > 0
    assert metric(text, "contextpilot:mirror_events_total", op="stored") > 0
    assert metric(text, "contextpilot:mirror_lag_seconds_count") > 0
    assert metric(text, "contextpilot:request_overhead_seconds_count") > 0
    assert "vllm:prefix_cache_hits_total" in text  # vLLM's own metrics are all still there


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


def test_report_has_the_same_keys_in_every_case(server):
    from contextpilot_engine.integration.reports import REPORT_KEYS

    client = server.client()
    reports = [
        ask(client, DOCS[:2], "applied").model_extra["contextpilot"],
        ask(client, DOCS[:2], "opted out", contextpilot={"enabled": False}).model_extra["contextpilot"],
    ]
    assert all(set(r) == set(REPORT_KEYS) for r in reports)
    assert reports[0]["bound"] is True and reports[1]["bound"] is False and reports[1]["order"] == []


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
        ({"contextpilot": {"debug": 1}}, "contextpilot.debug: expected true or false"),
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


def test_bad_flag_value_is_one_line_naming_the_flag(vllm_ready):
    out = subprocess.run(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", "unused", "--enable-contextpilot",
         "--contextpilot-popularity-decay", "1.5"],
        capture_output=True, text=True, timeout=300, cwd="/",
    )
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "argument --contextpilot-popularity-decay: popularity_decay: expected a number in (0, 1], got 1.5" in out.stderr


# Keep last in this module: it stops the module's server.
def test_sigterm_leaves_no_file_of_ours_behind(server):
    """The channel is an abstract-namespace socket: it exists while the engine runs and never has a file."""
    with open("/proc/net/unix") as f:
        assert "@contextpilot-" in f.read()
    assert not [n for n in os.listdir(server.tmpdir) if n.startswith("contextpilot")]
    server.stop()  # SIGTERM; vLLM then force-kills its engine core
    assert server.proc.returncode is not None
    assert not [n for n in server.leftovers() if n.startswith("contextpilot")]
