"""Where a request says what it wants: the body field, the headers, a message's field (integration layer).

The real request path of every adapter (``rewriting.prepare`` on an
``EngineState``) with no engine: the prepared conversation is what the
engine would render.
"""

from __future__ import annotations

import pytest

from contextpilot_engine.integration import rewriting
from contextpilot_engine.integration.options import PluginOptions
from contextpilot_engine.integration.requests import ContextPilotRequestError, spec_from_http
from contextpilot_engine.integration.state import EngineState

DOCS = [f"Document {i}: " + " ".join(f"w{i}x{j}" for j in range(30)) for i in range(6)]


def make_state(name: str) -> EngineState:
    return EngineState(f"test-specs-{name}", PluginOptions(channel="off", arrival_window_ms=0), None)


def asked(docs, query="q", **field):
    return [{"role": "system", "content": "You answer."},
            {"role": "user", "content": query, "contextpilot": {"contexts": list(docs), **field}}]


def prepare(state, conversation, spec, reports=None):
    """The adapter's two steps, with nothing rendered: plan, then salt and report (``finish``)."""
    prepared = rewriting.prepare(state, [conversation], spec, None, reports)
    if prepared is not None:
        rewriting.finish(prepared, [None], reports)
    return prepared


def served_text(prepared) -> str:
    return "\n".join(m["content"] for m in prepared.conversations[0] if isinstance(m.get("content"), str))


def test_a_header_spec_keeps_the_documents_of_a_message_field():
    state = make_state("header-and-message")
    spec = spec_from_http(None, {"x-contextpilot-tenant": "team-b"})  # a gateway names the tenant
    reports: list = []
    prepared = prepare(state, asked(DOCS[:3]), spec, reports)
    assert prepared is not None and all(d in served_text(prepared) for d in DOCS[:3])
    assert reports[0]["applied"] and reports[0]["tenant"] == "team-b" and prepared.tenants == ["team-b"]
    assert all("contextpilot" not in m for m in prepared.conversations[0])


def test_a_field_given_twice_with_different_values_is_an_error_naming_both():
    state = make_state("disagree")
    spec = spec_from_http(None, {"x-contextpilot-tenant": "team-b"})
    with pytest.raises(ContextPilotRequestError, match=r"messages\[1\]\.contextpilot\.tenant.*'team-c'.*'team-b'"):
        prepare(state, asked(DOCS[:3], tenant="team-c"), spec)
    both = spec_from_http({"contexts": DOCS[:2]}, None)
    with pytest.raises(ContextPilotRequestError, match=r"messages\[1\]\.contextpilot\.contexts"):
        prepare(state, asked(DOCS[2:4]), both)
    with pytest.raises(ContextPilotRequestError, match="contextpilot.tenant 'team-c' disagrees with header"):
        spec_from_http({"tenant": "team-c"}, {"x-contextpilot-tenant": "team-b"})
    same = spec_from_http({"tenant": "team-b"}, {"x-contextpilot-tenant": "team-b"})
    assert same.tenant == "team-b"
    agreeing = prepare(state, asked(DOCS[:3], tenant="team-b"), spec)
    assert agreeing.tenants == ["team-b"]


def test_a_message_tenant_keeps_its_namespace_where_the_request_is_not_rewritten(monkeypatch):
    state = make_state("unplanned")
    image_system = [{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                    {"role": "user", "content": "q", "contextpilot": {"contexts": DOCS[:2], "tenant": "team-b"}}]
    prepared = prepare(state, image_system, None)
    assert prepared.tenants == ["team-b"]
    assert rewriting.tenant_cache_salt(state, prepared.tenants[0], None) == "contextpilot-tenant=team-b"

    def broken(*args, **kwargs):  # a bug of ours while planning: the request fails open
        raise RuntimeError("injected")

    monkeypatch.setattr(rewriting, "plan_conversations", broken)
    reports: list = []
    prepared = prepare(state, asked(DOCS[:3], tenant="team-b"), None, reports)
    assert reports[0]["reason"] == "rewrite_error" and prepared.tenants == ["team-b"]
    assert all(d in served_text(prepared) for d in DOCS[:3])  # served as sent, documents and all
