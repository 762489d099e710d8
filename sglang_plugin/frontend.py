"""SGLang request side: the OpenAI chat request path in the main process.

* ``OpenAIServingChat._convert_to_internal_request`` (AROUND; SGLang runs it
  off the event loop, in a worker thread): the ``contextpilot`` body field
  and the ``X-ContextPilot-*`` headers are read, the conversation is
  rewritten by the integration layer (:mod:`contextpilot_engine.integration.rewriting`),
  SGLang templates and tokenizes the rewritten messages, and the result is
  salted by tenant and bound to the index from its token ids.  What was done
  rides to the scheduler in the request's ``kv_hints`` (an action of type
  ``contextpilot.blocks``) and to the response through the request id.
* ``_build_chat_response`` (AFTER) and ``_generate_chat_stream`` (AROUND):
  the ``contextpilot`` response field, in the first chunk when streaming.

SGLang's request model drops fields it does not know, so the body field is
read from the raw request's body (which FastAPI has already read and keeps).
"""

from __future__ import annotations

import json
import threading
import uuid
from collections import OrderedDict
from typing import Any

from contextpilot_engine.integration import rewriting
from contextpilot_engine.integration.failopen import call_safely, report_failure
from contextpilot_engine.integration.reports import merge_reports, with_report_in_first_chunk
from contextpilot_engine.integration.requests import ContextPilotRequestError, spec_from_http
from contextpilot_engine.integration.state import EngineState, get_state

from .config import engine_key, options_from_server_args

__all__ = ["around_convert", "after_build_chat_response", "around_generate_chat_stream", "state_for_serving"]

_STATE_ATTR = "_contextpilot_state"
#: reports waiting for their response, by request id (bounded: a response never built leaves one behind)
_MAX_PENDING = 10_000
_pending: OrderedDict[str, dict] = OrderedDict()
_pending_lock = threading.Lock()


def state_for_serving(serving: Any) -> EngineState | None:
    """The plugin state of the engine an ``OpenAIServingChat`` serves, or None when the plugin is off."""
    cached = serving.__dict__.get(_STATE_ATTR)
    if cached is not None:
        return cached or None
    server_args = getattr(getattr(serving, "tokenizer_manager", None), "server_args", None)
    options = options_from_server_args(server_args)
    state = get_state(engine_key(server_args), options) if options is not None else None
    serving.__dict__[_STATE_ATTR] = state if state is not None else False
    return state


def _body_field(request: Any, raw_request: Any) -> Any:
    extra = getattr(request, "model_extra", None) or {}
    if "contextpilot" in extra:
        return extra["contextpilot"]
    body = getattr(raw_request, "_body", None)  # Starlette keeps the body FastAPI parsed
    if not body:
        return None
    try:
        data = json.loads(body)
    except ValueError:
        return None
    return data.get("contextpilot") if isinstance(data, dict) else None


def _as_dict(message: Any) -> Any:
    dump = getattr(message, "model_dump", None)
    return dump(exclude_none=True) if dump is not None else message


_ADAPTERS: dict[type, Any] = {}


def _with_messages(request: Any, messages: list, cache_salt: Any) -> Any:
    """A copy of the request with other messages (validated as SGLang validates them) and cache salt."""
    cls = type(request)
    adapter = _ADAPTERS.get(cls)
    if adapter is None:
        from pydantic import TypeAdapter

        adapter = _ADAPTERS[cls] = TypeAdapter(cls.model_fields["messages"].annotation)
    update: dict[str, Any] = {"messages": adapter.validate_python(messages)}
    if cache_salt is not None:
        update["cache_salt"] = cache_salt
    return request.model_copy(update=update)


def _prompt_text(state: EngineState, ids: Any) -> str | None:
    table = state.token_table
    if table is None or not isinstance(ids, list) or not ids:
        return None
    return table.decode(ids)


def around_convert(original: Any, self: Any, request: Any, raw_request: Any = None, *args: Any, **kwargs: Any):
    state = call_safely("setup_error", state_for_serving, self)
    if state is None:
        return original(self, request, raw_request, *args, **kwargs)
    headers = getattr(raw_request, "headers", None)
    spec = spec_from_http(_body_field(request, raw_request), headers, state.options.pilot.max_blocks_per_context)
    rewriting.check_client_salt(state, getattr(request, "cache_salt", None))
    sink: list[dict] = []
    try:
        messages = [_as_dict(m) for m in request.messages]
        prepared = rewriting.prepare(state, [messages], spec, self.tokenizer_manager.tokenizer, sink)
    except ContextPilotRequestError:
        raise
    except Exception as exc:  # fail open
        report_failure("setup_error", exc)
        return original(self, request, raw_request, *args, **kwargs)
    if prepared is None:
        return original(self, request, raw_request, *args, **kwargs)
    salt = rewriting.tenant_cache_salt(state, prepared.tenants[0], getattr(request, "cache_salt", None))
    try:
        rewritten = _with_messages(request, prepared.conversations[0], salt)
    except Exception as exc:  # our messages did not validate: serve the request as sent
        rewriting.rejected(prepared, exc, sink)
        rewritten = _with_messages(request, rewriting.as_sent([messages], spec, state.options.pilot.instruction)[0],
                                   salt)
    try:
        adapted, processed = original(self, rewritten, raw_request, *args, **kwargs)
    except ContextPilotRequestError:
        raise
    except Exception as exc:
        # The request as sent, with SGLang's own checks: if it fails too, the error is the client's.
        as_sent = rewriting.as_sent([messages], spec, state.options.pilot.instruction)[0]
        adapted, processed = original(self, _with_messages(request, as_sent, salt), raw_request, *args, **kwargs)
        rewriting.rejected(prepared, exc, sink)
    call_safely("bind_error", _finish, state, prepared, adapted, salt, sink)
    return adapted, processed


def _finish(state: EngineState, prepared: Any, adapted: Any, salt: Any, sink: list) -> None:
    ids = getattr(adapted, "input_ids", None)
    text = _prompt_text(state, ids)
    served = rewriting.ServedTokens(text or "", ids or [], None, salt, None) if text is not None else None
    rewriting.finish(prepared, [served], sink)
    if not sink:
        return
    if getattr(adapted, "rid", None) is None:
        adapted.rid = uuid.uuid4().hex  # what SGLang would do later; the response is found by it
    report = merge_reports(sink)
    adapted.kv_hints = _kv_hints(str(adapted.rid), report)
    if state.options.report:
        with _pending_lock:
            _pending[str(adapted.rid)] = report
            while len(_pending) > _MAX_PENDING:
                _pending.popitem(last=False)


def _kv_hints(message_id: str, report: dict) -> Any:
    """SGLang's per-request hint envelope, with one ``contextpilot.blocks`` action saying what was done."""
    from sglang.srt.managers.kv_hints import KvHintAction, KvHintsEnvelope

    payload = {k: report.get(k) for k in ("applied", "tenant", "conversation_id", "blocks", "expected_cached_tokens")}
    action = KvHintAction(action_id="contextpilot-0", action_type="contextpilot.blocks", action_version="1",
                          payload=payload)
    return KvHintsEnvelope(protocol_version="1", message_id=message_id, actions=[action])


def _take_report(rid: Any) -> dict | None:
    if rid is None:
        return None
    with _pending_lock:
        return _pending.pop(str(rid), None)


_WITH_FIELD: dict[type, type] = {}


def _with_report(response: Any, report: dict) -> Any:
    """The response model with a ``contextpilot`` field (a subclass of its class, made once per class)."""
    cls = type(response)
    sub = _WITH_FIELD.get(cls)
    if sub is None:
        from typing import Optional

        import pydantic

        sub = pydantic.create_model(cls.__name__, __base__=cls, contextpilot=(Optional[dict], None))
        _WITH_FIELD[cls] = sub
    fields = {name: getattr(response, name) for name in cls.model_fields}
    return sub.model_construct(_fields_set=set(response.model_fields_set) | {"contextpilot"}, **fields,
                               contextpilot=report)


def after_build_chat_response(result: Any, self: Any, request: Any, ret: Any, created: Any, *a: Any, **k: Any):
    if not hasattr(result, "model_fields"):
        return None  # an ORJSONResponse or an error: leave it
    try:
        rid = (ret[0].get("meta_info") or {}).get("id") if ret else None
        report = _take_report(rid)
        return _with_report(result, report) if report is not None else None
    except Exception as exc:  # the answer matters more than the report
        report_failure("report_error", exc)
        return None


def around_generate_chat_stream(original: Any, self: Any, adapted_request: Any, *args: Any, **kwargs: Any):
    stream = original(self, adapted_request, *args, **kwargs)
    report = _take_report(getattr(adapted_request, "rid", None))
    return with_report_in_first_chunk(stream, report) if report is not None else stream
