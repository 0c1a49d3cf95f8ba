"""OpenAI Chat Completions JSON <-> the gateway's protobuf messages.

Used by the REST front (clients speak OpenAI's API), by the ``openai`` provider client (providers speak it) and by
the client library. Request parsing names the offending field in every error, so that a client sees
``messages[2].role: unknown role 'robot'`` and not a stack trace.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import Any

import orjson

from llmgateway.v1 import llm_service_pb2 as pb
from llmgw.chat import FINISH_BY_NAME, FINISH_NAME, MAX_STOP_SEQUENCES, ROLE_BY_NAME, ROLE_NAME, invalid

# Fields OpenAI clients commonly send that do not change the answer's meaning, so we accept and drop them.
_IGNORED_FIELDS = frozenset(
    {
        "n",
        "stream_options",
        "logprobs",
        "top_logprobs",
        "presence_penalty",
        "frequency_penalty",
        "seed",
        "service_tier",
        "store",
        "parallel_tool_calls",
    }
)
_KNOWN_FIELDS = (
    frozenset(
        {
            "model",
            "messages",
            "temperature",
            "top_p",
            "max_tokens",
            "max_completion_tokens",
            "stop",
            "user",
            "metadata",
            "stream",
        }
    )
    | _IGNORED_FIELDS
)


def _number(body: dict[str, Any], key: str) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid(f"{key}: must be a number, got {type(value).__name__}")
    return float(value)


def _content_text(content: Any, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise invalid(f"{where}.content[{j}]: only text parts are supported, got {kind!r}")
            parts.append(part["text"])
        return "".join(parts)
    raise invalid(f"{where}.content: must be a string or a list of text parts")


def request_from_json(body: Any) -> tuple[pb.ChatRequest, bool]:
    """Parse an OpenAI chat request body; returns the request and whether it asked for a stream."""
    if not isinstance(body, dict):
        raise invalid("request body: must be a JSON object")
    for key in body:
        if key not in _KNOWN_FIELDS:
            raise invalid(f"{key}: unsupported field (the gateway supports text chat completions)")
    if body.get("n", 1) != 1:
        raise invalid("n: only n=1 is supported")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("model: required, a non-empty string")
    raw_messages = body.get("messages")
    if not isinstance(raw_messages, list):
        raise invalid("messages: required, a list of messages")
    messages = []
    for i, m in enumerate(raw_messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise invalid(f"{where}: must be an object with role and content")
        role = m.get("role")
        if role not in ROLE_BY_NAME:
            raise invalid(f"{where}.role: unknown role {role!r} (expected one of {', '.join(ROLE_BY_NAME)})")
        msg = pb.ChatMessage(role=ROLE_BY_NAME[role], content=_content_text(m.get("content"), where))
        name = m.get("name")
        if name is not None:
            if not isinstance(name, str):
                raise invalid(f"{where}.name: must be a string")
            msg.name = name
        messages.append(msg)
    req = pb.ChatRequest(model=model, messages=messages)
    temperature = _number(body, "temperature")
    if temperature is not None:
        req.temperature = temperature
    top_p = _number(body, "top_p")
    if top_p is not None:
        req.top_p = top_p
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
            raise invalid("max_tokens: must be an integer")
        if not 1 <= max_tokens <= 2**31 - 1:
            raise invalid(f"max_tokens: {max_tokens} must be between 1 and {2**31 - 1}")
        req.max_tokens = max_tokens
    stop = body.get("stop")
    if isinstance(stop, str):
        req.stop.append(stop)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        if len(stop) > MAX_STOP_SEQUENCES:
            raise invalid(f"stop: at most {MAX_STOP_SEQUENCES} sequences, got {len(stop)}")
        req.stop.extend(stop)
    elif stop is not None:
        raise invalid("stop: must be a string or a list of strings")
    user = body.get("user")
    if user is not None:
        if not isinstance(user, str):
            raise invalid("user: must be a string")
        req.user = user
    metadata = body.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise invalid("metadata: must be an object of string values")
        req.metadata.update(metadata)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise invalid("stream: must be true or false")
    return req, stream


def request_to_json(req: pb.ChatRequest, *, model: str | None = None, stream: bool = False) -> dict[str, Any]:
    """The OpenAI request body for ``req``; ``model`` overrides the model name sent upstream."""
    messages = []
    for m in req.messages:
        item: dict[str, Any] = {"role": ROLE_NAME.get(m.role, "user"), "content": m.content}
        if m.HasField("name"):
            item["name"] = m.name
        messages.append(item)
    body: dict[str, Any] = {"model": model or req.model, "messages": messages}
    if req.HasField("temperature"):
        body["temperature"] = round(req.temperature, 6)
    if req.HasField("top_p"):
        body["top_p"] = round(req.top_p, 6)
    if req.HasField("max_tokens"):
        body["max_tokens"] = req.max_tokens
    if req.stop:
        body["stop"] = list(req.stop)
    if req.HasField("user"):
        body["user"] = req.user
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def _usage_to_json(usage: pb.Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def _usage_from_json(usage: Any) -> pb.Usage | None:
    if not isinstance(usage, dict):
        return None
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    return pb.Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=int(usage.get("total_tokens") or prompt + completion),
    )


def response_to_json(resp: pb.ChatResponse) -> dict[str, Any]:
    return {
        "id": resp.id,
        "object": "chat.completion",
        "created": resp.created,
        "model": resp.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": resp.content, "refusal": None},
                "logprobs": None,
                "finish_reason": FINISH_NAME.get(resp.finish_reason, "stop"),
            }
        ],
        "usage": _usage_to_json(resp.usage),
    }


def response_from_json(body: Any) -> pb.ChatResponse:
    """Parse an upstream OpenAI chat completion; raises KeyError/TypeError/ValueError on a malformed one."""
    choice = body["choices"][0]
    resp = pb.ChatResponse(
        id=str(body.get("id", "")),
        model=str(body.get("model", "")),
        content=choice["message"].get("content") or "",
        finish_reason=FINISH_BY_NAME.get(choice.get("finish_reason") or "stop", pb.FINISH_REASON_STOP),
        created=int(body.get("created") or 0),
    )
    usage = _usage_from_json(body.get("usage"))
    if usage is not None:
        resp.usage.CopyFrom(usage)
    return resp


def chunk_to_json(chunk: pb.ChatChunk, *, first: bool) -> dict[str, Any]:
    """One ``chat.completion.chunk``; the first carries the assistant role, the final one the usage."""
    delta: dict[str, Any] = {"content": chunk.delta}
    if first:
        delta["role"] = "assistant"
    body: dict[str, Any] = {
        "id": chunk.id,
        "object": "chat.completion.chunk",
        "created": chunk.created,
        "model": chunk.model,
        "choices": [
            {
                "index": 0,
                "delta": delta,
                "logprobs": None,
                "finish_reason": FINISH_NAME.get(chunk.finish_reason),
            }
        ],
    }
    if chunk.HasField("usage"):
        body["usage"] = _usage_to_json(chunk.usage)
    return body


def chunk_from_json(body: Any) -> pb.ChatChunk:
    """Parse one upstream ``chat.completion.chunk`` (a usage-only chunk has no choices)."""
    chunk = pb.ChatChunk(
        id=str(body.get("id", "")), model=str(body.get("model", "")), created=int(body.get("created") or 0)
    )
    choices = body.get("choices") or []
    if choices:
        choice = choices[0]
        chunk.delta = (choice.get("delta") or {}).get("content") or ""
        reason = choice.get("finish_reason")
        if reason:
            chunk.finish_reason = FINISH_BY_NAME.get(reason, pb.FINISH_REASON_STOP)
    usage = _usage_from_json(body.get("usage"))
    if usage is not None:
        chunk.usage.CopyFrom(usage)
    return chunk


def error_body(
    message: str, error_type: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """OpenAI's error envelope."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


async def read_stream(
    events: AsyncIterable[bytes], on_error: Callable[[dict[str, Any]], Exception]
) -> AsyncIterator[pb.ChatChunk]:
    """The chunks of an OpenAI SSE stream (the data of each event), shaped like ``StreamingChat``'s.

    Content chunks come first (empty ones, like OpenAI's opening role-only chunk, are dropped); OpenAI sends
    the finish_reason and, with ``include_usage``, the usage in two last chunks, which become one final
    chunk carrying both. An ``{"error": ...}`` event raises ``on_error(body)``; malformed data or a stream
    that ends without a finish_reason raises ValueError (or KeyError/TypeError for a wrong shape).
    """
    final: pb.ChatChunk | None = None
    async for data in events:
        if data == b"[DONE]":
            break
        body = orjson.loads(data)
        if isinstance(body, dict) and "error" in body:
            raise on_error(body)
        chunk = chunk_from_json(body)
        if chunk.finish_reason or chunk.HasField("usage"):
            if chunk.delta:
                yield pb.ChatChunk(id=chunk.id, model=chunk.model, created=chunk.created, delta=chunk.delta)
                chunk.delta = ""
            if final is None:
                final = chunk
            else:
                final.MergeFrom(chunk)
        elif chunk.delta:
            yield chunk
    if final is None or not final.finish_reason:
        raise ValueError("the stream ended without a finish_reason")
    yield final
