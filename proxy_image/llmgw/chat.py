"""The protobuf chat messages as the proxy's one internal currency, and the checks every request passes.

Both fronts turn what they receive into a ``ChatRequest`` and every provider client answers with ``ChatResponse``
or ``ChatChunk``; conversions to provider JSON are hand-written next to each provider (no ``json_format``
on the hot path). :func:`validate_request` is the single place where a request's fields are checked, so
the gRPC and REST fronts reject the same things with the same message.
"""

from __future__ import annotations

import math
from collections.abc import AsyncGenerator, AsyncIterable
from typing import Any

import orjson

from llmgateway.v1 import llm_service_pb2 as pb
from llmgw.errors import GatewayError, Kind

ROLE_BY_NAME: dict[str, pb.Role] = {
    "system": pb.ROLE_SYSTEM,
    "user": pb.ROLE_USER,
    "assistant": pb.ROLE_ASSISTANT,
    "tool": pb.ROLE_TOOL,
    "developer": pb.ROLE_DEVELOPER,
}
ROLE_NAME: dict[pb.Role, str] = {v: k for k, v in ROLE_BY_NAME.items()}

FINISH_BY_NAME: dict[str, pb.FinishReason] = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "content_filter": pb.FINISH_REASON_CONTENT_FILTER,
    "tool_calls": pb.FINISH_REASON_TOOL_CALLS,
    "function_call": pb.FINISH_REASON_TOOL_CALLS,
}
FINISH_NAME: dict[pb.FinishReason, str] = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_CONTENT_FILTER: "content_filter",
    pb.FINISH_REASON_TOOL_CALLS: "tool_calls",
}

# OpenAI takes 4 stop sequences, Anthropic and vLLM more: the gateway's bound only keeps a request's stop
# matching cheap, and each provider applies its own (an OpenAI upstream answers a fifth with its 400).
MAX_STOP_SEQUENCES = 64
MAX_ECHO_CHARS = 256  # how much of a client's value an error message repeats


def invalid(message: str) -> GatewayError:
    return GatewayError(Kind.INVALID_ARGUMENT, message)


def clip(value: object, limit: int = MAX_ECHO_CHARS) -> str:
    """``repr(value)`` for an error message, cut to ``limit`` characters (a client's 100 KB model name is
    not worth echoing whole)."""
    return clip_text(repr(value), limit)


def clip_text(text: str, limit: int = MAX_ECHO_CHARS) -> str:
    """``text`` (a name a client chose, a path) for an error message, cut to ``limit`` characters."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


def message_text(message: pb.ChatMessage) -> str:
    """A message's text: its content, or its text parts joined."""
    if message.parts:
        return "".join(p.text for p in message.parts if p.type == "text" and not p.json)
    return message.content


def _json_object(text: str, where: str) -> None:
    if not text:
        return
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise invalid(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise invalid(f"{where}: must be a JSON object")


def _json_value(text: str, where: str) -> None:
    try:
        orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise invalid(f"{where}: not valid JSON ({exc})") from None


def _validate_json_fields(req: pb.ChatRequest) -> None:
    """The JSON carried in string fields parses (a gRPC client may have written it by hand)."""
    _json_object(req.extra_json, "extra_json")
    _json_object(req.stream_options.extra_json, "stream_options.extra_json")
    if req.HasField("prediction_json"):
        _json_object(req.prediction_json, "prediction_json")
    for i, message in enumerate(req.messages):
        _json_object(message.extra_json, f"messages[{i}].extra_json")
        for j, part in enumerate(message.parts):
            _json_object(part.json, f"messages[{i}].parts[{j}].json")
        for j, call in enumerate(message.tool_calls):
            _json_object(call.json, f"messages[{i}].tool_calls[{j}].json")
    for i, tool in enumerate(req.tools):
        _json_object(tool.json, f"tools[{i}].json")
        if tool.function.HasField("parameters_json"):
            _json_object(tool.function.parameters_json, f"tools[{i}].function.parameters_json")
    if req.tool_choice.json:
        _json_value(req.tool_choice.json, "tool_choice.json")
    _json_object(req.response_format.json, "response_format.json")
    if req.response_format.json_schema.HasField("schema_json"):
        _json_object(req.response_format.json_schema.schema_json, "response_format.json_schema.schema_json")


def validate_request(req: pb.ChatRequest) -> None:
    """Reject a request that no provider could answer, naming the offending field."""
    if not req.model:
        raise invalid("model: required (the model name to route to)")
    if not req.messages:
        raise invalid("messages: must contain at least one message")
    for i, message in enumerate(req.messages):
        if message.role not in ROLE_NAME:
            raise invalid(
                f"messages[{i}].role: unknown role {message.role} (expected one of {', '.join(ROLE_BY_NAME)})"
            )
    if req.HasField("temperature") and not (0.0 <= req.temperature <= 2.0 and math.isfinite(req.temperature)):
        raise invalid(f"temperature: {req.temperature:g} is out of range [0, 2]")
    if req.HasField("top_p") and not (0.0 <= req.top_p <= 1.0 and math.isfinite(req.top_p)):
        raise invalid(f"top_p: {req.top_p:g} is out of range [0, 1]")
    if req.HasField("max_tokens") and req.max_tokens < 1:
        raise invalid(f"max_tokens: {req.max_tokens} must be at least 1")
    if req.HasField("max_completion_tokens") and req.max_completion_tokens < 1:
        raise invalid(f"max_completion_tokens: {req.max_completion_tokens} must be at least 1")
    if len(req.stop) > MAX_STOP_SEQUENCES:
        raise invalid(f"stop: at most {MAX_STOP_SEQUENCES} sequences, got {len(req.stop)}")
    if req.HasField("n") and req.n < 1:
        raise invalid(f"n: {req.n} must be at least 1")
    if req.HasField("top_logprobs") and req.top_logprobs < 0:
        raise invalid(f"top_logprobs: {req.top_logprobs} must be at least 0")
    _validate_json_fields(req)


def is_deterministic(req: pb.ChatRequest) -> bool:
    """Temperature explicitly 0: the same request may be answered from the cache."""
    return req.HasField("temperature") and req.temperature == 0.0


# -- the two layouts of a stream ------------------------------------------------------------------------


def is_simple_chunk(chunk: pb.ChatChunk) -> bool:
    """A chunk of the simple layout: text in ``delta`` or the end in ``finish_reason``, no ``choices``."""
    return not chunk.choices and bool(chunk.delta or chunk.finish_reason)


def chunk_carries(chunk: pb.ChatChunk) -> bool:
    """Whether a chunk of either layout carries anything (a simple gRPC upstream also sends empty ones)."""
    return bool(chunk.choices or chunk.delta or chunk.finish_reason or chunk.HasField("usage"))


def chunk_finishes(chunk: pb.ChatChunk) -> bool:
    """Whether a chunk of either layout carries a finish reason."""
    return bool(chunk.finish_reason) or any(c.HasField("finish_reason") for c in chunk.choices)


def _like(chunk: pb.ChatChunk, **fields: Any) -> pb.ChatChunk:
    """A new chunk of the same stream as ``chunk`` (its id, model and creation time)."""
    return pb.ChatChunk(id=chunk.id, model=chunk.model, created=chunk.created, **fields)


async def to_openai_layout(
    chunks: AsyncIterable[pb.ChatChunk], include_usage: bool
) -> AsyncGenerator[pb.ChatChunk, None]:
    """The chunks in OpenAI's layout: chunks already in it pass unchanged; a simple-layout stream (an
    anthropic provider's, a simple gRPC upstream's) gets its text as choice 0's content with the role on
    the first, a finish chunk, and the usage as a separate chunk with no choices when ``include_usage``
    (without it, a usage chunk with no choices is left out)."""
    first = True
    async for chunk in chunks:
        if not is_simple_chunk(chunk):
            if include_usage or chunk.choices or not chunk.HasField("usage"):
                yield chunk  # (a usage chunk nobody asked for: an anthropic provider's, counted upstream)
            continue
        if chunk.delta:
            out = _like(chunk)
            choice = out.choices.add(index=0)
            if first:
                choice.delta.role = "assistant"
                first = False
            choice.delta.content = chunk.delta
            yield out
        if chunk.finish_reason:
            out = _like(chunk)
            choice = out.choices.add(index=0, finish_reason=FINISH_NAME.get(chunk.finish_reason, "stop"))
            if first:
                choice.delta.role = "assistant"
                choice.delta.content = ""
                first = False
            yield out
            if include_usage and chunk.HasField("usage"):
                yield _like(chunk, usage=chunk.usage)


def _text_only(choice: pb.ChunkChoice) -> bool:
    """Whether a choice's part of a chunk is nothing but choice 0's text (what ``delta`` can say alone)."""
    d = choice.delta
    return (
        choice.index == 0
        and not (d.tool_calls or d.reasoning_content or d.refusal or choice.HasField("logprobs_json"))
        and not choice.extra_json
    )


async def to_simple_layout(chunks: AsyncIterable[pb.ChatChunk]) -> AsyncGenerator[pb.ChatChunk, None]:
    """The chunks in the simple layout: choice 0's text as ``delta`` chunks, then one final chunk with its
    finish reason and the usage. What ``delta`` cannot say (tool-call fragments, reasoning, logprobs, other
    choices) is not dropped: such a chunk keeps its ``choices`` beside the ``delta``. Raises ValueError if
    the stream ends without a finish reason."""
    final: pb.ChatChunk | None = None
    usage: pb.Usage | None = None
    async for chunk in chunks:
        if chunk.HasField("usage"):
            usage = chunk.usage
        if is_simple_chunk(chunk):
            if chunk.finish_reason:
                final = final or chunk
            else:
                yield chunk
            continue
        text = "".join(c.delta.content for c in chunk.choices if c.index == 0)
        for choice in chunk.choices:
            if choice.index == 0 and choice.HasField("finish_reason") and final is None:
                reason = FINISH_BY_NAME.get(choice.finish_reason, pb.FINISH_REASON_STOP)
                final = _like(chunk, finish_reason=reason)
        if all(_text_only(c) for c in chunk.choices):
            if text:
                yield _like(chunk, delta=text)
        else:
            out = pb.ChatChunk()
            out.CopyFrom(chunk)
            out.ClearField("usage")
            out.usage_null = False
            out.delta = text
            yield out
    if final is None:
        raise ValueError("the stream ended without a finish_reason")
    if usage is not None:
        final.usage.CopyFrom(usage)
    yield final
