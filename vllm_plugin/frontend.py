"""vLLM request side: the chat renderer and OpenAI chat-endpoint hooks.

Hook points (all patched once per process, when an engine with the plugin on
is configured in it; inert for engines without the plugin):

* ``vllm.renderers.base.BaseRenderer.render_chat`` and ``render_chat_async``:
  every chat request goes through one of them before tokenization (offline
  ``LLM.chat`` through the first, the OpenAI server through the second, via
  ``OnlineRenderer.preprocess_chat``).  The hook runs the integration layer's
  request path (:mod:`contextpilot_engine.integration.rewriting`): it
  rewrites each conversation, lets vLLM template and tokenize the rewritten
  messages, then binds the served token ids to the Context Index.  To locate
  block boundaries without a second tokenization it asks vLLM's own
  tokenizer call for token offsets (``TokenizeParams.return_token_offsets``)
  and removes them again from the engine input afterwards.  On the OpenAI
  server, requests that arrive together go through the integration layer's
  arrival window (:mod:`contextpilot_engine.integration.arrivals`): they
  are planned jointly and return from rendering in the planned admission
  order.
* ``vllm.entrypoints.openai.chat_completion.serving.OpenAIServingChat.create_chat_completion``:
  reads the ``contextpilot`` body field and the ``X-ContextPilot-*``
  headers, answers a malformed field with HTTP 400, hands the parsed request
  to the renderer hook through a context variable, and adds a
  ``contextpilot`` field (what was done) to the response JSON (to the first
  chunk when streaming).  vLLM's ``usage`` is not touched.
* ``vllm.entrypoints.openai.completion.serving.OpenAIServingCompletion.create_completion``:
  raw prompts are sent as given; a tenant named by the same field or headers
  gets its cache salt, and a client salt may not spell a tenant's.
"""

from __future__ import annotations

import contextvars
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from contextpilot_engine.integration import arrivals, rewriting
from contextpilot_engine.integration.failopen import call_safely, logger, once, report_failure
from contextpilot_engine.integration.reports import merge_reports, with_report_in_first_chunk
from contextpilot_engine.integration.requests import ContextPilotRequestError, RequestSpec, spec_from_http
from contextpilot_engine.integration.state import EngineState

from .config import options_from_vllm_config, state_for_config
from .hook_points import patch

__all__ = ["install_frontend_hooks", "state_for_renderer"]

_STATE_ATTR = "_contextpilot_state"


@dataclass
class OnlineRequest:
    """What the chat endpoint learned about a request, for the renderer hook."""

    spec: RequestSpec | None
    lora_name: str | None = None
    reports: list = field(default_factory=list)
    #: the arrival window's tickets of the request's renders, completed with its response
    tickets: list = field(default_factory=list)

    def completed(self) -> None:
        for ticket in self.tickets:
            ticket.completed()


_online: contextvars.ContextVar[OnlineRequest | None] = contextvars.ContextVar("contextpilot_online", default=None)


# ----------------------------------------------------------------------------- state
def state_for_renderer(renderer: Any) -> EngineState | None:
    """The plugin state of the engine a renderer serves, or None when the plugin is off for it."""
    cached = renderer.__dict__.get(_STATE_ATTR)
    if cached is not None:
        return cached or None
    options = options_from_vllm_config(getattr(renderer, "config", None))
    if options is None:
        renderer.__dict__[_STATE_ATTR] = False
        return None
    state = state_for_config(renderer.config, options)
    renderer.__dict__[_STATE_ATTR] = state
    return state


# ------------------------------------------------------------------------- rendering
@dataclass
class _Render:
    """One render call's plan, in vLLM's terms."""

    prepared: rewriting.Prepared
    tok_params: Any
    added_offsets: bool


def _prepare(renderer: Any, conversations: Any, tok_params: Any) -> _Render | None:
    """Plan every conversation; None means "call vLLM unchanged"."""
    state = call_safely("setup_error", state_for_renderer, renderer)
    if state is None:
        return None
    online = _online.get()
    prepared = rewriting.prepare(
        state,
        conversations,
        online.spec if online is not None else None,
        getattr(renderer, "tokenizer", None),
        online.reports if online is not None else None,
    )
    return _render_for(renderer, prepared, tok_params)


async def _arrive(renderer: Any, conversations: Any, tok_params: Any) -> tuple[_Render | None, arrivals.Ticket | None]:
    """:func:`_prepare` through the arrival window: requests arriving together are planned together."""
    state = call_safely("setup_error", state_for_renderer, renderer)
    if state is None:
        return None, None
    online = _online.get()
    ticket = await arrivals.window_for(state).arrive(
        state,
        conversations,
        online.spec if online is not None else None,
        getattr(renderer, "tokenizer", None),
        online.reports if online is not None else None,
    )
    if online is not None:
        online.tickets.append(ticket)
    return _render_for(renderer, ticket.prepared, tok_params), ticket


def _render_for(renderer: Any, prepared: rewriting.Prepared | None, tok_params: Any) -> _Render | None:
    """The render call's plan in vLLM's terms (asking for token offsets when binding needs them)."""
    if prepared is None:
        return None
    added = False
    if prepared.wants_offsets:
        try:
            params = tok_params if tok_params is not None else renderer.default_chat_tok_params
            can = getattr(renderer, "_can_produce_offsets", None)
            if not params.return_token_offsets and can is not None and call_safely("setup_error", can, default=False):
                tok_params = dataclasses.replace(params, return_token_offsets=True)
                added = True
        except Exception as exc:  # served as planned, without offsets: located from token ids, or left unbound
            report_failure("setup_error", exc)
    return _Render(prepared, tok_params, added)


def _finish(renderer: Any, render: _Render, eng_prompts: list) -> None:
    online = _online.get()
    lora = online.lora_name if online is not None else None
    served: list[rewriting.ServedTokens | None] = []
    for eng in eng_prompts:
        if not isinstance(eng, dict):
            served.append(None)
            continue
        offsets = eng.pop("prompt_token_offsets", None) if render.added_offsets else None
        served.append(
            rewriting.ServedTokens(
                eng.get("prompt") or "", eng.get("prompt_token_ids") or [], offsets, eng.get("cache_salt"), lora
            )
        )
    try:
        rewriting.finish(render.prepared, served, online.reports if online is not None else None)
    finally:  # the tenant's salt even if binding or reporting failed: isolation never depends on them
        for eng, tokens in zip(eng_prompts, served):
            if tokens is not None and tokens.cache_salt != eng.get("cache_salt"):
                eng["cache_salt"] = tokens.cache_salt  # the engine core hashes the request's blocks with it


def _as_sent(render: _Render, conversations: Any) -> list:
    return rewriting.as_sent(conversations, render.prepared.spec, render.prepared.state.options.pilot.instruction)


def _rejected(render: _Render, exc: BaseException) -> None:
    online = _online.get()
    rewriting.rejected(render.prepared, exc, online.reports if online is not None else None)


def _wrap_render_chat(orig):
    def render_chat(self, conversations, chat_params, tok_params=None, **kwargs):
        render = _prepare(self, conversations, tok_params)
        if render is None:
            return orig(self, conversations, chat_params, tok_params, **kwargs)
        try:
            result = orig(self, render.prepared.conversations, chat_params, render.tok_params, **kwargs)
        except ContextPilotRequestError:
            raise
        except Exception as exc:
            # The request as sent, with vLLM's own checks: if it fails too, the error is the
            # client's (e.g. a prompt over the model length) and reaches the client unchanged.
            result = orig(self, _as_sent(render, conversations), chat_params, tok_params, **kwargs)
            _rejected(render, exc)
            render.added_offsets = False
        call_safely("bind_error", _finish, self, render, result[1])
        return result

    return render_chat


def _wrap_render_chat_async(orig):
    async def render_chat_async(self, conversations, chat_params, tok_params=None, **kwargs):
        render, ticket = await _arrive(self, conversations, tok_params)
        try:
            if render is None:
                return await orig(self, conversations, chat_params, tok_params, **kwargs)
            try:
                result = await orig(self, render.prepared.conversations, chat_params, render.tok_params, **kwargs)
            except ContextPilotRequestError:
                raise
            except Exception as exc:  # see render_chat
                result = await orig(self, _as_sent(render, conversations), chat_params, tok_params, **kwargs)
                _rejected(render, exc)
                render.added_offsets = False
            call_safely("bind_error", _finish, self, render, result[1])
            return result
        finally:
            if ticket is not None:
                await ticket.finish()  # reach the engine in the planned admission order

    return render_chat_async


# -------------------------------------------------------------------------- endpoint
def _lora_name(serving: Any, request: Any) -> str | None:
    getter = getattr(serving, "_maybe_get_adapters", None)
    if getter is None:
        return None
    try:
        lora = getter(request, supports_default_mm_loras=True)
    except Exception:  # an unknown model is vLLM's error to report, later
        return None
    return getattr(lora, "lora_name", None)


def _serving_state(serving: Any) -> EngineState | None:
    """The plugin state of the engine an OpenAI serving object serves (None: the plugin is off for it)."""
    renderer = getattr(serving, "renderer", None)
    return call_safely("setup_error", state_for_renderer, renderer) if renderer is not None else None


def _request_spec(state: EngineState, request: Any, raw_request: Any) -> RequestSpec | None:
    """The request's ``contextpilot`` field and headers, and its cache salt, checked.

    Raises :class:`ContextPilotRequestError` for the client's mistake.
    """
    extra = getattr(request, "model_extra", None) or {}
    spec = spec_from_http(extra.get("contextpilot"), getattr(raw_request, "headers", None),
                          state.options.pilot.max_blocks_per_context)
    rewriting.check_client_salt(state, getattr(request, "cache_salt", None))
    return spec


def _wrap_create_chat_completion(orig):
    async def create_chat_completion(self, request, raw_request=None):
        state = _serving_state(self)
        if state is None:
            return await orig(self, request, raw_request)
        try:
            spec = _request_spec(state, request, raw_request)
        except ContextPilotRequestError as exc:
            return self.create_error_response(str(exc), param="contextpilot")
        except Exception as exc:  # fail open: serve it as sent
            report_failure("setup_error", exc)
            return await orig(self, request, raw_request)
        online = OnlineRequest(spec, _lora_name(self, request))
        token = _online.set(online)
        streaming = False
        try:
            result = await orig(self, request, raw_request)
            streaming = hasattr(result, "__aiter__")
        except ContextPilotRequestError as exc:
            return self.create_error_response(str(exc), param="contextpilot")
        finally:
            _online.reset(token)
            if not streaming:
                online.completed()
        if streaming:
            result = arrivals.completed_with(result, online.completed)
        if not online.reports or not state.options.report:
            return result
        payload = merge_reports(online.reports)
        try:
            if streaming:
                return with_report_in_first_chunk(result, payload)
            if hasattr(result, "choices") and hasattr(result, "usage"):
                setattr(result, "contextpilot", payload)
        except Exception as exc:  # the answer matters more than the report
            report_failure("report_error", exc)
        return result

    return create_chat_completion


def _wrap_create_completion(orig):
    """``/v1/completions``: raw prompts are sent as given, but a tenant still gets its KV namespace.

    The same request fields and headers as chat: a tenant named by them has
    its cache salt set, a client salt may not spell a tenant's, and
    ``contexts`` is a 400 (blocks are rewritten in chat requests only).
    """

    async def create_completion(self, request, raw_request=None):
        state = _serving_state(self)
        if state is None:
            return await orig(self, request, raw_request)
        try:
            client_salt = getattr(request, "cache_salt", None)
            salt = rewriting.completion_salt(state, _request_spec(state, request, raw_request), client_salt)
            if salt != client_salt:
                request.cache_salt = salt
        except ContextPilotRequestError as exc:
            return self.create_error_response(str(exc), param="contextpilot")
        except Exception as exc:  # fail open: serve it as sent
            report_failure("setup_error", exc)
        return await orig(self, request, raw_request)

    return create_completion


# ---------------------------------------------------------------------- installation
@once
def install_frontend_hooks() -> bool:
    from vllm.renderers.base import BaseRenderer

    ok = patch(BaseRenderer, "render_chat", _wrap_render_chat)
    ok &= patch(BaseRenderer, "render_chat_async", _wrap_render_chat_async)
    try:
        from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
    except Exception as exc:  # no server components: offline use still works
        logger.info("contextpilot: OpenAI chat serving not importable (%s); server hooks skipped", exc)
    else:
        patch(OpenAIServingChat, "create_chat_completion", _wrap_create_chat_completion)
    try:
        from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
    except Exception as exc:
        logger.info("contextpilot: OpenAI completion serving not importable (%s); its hook skipped", exc)
    else:
        patch(OpenAIServingCompletion, "create_completion", _wrap_create_completion)
    return ok
