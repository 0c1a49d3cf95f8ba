"""Anthropic Messages JSON <-> the gateway's protobuf messages, both ways.

Two uses:

- the ``anthropic`` provider: a hub ``ChatRequest`` (the Chat Completions API) becomes a Messages API body
  (:func:`request_to_json`), its reply a ``ChatResponse`` (:func:`response_from_json`) and its event stream
  ``ChatChunk``s in OpenAI's layout (:func:`read_stream`);
- the Messages front (:mod:`llmgw.fronts.anthropic`): a Messages API body becomes a hub ``ChatRequest``
  (:func:`request_from_json`), a hub reply a Messages API message (:func:`response_to_json`) and a hub stream
  Anthropic's event sequence (:class:`EventWriter`).

How the two APIs meet: system and developer messages are ``system``; tool messages are ``tool_result`` blocks
of a user turn (``is_error`` travels in the tool message's ``extra_json``); assistant ``tool_calls`` are
``tool_use`` blocks; images are ``image_url`` parts (data URLs are base64 sources, http(s) URLs url sources);
``reasoning_effort`` is a thinking budget (:data:`THINKING_BUDGET`); thinking blocks are
``reasoning_content`` with the block's signature in the assistant message's ``extra_json`` as
``reasoning_signature`` (and ``redacted_thinking`` blocks' data as ``redacted_reasoning``), so a replayed
assistant message gives Anthropic its thinking back; ``response_format`` ``json_schema`` (and
``json_object``) is Anthropic's documented forced tool (:data:`FORMAT_TOOL`), whose input becomes the
message's content. Usage is counted as OpenAI does: ``prompt_tokens`` is Anthropic's ``input_tokens`` plus
the cache's read and written tokens, ``cached_tokens`` its ``cache_read_input_tokens``.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import Any

import orjson

from llmgateway.v1 import llm_service_pb2 as pb
from llmgw.chat import FINISH_NAME, clip, clip_text
from llmgw.errors import GatewayError, Kind

# Request fields of the Chat Completions API that the Messages API has no place for, each with the test of a
# value that asks for something: such a request is refused (400, naming the field and the provider), never
# sent without it. A value that asks for nothing beyond the provider's own behaviour (logprobs false, n 1, a
# zero penalty, response_format text, ...) is accepted.
_UNCARRIED: tuple[tuple[str, Callable[[pb.ChatRequest], bool]], ...] = (
    ("n", lambda r: r.HasField("n") and r.n != 1),
    ("seed", lambda r: r.HasField("seed")),
    ("logprobs", lambda r: r.logprobs),
    ("top_logprobs", lambda r: r.top_logprobs > 0),
    ("presence_penalty", lambda r: r.presence_penalty != 0),
    ("frequency_penalty", lambda r: r.frequency_penalty != 0),
    ("logit_bias", lambda r: bool(r.logit_bias)),
    ("service_tier", lambda r: r.HasField("service_tier") and r.service_tier not in ("auto", "default")),
    ("store", lambda r: r.store),
    ("metadata", lambda r: bool(r.metadata)),
    ("prediction", lambda r: r.HasField("prediction_json")),
    ("modalities", lambda r: any(m != "text" for m in r.modalities)),
)

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
# Keys of the Messages API that a request's extra_json may carry to an Anthropic provider as they are (the
# Messages front puts them there; an OpenAI SDK can send them with extra_body).
PASSED_KEYS = frozenset(
    {"top_k", "thinking", "container", "mcp_servers", "context_management", "inference_geo"}
)
# Message keys carried in extra_json that this translation reads (the rest is refused if it asks for something).
SIGNATURE, REDACTED, IS_ERROR = "reasoning_signature", "redacted_reasoning", "is_error"
# In a stream's delta extra_json: a content block the hub has no field for (server_tool_use,
# web_search_tool_result, ...), whole ({"start": its content_block, "deltas": [...]}), and a text block's
# citation.
BLOCK, CITATION = "anthropic_block", "citation"
_MAX_HELD_BLOCK_BYTES = 16 * 1024 * 1024  # of one such block's deltas, held until its content_block_stop
CACHE_CONTROL = "cache_control"
CONTENT = (
    "anthropic_content"  # an assistant turn's blocks as they were, when the hub's fields cannot order them
)
_MESSAGE_KEYS = frozenset(
    {"role", "content", "name", "tool_calls", "tool_call_id", "refusal", "reasoning_content"}
    | {SIGNATURE, REDACTED, IS_ERROR, CACHE_CONTROL, CONTENT, "annotations", "audio", "function_call"}
)
_NOTHING: tuple[Any, ...] = (None, [], {})  # values that ask for nothing (null is the same as absent)

# reasoning_effort -> thinking budget_tokens (Anthropic's minimum budget is 1024).
THINKING_BUDGET = {"minimal": 1024, "low": 2048, "medium": 8192, "high": 24576, "xhigh": 32768}
# The name of the tool that carries response_format: json_schema (the schema's own name when it has one).
FORMAT_TOOL = "json_response"
# Content block types of the Messages API that a part's JSON may hold and that are sent as they are.
_NATIVE_BLOCKS = frozenset(
    {
        "text",
        "image",
        "document",
        "search_result",
        "container_upload",
        "server_tool_use",
        "web_search_tool_result",
    }
)


def _refuse(field: str, provider: str) -> GatewayError:
    return GatewayError(
        Kind.INVALID_ARGUMENT,
        f"{clip_text(field)}: not supported with Anthropic provider {provider!r} (the Messages API has no "
        "equivalent)",
    )


def _extra(extra_json: str) -> dict[str, Any]:
    return orjson.loads(extra_json) if extra_json else {}


def _asks(value: Any) -> bool:
    return value not in _NOTHING and value is not False


# -- hub -> Messages API (the anthropic provider) -------------------------------------------------------


def _image_block(url: str, where: str, provider: str) -> dict[str, Any]:
    if url.startswith("data:"):
        head, sep, data = url[5:].partition(",")
        media_type, _, encoding = head.partition(";")
        if not sep or encoding != "base64" or not media_type:
            raise GatewayError(
                Kind.INVALID_ARGUMENT, f"{where}: a data URL must be data:<media type>;base64,<data>"
            )
        return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
    if url.startswith(("http://", "https://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise GatewayError(Kind.INVALID_ARGUMENT, f"{where}: an image URL must be a data: or http(s) URL")


def _blocks(m: pb.ChatMessage, where: str, provider: str) -> list[dict[str, Any]]:
    """A message's content as Messages API blocks."""
    if not m.parts:
        return [{"type": "text", "text": m.content}] if m.content else []
    blocks: list[dict[str, Any]] = []
    for j, part in enumerate(m.parts):
        at = f"{where}.content[{j}]"
        if part.json:
            block = orjson.loads(part.json)
            if block.get("type") in _NATIVE_BLOCKS:
                blocks.append(block)
                continue
            raise _refuse(f"{at} of type {clip(part.type)}", provider)
        if part.type in ("text", "refusal"):
            if part.text:
                blocks.append({"type": "text", "text": part.text})
        elif part.type == "image_url":
            blocks.append(_image_block(part.image_url.url, at, provider))
        elif (
            part.type == "file"
            and part.file.HasField("file_data")
            and part.file.file_data.startswith("data:")
        ):
            head, _, data = part.file.file_data[5:].partition(",")
            block = {
                "type": "document",
                "source": {"type": "base64", "media_type": head.split(";")[0], "data": data},
            }
            if part.file.HasField("filename"):
                block["title"] = part.file.filename
            blocks.append(block)
        else:
            raise _refuse(f"{at} of type {clip(part.type)}", provider)
    return blocks


def _tool_input(arguments: str, where: str) -> Any:
    try:
        value = orjson.loads(arguments or "{}")
    except orjson.JSONDecodeError:
        raise GatewayError(Kind.INVALID_ARGUMENT, f"{where}.function.arguments: not valid JSON") from None
    if not isinstance(value, dict):
        raise GatewayError(Kind.INVALID_ARGUMENT, f"{where}.function.arguments: must be a JSON object")
    return value


def _assistant_blocks(m: pb.ChatMessage, extra: dict[str, Any], where: str, provider: str) -> list[Any]:
    if isinstance(extra.get(CONTENT), list):  # the Messages front's turn with server tool blocks, as it was
        return list(extra[CONTENT])
    blocks: list[dict[str, Any]] = []
    signature = extra.get(SIGNATURE)
    if m.HasField("reasoning_content") and isinstance(signature, str) and signature:
        # Without its signature a thinking block is refused by Anthropic; an earlier turn's thinking may
        # be left out (the API ignores it anyway), so a reasoning_content from another provider is dropped.
        blocks.append({"type": "thinking", "thinking": m.reasoning_content, "signature": signature})
    for data in extra.get(REDACTED) or ():
        blocks.append({"type": "redacted_thinking", "data": data})
    blocks.extend(_blocks(m, where, provider))
    if m.HasField("refusal") and m.refusal:
        blocks.append({"type": "text", "text": m.refusal})
    for k, call in enumerate(m.tool_calls):
        at = f"{where}.tool_calls[{k}]"
        if call.json:
            raise _refuse(f"{at} of type {clip(orjson.loads(call.json).get('type'))}", provider)
        blocks.append(
            {"type": "tool_use", "id": call.id, "name": call.name, "input": _tool_input(call.arguments, at)}
        )
    return blocks


def _tool_result(m: pb.ChatMessage, extra: dict[str, Any], where: str, provider: str) -> dict[str, Any]:
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": m.tool_call_id}
    blocks = _blocks(m, where, provider)
    if m.parts:
        block["content"] = blocks
    elif m.content:
        block["content"] = m.content
    if extra.get(IS_ERROR) is True:
        block["is_error"] = True
    if extra.get(CACHE_CONTROL) is not None:
        block[CACHE_CONTROL] = extra[CACHE_CONTROL]
    return block


def _messages(req: pb.ChatRequest, provider: str) -> tuple[list[Any], list[dict[str, Any]]]:
    """The system blocks and the conversation; consecutive turns of one role are merged (tool results and
    the user text after them are one user turn, as the API documents for parallel tool use)."""
    system: list[Any] = []
    messages: list[dict[str, Any]] = []

    shorts: list[str | None] = []  # a turn that was one message of string content keeps the string

    def add(role: str, blocks: list[dict[str, Any]], short: str | None = None) -> None:
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"].extend(blocks)
            shorts[-1] = None
        else:
            messages.append({"role": role, "content": blocks})
            shorts.append(short)

    for i, m in enumerate(req.messages):
        where = f"messages[{i}]"
        extra = _extra(m.extra_json)
        for key, value in extra.items():
            if key not in _MESSAGE_KEYS and value not in _NOTHING:
                raise _refuse(f"{where}.{key}", provider)
        if m.HasField("name") and m.role != pb.ROLE_TOOL:
            raise _refuse(f"{where}.name", provider)
        short = None if m.parts else m.content
        if m.role in (pb.ROLE_SYSTEM, pb.ROLE_DEVELOPER):
            system.extend(_blocks(m, where, provider))
        elif m.role == pb.ROLE_ASSISTANT:
            blocks = _assistant_blocks(m, extra, where, provider)
            add("assistant", blocks, short if len(blocks) <= 1 and not m.tool_calls else None)
        elif m.role == pb.ROLE_TOOL:
            if not m.HasField("tool_call_id"):
                raise GatewayError(
                    Kind.INVALID_ARGUMENT, f"{where}.tool_call_id: required for a tool message"
                )
            add("user", [_tool_result(m, extra, where, provider)])
        else:
            add("user", _blocks(m, where, provider), short)
    for message, short in zip(messages, shorts, strict=True):
        if short is not None and len(message["content"]) <= 1:
            message["content"] = short
    return system, messages


def _tool_json(tool: pb.Tool, where: str, provider: str) -> dict[str, Any]:
    if tool.json:
        body = orjson.loads(tool.json)
        if (
            "function" not in body
            and "name" in body
            and ("input_schema" in body or body.get("type") != "custom")
        ):
            return body  # an Anthropic tool (a server tool, or one with cache_control), as the client gave it
        raise _refuse(f"{where} of type {clip(body.get('type'))}", provider)
    f = tool.function
    out: dict[str, Any] = {"name": f.name}
    if f.HasField("description"):
        out["description"] = f.description
    out["input_schema"] = (
        orjson.loads(f.parameters_json)
        if f.HasField("parameters_json")
        else {"type": "object", "properties": {}}
    )
    if f.HasField("strict") and f.strict:
        out["strict"] = True
    return out


def _tool_choice(req: pb.ChatRequest, provider: str) -> dict[str, Any] | None:
    which = req.tool_choice.WhichOneof("choice")
    choice: dict[str, Any] | None = None
    if which == "mode":
        mode = req.tool_choice.mode
        kinds = {"auto": "auto", "required": "any", "none": "none"}
        if mode not in kinds:
            raise _refuse(f"tool_choice {clip(mode)}", provider)
        choice = {"type": kinds[mode]}
    elif which == "function_name":
        choice = {"type": "tool", "name": req.tool_choice.function_name}
    elif which == "json":
        value = orjson.loads(req.tool_choice.json)
        if isinstance(value, dict) and value.get("type") in ("auto", "any", "tool", "none"):
            choice = value  # Anthropic's own form, from the Messages front
        else:
            raise _refuse("tool_choice of this form", provider)
    if req.HasField("parallel_tool_calls") and not req.parallel_tool_calls:
        choice = choice or {"type": "auto"}
        if choice["type"] != "none":
            choice["disable_parallel_tool_use"] = True
    return choice


def format_tool_name(req: pb.ChatRequest) -> str | None:
    """The name of the tool that carries ``response_format``, or None when the request asks for no JSON."""
    fmt = req.response_format
    if fmt.type == "json_schema":
        return fmt.json_schema.name or FORMAT_TOOL
    if fmt.type == "json_object":
        return FORMAT_TOOL
    return None


def _format_tool(req: pb.ChatRequest, name: str, provider: str) -> dict[str, Any]:
    fmt = req.response_format
    if fmt.json:
        raise _refuse("response_format of this shape", provider)
    schema: Any = {"type": "object"}
    description = "Respond with a JSON object."
    if fmt.type == "json_schema":
        if fmt.json_schema.HasField("schema_json"):
            schema = orjson.loads(fmt.json_schema.schema_json)
        description = (
            fmt.json_schema.description
            if fmt.json_schema.HasField("description")
            else ("Respond with JSON that follows this schema.")
        )
    return {"name": name, "description": description, "input_schema": schema}


def _max_tokens(req: pb.ChatRequest, default: int) -> int:
    if req.HasField("max_completion_tokens"):
        return req.max_completion_tokens
    if req.HasField("max_tokens"):
        return req.max_tokens
    return default


def request_to_json(
    req: pb.ChatRequest, *, model: str, stream: bool, default_max_tokens: int, provider: str
) -> dict[str, Any]:
    """The Messages API body for ``req``; ``provider`` names the provider in errors. A field the Messages API
    cannot carry is refused (400, naming the field), never left out."""
    for field, asks in _UNCARRIED:
        if asks(req):
            raise _refuse(field, provider)
    extra = _extra(req.extra_json)
    for key, value in extra.items():
        if key not in _TYPED_REQUEST_KEYS and key not in PASSED_KEYS and value not in _NOTHING:
            raise _refuse(key, provider)
    for key, value in _extra(req.stream_options.extra_json).items():
        if value not in _NOTHING:
            raise _refuse(f"stream_options.{key}", provider)
    temperature: Any = extra.get("temperature")
    if not isinstance(temperature, int | float) or isinstance(temperature, bool):
        temperature = round(req.temperature, 6) if req.HasField("temperature") else None
    if temperature is not None and temperature > 1:
        raise GatewayError(
            Kind.INVALID_ARGUMENT,
            f"temperature: {temperature:g} is out of range [0, 1] for Anthropic provider {provider!r}",
        )
    system, messages = _messages(req, provider)
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "max_tokens": _max_tokens(req, default_max_tokens),
    }
    if system:
        plain = all(set(b) == {"type", "text"} and b["type"] == "text" for b in system)
        body["system"] = "\n\n".join(b["text"] for b in system) if plain else system
    if temperature is not None:
        body["temperature"] = temperature
    if req.HasField("top_p"):
        body["top_p"] = round(req.top_p, 6)
    if req.stop:
        body["stop_sequences"] = list(req.stop)
    if req.HasField("user"):
        body["metadata"] = {"user_id": req.user}
    tools = [_tool_json(t, f"tools[{i}]", provider) for i, t in enumerate(req.tools)]
    choice = _tool_choice(req, provider)
    name = format_tool_name(req)
    if name is not None:
        if tools:
            raise GatewayError(
                Kind.INVALID_ARGUMENT,
                f"response_format: not supported together with tools with Anthropic provider {provider!r} (JSON "
                "output is carried by a forced tool call)",
            )
        tools = [_format_tool(req, name, provider)]
        choice = {"type": "tool", "name": name}
    if tools:
        body["tools"] = tools
    if choice is not None and tools:  # Anthropic refuses a tool_choice without tools
        body["tool_choice"] = choice
    thinking = extra.get("thinking")
    if thinking is None and req.HasField("reasoning_effort") and req.reasoning_effort != "none":
        budget = THINKING_BUDGET.get(req.reasoning_effort)
        if budget is None:
            raise GatewayError(
                Kind.INVALID_ARGUMENT,
                f"reasoning_effort: {clip(req.reasoning_effort)} is not one of {', '.join(THINKING_BUDGET)}",
            )
        if req.HasField("max_completion_tokens") or req.HasField("max_tokens"):
            if body["max_tokens"] <= 1024:
                raise GatewayError(
                    Kind.INVALID_ARGUMENT,
                    f"reasoning_effort: needs max_tokens above 1024 with Anthropic provider {provider!r} "
                    f"(thinking takes at least 1024 tokens of it), got {body['max_tokens']}",
                )
            budget = min(budget, body["max_tokens"] - 1)
        else:
            body["max_tokens"] += budget
        thinking = {"type": "enabled", "budget_tokens": budget}
    if thinking is not None:
        body["thinking"] = thinking
        forced = body.get("tool_choice", {}).get("type") in ("any", "tool")
        if forced and isinstance(thinking, dict) and thinking.get("type") != "disabled":
            what = "response_format" if name is not None else "tool_choice"
            raise GatewayError(
                Kind.INVALID_ARGUMENT,
                f"{what}: a forced tool call cannot be combined with reasoning with Anthropic provider "
                f"{provider!r} (Anthropic refuses tool_choice any or tool while thinking)",
            )
    for key in PASSED_KEYS - {"thinking"}:
        if extra.get(key) is not None:
            body[key] = extra[key]
    if stream:
        body["stream"] = True
    return body


# -- Messages API replies -> hub -----------------------------------------------------------------------


FINISH_BY_STOP_REASON = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
_FINISH_ENUM = {v: k for k, v in FINISH_NAME.items()}


def _finish(stop_reason: str | None, format_tool: str | None) -> str:
    reason = FINISH_BY_STOP_REASON.get(stop_reason or "end_turn", "stop")
    return "stop" if reason == "tool_calls" and format_tool is not None else reason


_USAGE_KEYS = frozenset(
    {"input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"}
)


def usage_from_json(usage: dict[str, Any]) -> pb.Usage:
    """Anthropic's usage as OpenAI counts it: the cache's tokens are part of the prompt."""
    read = int(usage.get("cache_read_input_tokens") or 0)
    written = int(usage.get("cache_creation_input_tokens") or 0)
    prompt = int(usage.get("input_tokens") or 0) + read + written
    completion = int(usage.get("output_tokens") or 0)
    out = pb.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
    out.prompt_tokens_details.cached_tokens = read
    if written:
        out.prompt_tokens_details.extra_json = orjson.dumps({"cache_creation_input_tokens": written}).decode()
    others = {k: v for k, v in usage.items() if k not in _USAGE_KEYS}  # service_tier, cache_creation, ...
    if others:
        out.extra_json = orjson.dumps(others).decode()
    return out


_PLAIN_BLOCKS = {
    "text": {"type", "text"},
    "thinking": {"type", "thinking", "signature"},
    "redacted_thinking": {"type", "data"},
    "tool_use": {"type", "id", "name", "input"},
}


def _plain(block: dict[str, Any]) -> bool:
    """Whether a reply's block is all the hub's fields say (else the blocks travel whole)."""
    keys = _PLAIN_BLOCKS.get(block.get("type"))  # type: ignore[arg-type]
    return (
        keys is not None
        and set(block) <= keys
        and (block.get("type") != "text" or block.get("citations") is None)
    )


def response_from_json(body: Any, model: str, format_tool: str | None = None) -> pb.ChatResponse:
    """A Messages API reply; KeyError, TypeError, ValueError or AttributeError for a malformed one.
    ``format_tool``: the forced tool that carries response_format, whose input becomes the content."""
    text: list[str] = []
    reasoning: list[str] = []
    extra: dict[str, Any] = {}
    message = pb.ChatMessage(role=pb.ROLE_ASSISTANT)
    for block in body["content"]:
        kind = block.get("type")
        if kind == "text":
            text.append(block["text"])
        elif kind == "thinking":
            reasoning.append(block["thinking"])
            extra[SIGNATURE] = block.get("signature", "")
        elif kind == "redacted_thinking":
            extra.setdefault(REDACTED, []).append(block["data"])
        elif kind == "tool_use" and format_tool is not None and block["name"] == format_tool:
            text.append(orjson.dumps(block["input"]).decode())
        elif kind == "tool_use":
            message.tool_calls.add(
                id=str(block["id"]), type="function", name=str(block["name"]),
                arguments=orjson.dumps(block["input"]).decode(),
            )  # fmt: skip
    if text or not message.tool_calls:
        message.content = "".join(text)
    if reasoning:
        message.reasoning_content = "".join(reasoning)
    if not all(_plain(b) for b in body["content"]):  # server tool blocks, citations, ...: kept whole
        extra[CONTENT] = body["content"]
    if extra:
        message.extra_json = orjson.dumps(extra).decode()
    finish = _finish(body.get("stop_reason"), format_tool)
    usage = usage_from_json(body.get("usage") or {})
    resp = pb.ChatResponse(
        id=str(body["id"]),
        model=str(body.get("model", model)),
        content=message.content,
        finish_reason=_FINISH_ENUM[finish],
        usage=usage,
        created=int(time.time()),
    )
    choice = resp.choices.add(index=0, message=message, finish_reason=finish)
    if body.get("stop_sequence") is not None:
        choice.extra_json = orjson.dumps({"stop_sequence": body["stop_sequence"]}).decode()
    return resp


async def read_stream(
    events: AsyncIterable[tuple[str, bytes]],
    model: str,
    on_error: Callable[[dict[str, Any]], Exception],
    *,
    format_tool: str | None = None,
) -> AsyncIterator[pb.ChatChunk]:
    """The chunks of a Messages API event stream ((event name, data) pairs) in OpenAI's layout: a role chunk,
    content, reasoning (its signature as ``reasoning_signature`` in the delta's extra_json) and tool-call
    fragments, a finish chunk, and a usage chunk with no choices (always: the gateway counts its tokens, and
    :func:`llmgw.chat.to_openai_layout` leaves it out for a client that did not ask for it).

    An ``error`` event raises ``on_error(its error object)``; malformed data or a stream that ends without
    ``message_delta`` raises ValueError (or KeyError/TypeError/AttributeError for a wrong shape).
    """
    msg_id, msg_model, created = "", model, int(time.time())
    usage: dict[str, Any] = {}
    finish: str | None = None
    blocks: dict[int, tuple[str, int]] = {}  # content block index -> (type, tool call index)
    held: dict[int, tuple[dict[str, Any], list[Any]]] = {}  # other blocks: index -> (start, deltas)
    held_bytes = 0
    calls = 0

    def chunk() -> tuple[pb.ChatChunk, pb.ChunkDelta]:
        out = pb.ChatChunk(id=msg_id, model=msg_model, created=created)
        choice = out.choices.add(index=0)
        return out, choice.delta

    async for event, data in events:
        body = orjson.loads(data)
        kind = body.get("type") or event
        if kind == "content_block_delta" and int(body["index"]) in held:
            held_bytes += len(data)
            if held_bytes > _MAX_HELD_BLOCK_BYTES:
                raise ValueError(f"a content block's deltas exceed {_MAX_HELD_BLOCK_BYTES} bytes")
            held[int(body["index"])][1].append(body["delta"])
        elif kind == "content_block_stop" and int(body["index"]) in held:
            start, deltas = held.pop(int(body["index"]))
            held_bytes = 0
            out, d = chunk()
            d.extra_json = orjson.dumps({BLOCK: {"start": start, "deltas": deltas}}).decode()
            yield out
        elif kind == "content_block_delta":
            delta = body["delta"]
            dtype = delta.get("type")
            btype, call = blocks.get(int(body["index"]), ("text", -1))
            out, d = chunk()
            if dtype == "text_delta":
                d.content = delta["text"]
            elif dtype == "input_json_delta" and btype == "format":
                d.content = delta["partial_json"]
            elif dtype == "input_json_delta" and btype == "tool_use":
                d.tool_calls.add(index=call, arguments=delta["partial_json"])
            elif dtype == "thinking_delta":
                d.reasoning_content = delta["thinking"]
            elif dtype == "signature_delta":
                d.extra_json = orjson.dumps({SIGNATURE: delta["signature"]}).decode()
            elif dtype == "citations_delta":
                d.extra_json = orjson.dumps({CITATION: delta["citation"]}).decode()
            else:
                raise ValueError(f"a {dtype!r} delta in a {btype!r} block")
            yield out
        elif kind == "content_block_start":
            block = body["content_block"]
            btype = block.get("type")
            index = int(body["index"])
            if btype == "tool_use" and format_tool is not None and block.get("name") == format_tool:
                blocks[index] = ("format", -1)
            elif btype == "tool_use":
                blocks[index] = ("tool_use", calls)
                out, d = chunk()
                d.tool_calls.add(
                    index=calls, id=str(block["id"]), type="function", name=str(block["name"]), arguments=""
                )
                calls += 1
                yield out
            elif btype == "redacted_thinking":
                blocks[index] = (btype, -1)
                out, d = chunk()
                d.extra_json = orjson.dumps({REDACTED: [block["data"]]}).decode()
                yield out
            elif btype in ("text", "thinking") and not block.get("citations"):
                blocks[index] = (str(btype), -1)
                if btype == "text" and block.get("text"):
                    out, d = chunk()
                    d.content = block["text"]
                    yield out
            else:  # a block the hub has no field for: passed on whole once it is complete
                held[index] = (block, [])
        elif kind == "message_start":
            message = body["message"]
            msg_id, msg_model = str(message["id"]), str(message.get("model", model))
            usage = dict(message.get("usage") or {})
            out, d = chunk()
            d.role, d.content = "assistant", ""
            yield out
        elif kind == "message_delta":
            finish = _finish((body.get("delta") or {}).get("stop_reason"), format_tool)
            usage.update({k: v for k, v in (body.get("usage") or {}).items() if v is not None})
        elif kind == "message_stop":
            break
        elif kind == "error":
            raise on_error(body.get("error") or {})
    if finish is None:
        raise ValueError("stream ended without message_delta")
    out = pb.ChatChunk(id=msg_id, model=msg_model, created=created)
    out.choices.add(index=0, finish_reason=finish)
    yield out
    yield pb.ChatChunk(id=msg_id, model=msg_model, created=created, usage=usage_from_json(usage))


# -- Messages API requests -> hub (the Messages front) -------------------------------------------------


def _invalid(message: str) -> GatewayError:
    return GatewayError(Kind.INVALID_ARGUMENT, message)


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _invalid(f"{where}: Input should be a valid dictionary")
    return value


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise _invalid(f"{where}: Input should be a valid string")
    return value


def _number(value: Any, where: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise _invalid(f"{where}: Input should be a number between {low:g} and {high:g}")
    return float(value)


def _part_from_block(block: dict[str, Any], where: str, native: bool) -> pb.ContentPart:
    """A user or system content block as a hub part: typed when it has OpenAI's equivalent, else (for an
    Anthropic provider) the block itself as the part's JSON."""
    kind = _string(block.get("type"), f"{where}.type")
    plain = set(block) <= {"type", "text", "source"}
    if kind == "text" and (plain or not native):
        return pb.ContentPart(type="text", text=_string(block.get("text"), f"{where}.text"))
    if kind == "image" and (plain or not native):
        source = _object(block.get("source"), f"{where}.source")
        if source.get("type") == "base64":
            url = f"data:{_string(source.get('media_type'), f'{where}.source.media_type')};base64,"
            url += _string(source.get("data"), f"{where}.source.data")
        elif source.get("type") == "url":
            url = _string(source.get("url"), f"{where}.source.url")
        else:
            raise _invalid(f"{where}.source.type: an image's source must be base64 or url here")
        return pb.ContentPart(type="image_url", image_url=pb.ImageUrl(url=url))
    if kind == "document" and not native:
        source = _object(block.get("source"), f"{where}.source")
        if source.get("type") == "base64":
            data = f"data:{source.get('media_type')};base64,{source.get('data')}"
            part = pb.ContentPart(type="file", file=pb.FileData(file_data=data))
            if isinstance(block.get("title"), str):
                part.file.filename = block["title"]
            return part
    if native:
        return pb.ContentPart(type=kind, json=orjson.dumps(block).decode())
    raise _invalid(f"{where}: content blocks of type {clip(kind)} can only be sent to Anthropic providers")


def _content(content: Any, where: str, native: bool) -> tuple[str | None, list[pb.ContentPart]]:
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise _invalid(f"{where}: Input should be a valid string or a list of content blocks")
    return None, [
        _part_from_block(_object(b, f"{where}.{j}"), f"{where}.{j}", native) for j, b in enumerate(content)
    ]


def _set_content(m: pb.ChatMessage, content: Any, where: str, native: bool) -> None:
    text, parts = _content(content, where, native)
    if text is not None:
        m.content = text
    m.parts.extend(parts)


def _user_turn(req: pb.ChatRequest, content: Any, where: str, native: bool) -> None:
    """A user turn: its tool results as tool messages, then the rest as one user message."""
    if not isinstance(content, list):
        _set_content(req.messages.add(role=pb.ROLE_USER), content, where, native)
        return
    rest: list[Any] = []
    for j, block in enumerate(content):
        at = f"{where}.{j}"
        if _object(block, at).get("type") != "tool_result":
            rest.append(block)
            continue
        m = req.messages.add(
            role=pb.ROLE_TOOL, tool_call_id=_string(block.get("tool_use_id"), f"{at}.tool_use_id")
        )
        _set_content(m, block.get("content", ""), f"{at}.content", native)
        extra = {IS_ERROR: True} if block.get("is_error") else {}
        if block.get("cache_control") is not None:
            if not native:
                raise _invalid(f"{at}.cache_control: can only be sent to Anthropic providers")
            extra[CACHE_CONTROL] = block["cache_control"]
        if extra:
            m.extra_json = orjson.dumps(extra).decode()
    if rest or not content:
        req.messages.add(role=pb.ROLE_USER).parts.extend(_content(rest, where, native)[1])


def _assistant_turn(req: pb.ChatRequest, content: Any, where: str, native: bool) -> None:
    m = req.messages.add(role=pb.ROLE_ASSISTANT)
    if isinstance(content, str):
        m.content = content
        return
    if not isinstance(content, list):
        raise _invalid(f"{where}: Input should be a valid string or a list of content blocks")
    text: list[str] = []
    reasoning: list[str] = []
    extra: dict[str, Any] = {}
    for j, block in enumerate(content):
        at = f"{where}.{j}"
        kind = _object(block, at).get("type")
        if kind == "text":
            text.append(_string(block.get("text"), f"{at}.text"))
        elif kind == "thinking":
            reasoning.append(_string(block.get("thinking"), f"{at}.thinking"))
            extra[SIGNATURE] = _string(block.get("signature", ""), f"{at}.signature")
        elif kind == "redacted_thinking":
            extra.setdefault(REDACTED, []).append(_string(block.get("data"), f"{at}.data"))
        elif kind == "tool_use":
            m.tool_calls.add(
                id=_string(block.get("id"), f"{at}.id"), type="function", name=_string(block.get("name"), f"{at}.name"),
                arguments=orjson.dumps(_object(block.get("input"), f"{at}.input")).decode(),
            )  # fmt: skip
        elif native:  # a server tool's blocks (server_tool_use, web_search_tool_result, ...): kept whole
            extra[CONTENT] = content
        else:
            raise _invalid(
                f"{at}: assistant content blocks of type {clip(kind)} can only be sent to Anthropic providers"
            )
    if text or not m.tool_calls:
        m.content = "".join(text)
    if reasoning:
        m.reasoning_content = "".join(reasoning)
    if extra and native:  # a signature means nothing to other providers
        m.extra_json = orjson.dumps(extra).decode()


def _tool_from_json(tool: Any, where: str, native: bool) -> pb.Tool:
    tool = _object(tool, where)
    if (
        set(tool) <= {"name", "description", "input_schema", "type"}
        and tool.get("type", "custom") == "custom"
    ):
        f = pb.FunctionDefinition(name=_string(tool.get("name"), f"{where}.name"))
        if "description" in tool:
            f.description = _string(tool["description"], f"{where}.description")
        f.parameters_json = orjson.dumps(_object(tool.get("input_schema"), f"{where}.input_schema")).decode()
        out = pb.Tool(type="function", function=f)
        if native and "type" in tool:
            out.json = orjson.dumps(tool).decode()
        return out
    if native:
        return pb.Tool(type=str(tool.get("type", "custom")), json=orjson.dumps(tool).decode())
    raise _invalid(
        f"{where}: tools of type {clip(tool.get('type'))} (or with cache_control) can only be sent to Anthropic providers"
    )


def _effort(thinking: dict[str, Any]) -> str | None:
    if thinking.get("type") != "enabled":
        return None
    budget = thinking.get("budget_tokens") or 0
    for name, tokens in THINKING_BUDGET.items():
        if budget <= tokens:
            return name
    return "high"


_BETA = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MAX_BETAS = 32


def betas(header: str | None) -> list[str]:
    """The beta names of an ``anthropic-beta`` header (comma-separated), checked: at most 32 names, each of
    letters, digits, ``.``, ``_`` and ``-`` (128 characters at most), so that they go on unchanged."""
    if not header:
        return []
    names = [name.strip() for name in header.split(",") if name.strip()]
    if len(names) > MAX_BETAS:
        raise _invalid(f"anthropic-beta: at most {MAX_BETAS} betas, got {len(names)}")
    for name in names:
        if not _BETA.fullmatch(name):
            raise _invalid(
                f"anthropic-beta: {clip(name)} is not a beta name (letters, digits, '.', '_', '-')"
            )
    return names


def request_from_json(body: Any, *, native: bool) -> tuple[pb.ChatRequest, bool]:
    """A Messages API request as a hub request, and whether it asks for a stream. ``native``: the model is
    served by an Anthropic provider, so what only Anthropic understands (thinking, top_k, cache_control,
    server tools, documents) is kept as it is; else it is translated (thinking to reasoning_effort) or refused."""
    body = _object(body, "body")
    req = pb.ChatRequest()
    extra: dict[str, Any] = {}
    req.model = _string(body.get("model"), "model")
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise _invalid("max_tokens: Field required (an integer of at least 1)")
    req.max_tokens = max_tokens
    system = body.get("system")
    if system is not None and system != []:
        _set_content(req.messages.add(role=pb.ROLE_SYSTEM), system, "system", native)
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise _invalid("messages: Field required (a list of messages)")
    for i, message in enumerate(messages):
        where = f"messages.{i}"
        message = _object(message, where)
        if "content" not in message:
            raise _invalid(f"{where}.content: Field required")
        if message.get("role") == "user":
            _user_turn(req, message["content"], f"{where}.content", native)
        elif message.get("role") == "assistant":
            _assistant_turn(req, message["content"], f"{where}.content", native)
        else:
            raise _invalid(f"{where}.role: Input should be 'user' or 'assistant'")
    for key, (low, high) in (("temperature", (0.0, 1.0)), ("top_p", (0.0, 1.0))):
        if body.get(key) is not None:
            value = body[key]
            setattr(req, key, _number(value, key, low, high))
            if isinstance(value, int) or round(getattr(req, key), 6) != value:
                extra[key] = value  # the exact JSON number, which float32 would not give back
    if body.get("stop_sequences") is not None:
        stop = body["stop_sequences"]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise _invalid("stop_sequences: Input should be a valid list of strings")
        req.stop.extend(stop)
    metadata = body.get("metadata")
    if metadata is not None:
        metadata = _object(metadata, "metadata")
        if metadata.get("user_id") is not None:
            req.user = _string(metadata["user_id"], "metadata.user_id")
    for i, tool in enumerate(body.get("tools") or ()):
        req.tools.append(_tool_from_json(tool, f"tools.{i}", native))
    choice = body.get("tool_choice")
    if choice is not None:
        choice = _object(choice, "tool_choice")
        kind = choice.get("type")
        if kind in ("auto", "any", "none"):
            req.tool_choice.mode = {"auto": "auto", "any": "required", "none": "none"}[kind]
        elif kind == "tool":
            req.tool_choice.function_name = _string(choice.get("name"), "tool_choice.name")
        else:
            raise _invalid("tool_choice.type: Input should be 'auto', 'any', 'tool' or 'none'")
        if choice.get("disable_parallel_tool_use") is True:
            req.parallel_tool_calls = False
    thinking = body.get("thinking")
    if thinking is not None:
        thinking = _object(thinking, "thinking")
        if native:
            extra["thinking"] = thinking
        elif (effort := _effort(thinking)) is not None:
            req.reasoning_effort = effort
    if body.get("top_k") is not None:
        extra["top_k"] = body["top_k"]
    for key in sorted(PASSED_KEYS - {"thinking", "top_k"}):
        if body.get(key) is not None:
            if not native:
                raise _invalid(f"{key}: can only be sent to Anthropic providers")
            extra[key] = body[key]
    if body.get("service_tier") not in (None, "auto"):
        raise _invalid(f"service_tier: {clip(body['service_tier'])} is not carried yet (only 'auto')")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise _invalid("stream: Input should be a valid boolean")
    known = {
        "model", "max_tokens", "system", "messages", "temperature", "top_p", "top_k", "stop_sequences",
        "metadata", "tools", "tool_choice", "thinking", "stream", "service_tier", *PASSED_KEYS,
    }  # fmt: skip
    for key in body:
        if key not in known:
            raise _invalid(f"{clip_text(key)}: Extra inputs are not permitted")
    if extra:
        req.extra_json = orjson.dumps(extra).decode()
    if stream:
        req.stream_options.include_usage = True
    return req, stream


# -- hub replies -> Messages API (the Messages front) ----------------------------------------------------


STOP_REASON_BY_FINISH = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


def usage_to_json(usage: pb.Usage | None) -> dict[str, Any]:
    if usage is None:
        return {"input_tokens": 0, "output_tokens": 0}
    read = usage.prompt_tokens_details.cached_tokens
    written = int(_extra(usage.prompt_tokens_details.extra_json).get("cache_creation_input_tokens") or 0)
    body = {
        "input_tokens": max(0, usage.prompt_tokens - read - written),
        "cache_creation_input_tokens": written,
        "cache_read_input_tokens": read,
        "output_tokens": usage.completion_tokens,
    }
    for key, value in _extra(usage.extra_json).items():  # an Anthropic provider's own keys
        if key not in body and key not in ("prompt_tokens", "completion_tokens", "total_tokens"):
            body[key] = value
    return body


def _arguments(text: str) -> Any:
    try:
        value = orjson.loads(text or "{}")
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def response_to_json(resp: pb.ChatResponse) -> dict[str, Any]:
    """A hub reply as a Messages API ``message``."""
    if resp.choices:
        choice = resp.choices[0]
        m = choice.message
        finish = choice.finish_reason if choice.HasField("finish_reason") else "stop"
        stop_sequence = _extra(choice.extra_json).get("stop_sequence")
    else:
        m = pb.ChatMessage(role=pb.ROLE_ASSISTANT, content=resp.content)
        finish = FINISH_NAME.get(resp.finish_reason, "stop")
        stop_sequence = None
    return {
        "id": resp.id,
        "type": "message",
        "role": "assistant",
        "model": resp.model,
        "content": _reply_blocks(m),
        "stop_reason": STOP_REASON_BY_FINISH.get(finish, "end_turn"),
        "stop_sequence": stop_sequence,
        "usage": usage_to_json(resp.usage if resp.HasField("usage") else None),
    }


def _reply_blocks(m: pb.ChatMessage) -> list[dict[str, Any]]:
    extra = _extra(m.extra_json)
    if isinstance(extra.get(CONTENT), list):  # an Anthropic provider's blocks, kept whole
        return list(extra[CONTENT])
    content: list[dict[str, Any]] = []
    if m.HasField("reasoning_content"):
        content.append(
            {"type": "thinking", "thinking": m.reasoning_content, "signature": extra.get(SIGNATURE, "")}
        )
    for data in extra.get(REDACTED) or ():
        content.append({"type": "redacted_thinking", "data": data})
    text = m.content if not m.parts else "".join(p.text for p in m.parts if p.type == "text")
    if m.HasField("refusal") and m.refusal:
        text += m.refusal
    if text:
        content.append({"type": "text", "text": text})
    for call in m.tool_calls:
        content.append(
            {"type": "tool_use", "id": call.id, "name": call.name, "input": _arguments(call.arguments)}
        )
    return content


def event(name: str, data: Any) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


class EventWriter:
    """A hub stream (chunks in OpenAI's layout) as the Messages API's event sequence: ``message_start``,
    each content block's (``ping`` after the first block's start) ``content_block_start``, ``content_block_delta``s and
    ``content_block_stop``, then ``message_delta`` with the stop reason and the usage, and ``message_stop``."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.started = False
        self.index = -1  # the open content block, -1 for none
        self.open_type = ""
        self.finish = "stop"
        self.usage: pb.Usage | None = None
        self.pinged = False  # Anthropic sends a ping after the first block's start
        self.calls: dict[int, list[Any]] = {}  # tool call index -> [id, name, its block's index or None]

    def _close(self, out: list[bytes]) -> None:
        if self.open_type:
            out.append(event("content_block_stop", {"type": "content_block_stop", "index": self.index}))
            self.open_type = ""

    def _open(self, out: list[bytes], block: dict[str, Any]) -> None:
        self._close(out)
        self.index += 1
        self.open_type = block["type"]
        out.append(
            event(
                "content_block_start",
                {"type": "content_block_start", "index": self.index, "content_block": block},
            )
        )
        if not self.pinged:
            self.pinged = True
            out.append(event("ping", {"type": "ping"}))

    def _delta(self, out: list[bytes], delta: dict[str, Any], index: int | None = None) -> None:
        index = self.index if index is None else index
        out.append(
            event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})
        )

    def _call_block(self, out: list[bytes], call: int) -> int:
        """The block of tool call ``call``, opened now if it is not yet."""
        entry = self.calls[call]
        if entry[2] is None:
            self._open(out, {"type": "tool_use", "id": entry[0], "name": entry[1], "input": {}})
            entry[2] = self.index
        return int(entry[2])

    def feed(self, chunk: pb.ChatChunk) -> bytes:
        out: list[bytes] = []
        if not self.started:
            self.started = True
            message: dict[str, Any] = {
                "id": chunk.id, "type": "message", "role": "assistant", "model": chunk.model or self.model,
                "content": [], "stop_reason": None, "stop_sequence": None,
                "usage": {"input_tokens": 0, "output_tokens": 0},
            }  # fmt: skip
            out.append(event("message_start", {"type": "message_start", "message": message}))
        if chunk.HasField("usage"):
            self.usage = chunk.usage
        for choice in chunk.choices:
            if choice.index != 0:
                continue
            d = choice.delta
            extra = _extra(d.extra_json)
            if d.HasField("reasoning_content") and d.reasoning_content:
                if self.open_type != "thinking":
                    self._open(out, {"type": "thinking", "thinking": "", "signature": ""})
                self._delta(out, {"type": "thinking_delta", "thinking": d.reasoning_content})
            if extra.get(SIGNATURE):
                if self.open_type != "thinking":
                    self._open(out, {"type": "thinking", "thinking": "", "signature": ""})
                self._delta(out, {"type": "signature_delta", "signature": extra[SIGNATURE]})
            for data in extra.get(REDACTED) or ():
                self._open(out, {"type": "redacted_thinking", "data": data})
            if CITATION in extra:
                if self.open_type != "text":
                    self._open(out, {"type": "text", "text": ""})
                self._delta(out, {"type": "citations_delta", "citation": extra[CITATION]})
            if BLOCK in extra:
                self._open(out, extra[BLOCK]["start"])
                for block_delta in extra[BLOCK]["deltas"]:
                    self._delta(out, block_delta)
                self._close(out)
            text = (d.content if d.HasField("content") else "") + (d.refusal if d.HasField("refusal") else "")
            if text:
                if self.open_type != "text":
                    self._open(out, {"type": "text", "text": ""})
                self._delta(out, {"type": "text_delta", "text": text})
            for call in d.tool_calls:
                if call.HasField("id"):  # its block opens with its first arguments: an OpenAI-compatible
                    self.calls[call.index] = [call.id, call.name, None]  # stream may send reasoning between
                elif call.index in self.calls and call.HasField("name"):
                    self.calls[call.index][1] += call.name
                if call.arguments and call.index in self.calls:
                    self._delta(
                        out,
                        {"type": "input_json_delta", "partial_json": call.arguments},
                        self._call_block(out, call.index),
                    )
            if choice.HasField("finish_reason"):
                self.finish = choice.finish_reason
        return b"".join(out)

    def end(self) -> bytes:
        out: list[bytes] = []
        for call in sorted(self.calls):  # a call without arguments
            self._call_block(out, call)
        self._close(out)
        if not self.pinged:
            out.append(event("ping", {"type": "ping"}))
        delta = {"stop_reason": STOP_REASON_BY_FINISH.get(self.finish, "end_turn"), "stop_sequence": None}
        out.append(
            event(
                "message_delta", {"type": "message_delta", "delta": delta, "usage": usage_to_json(self.usage)}
            )
        )
        out.append(event("message_stop", {"type": "message_stop"}))
        return b"".join(out)


def error_json(error_type: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type, "message": message}}
