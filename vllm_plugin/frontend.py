"""Request side, vLLM part: the chat renderer and OpenAI chat-endpoint hooks.

Hook points (all patched once per process, when an engine with the plugin on
is configured in it; inert for engines without the plugin):

* ``vllm.renderers.base.BaseRenderer.render_chat`` and ``render_chat_async``:
  every chat request goes through one of them before tokenization (offline
  ``LLM.chat`` through the first, the OpenAI server through the second, via
  ``OnlineRenderer.preprocess_chat``).  The hook rewrites each conversation
  (:func:`.rewrite.plan_conversation`), lets vLLM template and tokenize the
  rewritten messages, then binds the served token ids to the Context Index
  (:func:`.rewrite.bind_served_prompt`).  To locate block boundaries without
  a second tokenization it asks vLLM's own tokenizer call for token offsets
  (``TokenizeParams.return_token_offsets``) and removes them again from the
  engine input afterwards.
* ``vllm.entrypoints.openai.chat_completion.serving.OpenAIServingChat.create_chat_completion``:
  reads the ``contextpilot`` body field and the ``X-ContextPilot-*``
  headers, answers a malformed field with HTTP 400, hands the parsed request
  to the renderer hook through a context variable, and adds a
  ``contextpilot`` field (what was done) to the response JSON (to the first
  chunk when streaming).  vLLM's ``usage`` is not touched.

Fail-open: if our code raises anywhere (other than for malformed client
data), the conversation is rendered exactly as the client sent it, the
failure is logged once per kind, and the response says ``applied: false``.
"""

from __future__ import annotations

import contextvars
import dataclasses
import json
import threading
from dataclasses import dataclass, field
from typing import Any

from .failopen import call_safely, logger, patch_method, report_failure
from .options import options_from_vllm_config, page_salt
from .rewrite import (
    ContextPilotRequestError,
    RequestSpec,
    bind_served_prompt,
    fallback_conversation,
    parse_spec,
    plan_conversation,
)

__all__ = ["install_frontend_hooks", "state_for_renderer", "HEADER_CONVERSATION", "HEADER_TENANT"]

HEADER_CONVERSATION = "x-contextpilot-conversation"
HEADER_TENANT = "x-contextpilot-tenant"
_STATE_ATTR = "_contextpilot_state"


@dataclass
class OnlineRequest:
    """What the chat endpoint learned about a request, for the renderer hook."""

    spec: RequestSpec | None
    lora_name: str | None = None
    reports: list = field(default_factory=list)


_online: contextvars.ContextVar[OnlineRequest | None] = contextvars.ContextVar("contextpilot_online", default=None)


# ----------------------------------------------------------------------------- state
def state_for_renderer(renderer: Any):
    """The plugin state of the engine a renderer serves, or None when the plugin is off for it."""
    cached = renderer.__dict__.get(_STATE_ATTR)
    if cached is not None:
        return cached or None
    options = options_from_vllm_config(getattr(renderer, "config", None))
    if options is None:
        renderer.__dict__[_STATE_ATTR] = False
        return None
    from .state import get_state

    state = get_state(renderer.config, options)
    renderer.__dict__[_STATE_ATTR] = state
    return state


_pilot_lock = threading.Lock()


def _pilot(state: Any, renderer: Any):
    if state.pilot is None:
        with _pilot_lock:
            if state.pilot is None:
                from contextpilot_engine import ContextPilot

                tokenizer = getattr(renderer, "tokenizer", None)
                state.pilot = ContextPilot(config=state.options.pilot, index=state.index, tokenizer=tokenizer)
    return state.pilot


def _ensure_channel(state: Any) -> None:
    """Start mirroring an engine core that lives in another process (once)."""
    if state.engine_local or state.options.channel != "auto":
        return
    sub = state.subscriber
    if sub is not None and sub.alive:
        return
    with state.lock:
        if state.subscriber is not None and state.subscriber.alive:
            return
        from .channel import ChannelSubscriber
        from .state import socket_path

        state.subscriber = ChannelSubscriber(socket_path(state.key, 0), state.index, state.lag).start()


# ------------------------------------------------------------------------- rendering
@dataclass
class _Prepared:
    state: Any
    conversations: list
    plans: list  # Plan | None per conversation
    tok_params: Any
    added_offsets: bool


def _prepare(renderer: Any, conversations: Any, tok_params: Any) -> _Prepared | None:
    """Plan every conversation; None means "call vLLM unchanged"."""
    state = call_safely("request setup", state_for_renderer, renderer)
    if state is None:
        return None
    online = _online.get()
    spec = online.spec if online is not None else None
    if spec is not None and not spec.enabled:
        return None
    try:
        pilot = _pilot(state, renderer)
        _ensure_channel(state)
        plans = [plan_conversation(pilot, conv, spec, state.options.implicit_documents) for conv in conversations]
    except ContextPilotRequestError:
        raise
    except Exception as exc:  # fail open: the request goes through as the client sent it
        report_failure("request rewrite", exc)
        report = {"applied": False, "error": "internal error; request served unmodified"}
        state.reports.append(report)
        if online is not None:
            online.reports.append(report)
        return _Prepared(state, _as_sent(conversations, spec), [None] * len(conversations), tok_params, False)
    if not any(p is not None for p in plans):
        return None
    new_convs = [p.messages if p is not None else conv for p, conv in zip(plans, conversations)]
    added = False
    if any(p is not None and p.preamble is not None for p in plans):
        params = tok_params if tok_params is not None else renderer.default_chat_tok_params
        can = getattr(renderer, "_can_produce_offsets", None)
        if not params.return_token_offsets and can is not None and call_safely("offsets probe", can, default=False):
            tok_params = dataclasses.replace(params, return_token_offsets=True)
            added = True
    return _Prepared(state, new_convs, plans, tok_params, added)


def _retokenizer(renderer: Any):
    def retokenize(text: str):
        enc = renderer.get_tokenizer()(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

    return retokenize


def _finish(renderer: Any, prep: _Prepared, eng_prompts: list) -> None:
    online = _online.get()
    state = prep.state
    lora = online.lora_name if online is not None else None
    for plan, eng in zip(prep.plans, eng_prompts):
        offsets = eng.pop("prompt_token_offsets", None) if prep.added_offsets and isinstance(eng, dict) else None
        if plan is None:
            continue
        report = plan.report
        if plan.preamble is not None and plan.ordered and isinstance(eng, dict):
            plan.salt = page_salt(eng.get("cache_salt"), lora)
            ok = call_safely(
                "request binding",
                bind_served_prompt,
                state.index,
                plan,
                eng.get("prompt") or "",
                eng.get("prompt_token_ids") or [],
                offsets,
                _retokenizer(renderer),
                default=False,
            )
            report = dict(report, bound=bool(ok))
        if report:
            state.reports.append(report)
            if online is not None:
                online.reports.append(report)


def _as_sent(conversations: Any, spec: RequestSpec | None) -> list:
    """Each conversation as the client meant it (see :func:`.rewrite.fallback_conversation`)."""
    return [call_safely("request fallback", fallback_conversation, conv, spec, default=conv) for conv in conversations]


def _unmodified(prep: _Prepared, conversations: Any, exc: BaseException) -> list:
    """vLLM rejected the rewritten prompt: log it and return the conversations to retry with."""
    report_failure("request render (rewritten prompt)", exc, "retrying with the request as sent")
    online = _online.get()
    report = {"applied": False, "error": "the rewritten prompt failed; request served unmodified"}
    prep.state.reports.append(report)
    if online is not None:
        online.reports.append(report)
    return _as_sent(conversations, online.spec if online is not None else None)


def _wrap_render_chat(orig):
    def render_chat(self, conversations, chat_params, tok_params=None, **kwargs):
        prep = _prepare(self, conversations, tok_params)
        if prep is None:
            return orig(self, conversations, chat_params, tok_params, **kwargs)
        try:
            out_convs, eng_prompts = orig(self, prep.conversations, chat_params, prep.tok_params, **kwargs)
        except Exception as exc:  # a second failure (e.g. too long even as sent) is vLLM's to report
            return orig(self, _unmodified(prep, conversations, exc), chat_params, tok_params, **kwargs)
        call_safely("request finish", _finish, self, prep, eng_prompts)
        return out_convs, eng_prompts

    return render_chat


def _wrap_render_chat_async(orig):
    async def render_chat_async(self, conversations, chat_params, tok_params=None, **kwargs):
        prep = _prepare(self, conversations, tok_params)
        if prep is None:
            return await orig(self, conversations, chat_params, tok_params, **kwargs)
        try:
            out_convs, eng_prompts = await orig(self, prep.conversations, chat_params, prep.tok_params, **kwargs)
        except Exception as exc:  # a second failure (e.g. too long even as sent) is vLLM's to report
            return await orig(self, _unmodified(prep, conversations, exc), chat_params, tok_params, **kwargs)
        call_safely("request finish", _finish, self, prep, eng_prompts)
        return out_convs, eng_prompts

    return render_chat_async


# -------------------------------------------------------------------------- endpoint
def _online_spec(request: Any, raw_request: Any, max_blocks: int) -> RequestSpec | None:
    """The request's spec from its body field and headers; raises ContextPilotRequestError."""
    extra = getattr(request, "model_extra", None) or {}
    body = extra.get("contextpilot")
    headers = getattr(raw_request, "headers", None)
    conv = headers.get(HEADER_CONVERSATION) if headers is not None else None
    tenant = headers.get(HEADER_TENANT) if headers is not None else None
    if body is None and conv is None and tenant is None:
        return None
    spec = parse_spec({} if body is None else body, "contextpilot", max_blocks)
    if spec.conversation_id is None and conv is not None:
        spec = dataclasses.replace(spec, conversation_id=_header_name(conv, HEADER_CONVERSATION))
    if spec.tenant is None and tenant is not None:
        spec = dataclasses.replace(spec, tenant=_header_name(tenant, HEADER_TENANT))
    return spec


def _header_name(value: str, header: str) -> str:
    if not value or len(value) > 256:
        raise ContextPilotRequestError(f"header {header}: expected 1 to 256 characters")
    return value


def _lora_name(serving: Any, request: Any) -> str | None:
    getter = getattr(serving, "_maybe_get_adapters", None)
    if getter is None:
        return None
    try:
        lora = getter(request, supports_default_mm_loras=True)
    except Exception:  # an unknown model is vLLM's error to report, later
        return None
    return getattr(lora, "lora_name", None)


def _merge_reports(reports: list) -> dict:
    if len(reports) == 1:
        return reports[0]
    return {"applied": any(r.get("applied") for r in reports), "prompts": reports}


async def _with_report_in_first_chunk(gen, payload: dict):
    first = True
    async for chunk in gen:
        if first and isinstance(chunk, str) and chunk.startswith("data: ") and not chunk.startswith("data: [DONE]"):
            first = False
            try:
                obj = json.loads(chunk[len("data: ") :])
                if isinstance(obj, dict):
                    obj["contextpilot"] = payload
                    chunk = "data: " + json.dumps(obj) + "\n\n"
            except ValueError:
                pass
        yield chunk


def _wrap_create_chat_completion(orig):
    async def create_chat_completion(self, request, raw_request=None):
        renderer = getattr(self, "renderer", None)
        state = call_safely("request setup", state_for_renderer, renderer) if renderer is not None else None
        if state is None:
            return await orig(self, request, raw_request)
        try:
            spec = _online_spec(request, raw_request, state.options.pilot.max_blocks_per_context)
        except ContextPilotRequestError as exc:
            return self.create_error_response(str(exc), param="contextpilot")
        except Exception as exc:  # fail open: serve it as sent
            report_failure("request setup", exc)
            return await orig(self, request, raw_request)
        online = OnlineRequest(spec, _lora_name(self, request))
        token = _online.set(online)
        try:
            result = await orig(self, request, raw_request)
        except ContextPilotRequestError as exc:
            return self.create_error_response(str(exc), param="contextpilot")
        finally:
            _online.reset(token)
        if not online.reports or not state.options.report:
            return result
        payload = _merge_reports(online.reports)
        try:
            if hasattr(result, "__aiter__"):
                return _with_report_in_first_chunk(result, payload)
            if hasattr(result, "choices") and hasattr(result, "usage"):
                setattr(result, "contextpilot", payload)
        except Exception as exc:  # the answer matters more than the report
            report_failure("response report", exc)
        return result

    return create_chat_completion


# ---------------------------------------------------------------------- installation
_lock = threading.Lock()
_installed: bool | None = None


def install_frontend_hooks() -> bool:
    global _installed
    with _lock:
        if _installed is not None:
            return _installed
        from vllm.renderers.base import BaseRenderer

        ok = patch_method(
            BaseRenderer, "render_chat", _wrap_render_chat, ["self", "conversations", "chat_params", "tok_params"],
            prefix_only=True,
        )
        ok &= patch_method(
            BaseRenderer,
            "render_chat_async",
            _wrap_render_chat_async,
            ["self", "conversations", "chat_params", "tok_params"],
            prefix_only=True,
        )
        try:
            from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
        except Exception as exc:  # no server components: offline use still works
            logger.info("contextpilot: OpenAI chat serving not importable (%s); server hooks skipped", exc)
        else:
            patch_method(
                OpenAIServingChat,
                "create_chat_completion",
                _wrap_create_chat_completion,
                ["self", "request", "raw_request"],
            )
        _installed = ok
        return ok
