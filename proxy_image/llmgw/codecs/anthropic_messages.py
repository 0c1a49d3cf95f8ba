"""Anthropic Messages JSON <-> the gateway's protobuf messages: requests, replies and streaming events.

Used by the ``anthropic`` provider. System and developer messages become the ``system`` field; the Messages
API requires ``max_tokens``, so the provider's default fills it when the client gives none. A stream's
events become content chunks and one final chunk with the finish reason and the usage.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import Any

import orjson

from llmgateway.v1 import llm_service_pb2 as pb
from llmgw.chat import clip, clip_text, message_text
from llmgw.errors import GatewayError, Kind

# Request fields of the Chat Completions API this translation does not carry yet, each with the test of a
# value that asks for something: such a request is refused (400, naming the field and the provider), never
# sent without it. A value that asks for nothing beyond the provider's own behaviour (logprobs false, n 1, a
# zero penalty, tool_choice "auto", response_format text, ...) is accepted.
_UNCARRIED: tuple[tuple[str, Callable[[pb.ChatRequest], bool]], ...] = (
    ("tools", lambda r: bool(r.tools)),
    ("tool_choice", lambda r: r.HasField("tool_choice") and r.tool_choice.mode not in ("auto", "none")),
    ("response_format", lambda r: r.HasField("response_format") and r.response_format.type != "text"),
    ("n", lambda r: r.HasField("n") and r.n != 1),
    ("seed", lambda r: r.HasField("seed")),
    ("logprobs", lambda r: r.logprobs),
    ("top_logprobs", lambda r: r.top_logprobs > 0),
    ("presence_penalty", lambda r: r.presence_penalty != 0),
    ("frequency_penalty", lambda r: r.frequency_penalty != 0),
    ("logit_bias", lambda r: bool(r.logit_bias)),
    ("reasoning_effort", lambda r: r.HasField("reasoning_effort")),
    ("service_tier", lambda r: r.HasField("service_tier") and r.service_tier not in ("auto", "default")),
    ("store", lambda r: r.store),
    ("metadata", lambda r: bool(r.metadata)),
    ("prediction", lambda r: r.HasField("prediction_json")),
    ("modalities", lambda r: any(m != "text" for m in r.modalities)),
)
_UNCARRIED_MESSAGE_FIELDS = ("name", "tool_calls", "tool_call_id", "refusal", "reasoning_content")


# What the OpenAI codec keeps in a request's extra_json besides unknown keys: the exact JSON of a field that
# has its typed field (a temperature with more digits than float holds, a stop string, an explicit
# "stream": false, an empty list), which the checks on the typed fields cover.
_TYPED_REQUEST_KEYS = frozenset(
    {
        "model", "messages", "stream", "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop",
        "user", "metadata", "tools", "tool_choice", "parallel_tool_calls", "response_format", "n", "seed",
        "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty", "logit_bias", "reasoning_effort",
        "stream_options", "service_tier", "store", "prediction", "modalities",
    }
)  # fmt: skip
_TYPED_MESSAGE_KEYS = frozenset(
    {"role", "content", "name", "tool_calls", "tool_call_id", "refusal", "reasoning_content"}
)
_NOTHING: tuple[Any, ...] = (None, [], {})  # values that ask for nothing (null is the same as absent)


def _set_keys(extra_json: str, typed: frozenset[str] = frozenset()) -> list[str]:
    """The keys of an ``extra_json`` object that ask for something: not null or empty, not a typed field's."""
    if not extra_json:
        return []
    return [k for k, v in orjson.loads(extra_json).items() if k not in typed and v not in _NOTHING]


def _refuse_uncarried(req: pb.ChatRequest, provider: str) -> None:
    def refuse(field: str) -> GatewayError:
        return GatewayError(
            Kind.INVALID_ARGUMENT,
            f"{clip_text(field)}: not supported with Anthropic provider {provider!r} (the gateway does not translate "
            "it to the Messages API yet)",
        )

    for field, asks in _UNCARRIED:
        if asks(req):
            raise refuse(field)
    for key in _set_keys(req.extra_json, _TYPED_REQUEST_KEYS):
        raise refuse(key)
    for key in _set_keys(req.stream_options.extra_json):
        raise refuse(f"stream_options.{key}")
    for i, m in enumerate(req.messages):
        where = f"messages[{i}]"
        if m.role == pb.ROLE_TOOL:
            raise refuse(f"{where}.role 'tool'")
        for field in _UNCARRIED_MESSAGE_FIELDS:
            if m.HasField(field) if field != "tool_calls" else m.tool_calls:
                raise refuse(f"{where}.{field}")
        for j, part in enumerate(m.parts):
            if part.type != "text" or part.json:
                raise refuse(f"{where}.content[{j}] of type {clip(part.type)}")
        for key in _set_keys(m.extra_json, _TYPED_MESSAGE_KEYS):
            raise refuse(f"{where}.{key}")


FINISH_BY_STOP_REASON = {
    "end_turn": pb.FINISH_REASON_STOP,
    "stop_sequence": pb.FINISH_REASON_STOP,
    "pause_turn": pb.FINISH_REASON_STOP,
    "max_tokens": pb.FINISH_REASON_LENGTH,
    "tool_use": pb.FINISH_REASON_TOOL_CALLS,
    "refusal": pb.FINISH_REASON_CONTENT_FILTER,
}


def _finish(stop_reason: str | None) -> pb.FinishReason:
    return FINISH_BY_STOP_REASON.get(stop_reason or "end_turn", pb.FINISH_REASON_STOP)


def _usage(prompt: int, completion: int) -> pb.Usage:
    return pb.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def request_to_json(
    req: pb.ChatRequest, *, model: str, stream: bool, default_max_tokens: int, provider: str
) -> dict[str, Any]:
    """The Messages API body for ``req``; ``provider`` names the provider in errors (and a field of the Chat
    Completions API that this translation does not carry yet is refused, naming the field)."""
    _refuse_uncarried(req, provider)
    system: list[str] = []
    messages: list[dict[str, Any]] = []
    for m in req.messages:
        if m.role in (pb.ROLE_SYSTEM, pb.ROLE_DEVELOPER):
            system.append(message_text(m))
            continue
        role = "assistant" if m.role == pb.ROLE_ASSISTANT else "user"
        messages.append({"role": role, "content": message_text(m)})
    if req.HasField("temperature") and req.temperature > 1.0:
        raise GatewayError(
            Kind.INVALID_ARGUMENT,
            f"temperature: {req.temperature:g} is out of range [0, 1] for Anthropic provider {provider!r}",
        )
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "max_tokens": (
            req.max_tokens
            if req.HasField("max_tokens")
            else req.max_completion_tokens
            if req.HasField("max_completion_tokens")
            else default_max_tokens
        ),
    }
    if system:
        body["system"] = "\n\n".join(system)
    if req.HasField("temperature"):
        body["temperature"] = round(req.temperature, 6)
    if req.HasField("top_p"):
        body["top_p"] = round(req.top_p, 6)
    if req.stop:
        body["stop_sequences"] = list(req.stop)
    if req.HasField("user"):
        body["metadata"] = {"user_id": req.user}
    if stream:
        body["stream"] = True
    return body


def response_from_json(body: Any, model: str) -> pb.ChatResponse:
    """A Messages API reply; KeyError, TypeError, ValueError or AttributeError for a malformed one."""
    text = "".join(b.get("text", "") for b in body["content"] if b.get("type") == "text")
    usage = body.get("usage") or {}
    return pb.ChatResponse(
        id=str(body["id"]),
        model=str(body.get("model", model)),
        content=text,
        finish_reason=_finish(body.get("stop_reason")),
        usage=_usage(int(usage.get("input_tokens", 0)), int(usage.get("output_tokens", 0))),
        created=int(time.time()),
    )


async def read_stream(
    events: AsyncIterable[tuple[str, bytes]], model: str, on_error: Callable[[dict[str, Any]], Exception]
) -> AsyncIterator[pb.ChatChunk]:
    """The chunks of a Messages API event stream ((event name, data) pairs), shaped like ``StreamingChat``'s.

    An ``error`` event raises ``on_error(its error object)``; malformed data or a stream that ends without
    ``message_delta`` raises ValueError (or KeyError/TypeError/AttributeError for a wrong shape).
    """
    msg_id, msg_model, created = "", model, int(time.time())
    prompt = completion = 0
    finish = pb.FINISH_REASON_UNSPECIFIED
    async for event, data in events:
        body = orjson.loads(data)
        kind = body.get("type") or event
        if kind == "content_block_delta":
            delta = body["delta"]
            if delta.get("type") == "text_delta" and delta.get("text"):
                yield pb.ChatChunk(id=msg_id, model=msg_model, created=created, delta=delta["text"])
        elif kind == "message_start":
            message = body["message"]
            msg_id, msg_model = str(message["id"]), str(message.get("model", model))
            usage = message.get("usage") or {}
            prompt = int(usage.get("input_tokens", 0))
            completion = int(usage.get("output_tokens", 0))
        elif kind == "message_delta":
            finish = _finish((body.get("delta") or {}).get("stop_reason"))
            completion = int((body.get("usage") or {}).get("output_tokens", completion))
        elif kind == "message_stop":
            break
        elif kind == "error":
            raise on_error(body.get("error") or {})
    if finish == pb.FINISH_REASON_UNSPECIFIED:
        raise ValueError("stream ended without message_delta")
    yield pb.ChatChunk(
        id=msg_id, model=msg_model, created=created, finish_reason=finish, usage=_usage(prompt, completion)
    )
