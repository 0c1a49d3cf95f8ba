"""OpenAI Chat Completions JSON <-> the gateway's protobuf messages, losslessly.

Used by the REST front (clients speak OpenAI's API), by the ``openai`` provider client (providers speak it) and by
the client library. Request parsing names the offending field in every error, so that a client sees
``messages[2].role: unknown role 'robot'`` and not a stack trace.

Lossless both ways: every object is read into its typed fields, written back, and whatever the typed fields do
not reproduce exactly (an unknown key, a vendor extra such as ``top_k``, a key sent as null, a float that
float32 would round) is kept verbatim in the object's ``extra_json`` and merged back when it is written out.
Small objects with several shapes (a content part, a tool, a tool call, ``tool_choice``, ``response_format``)
are kept whole in their ``json`` field when their shape is not the typed one. So a request reaches an
OpenAI-compatible provider, and its answer the client, unchanged but for the model name and key order.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import Any

import orjson

from llmgateway.v1 import llm_service_pb2 as pb
from llmgw.chat import (
    FINISH_BY_NAME,
    FINISH_NAME,
    MAX_STOP_SEQUENCES,
    ROLE_BY_NAME,
    ROLE_NAME,
    clip,
    invalid,
    to_simple_layout,
)

_INT32_MAX = 2**31 - 1
_INT64 = 2**63


# -- JSON helpers ---------------------------------------------------------------------------------------


def _extra(obj: dict[str, Any], typed: dict[str, Any]) -> str:
    """The keys of ``obj`` that ``typed`` (what the typed fields write back) does not reproduce, as JSON."""
    extra = {k: v for k, v in obj.items() if k not in typed or typed[k] != v or type(typed[k]) is not type(v)}
    return orjson.dumps(extra).decode() if extra else ""


def _merge(body: dict[str, Any], extra_json: str) -> dict[str, Any]:
    if extra_json:
        body.update(orjson.loads(extra_json))
    return body


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(body: dict[str, Any], key: str) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid(f"{key}: must be a number, got {type(value).__name__}")
    return float(value)


def _int(body: dict[str, Any], key: str, low: int, high: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if not _is_int(value):
        raise invalid(f"{key}: must be an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise invalid(f"{key}: {value} must be between {low} and {high}")
    return int(value)


def _typed(body: dict[str, Any], key: str, kind: type, where: str = "") -> Any:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        name = {str: "a string", bool: "true or false", dict: "an object", list: "a list"}[kind]
        raise invalid(f"{where}{key}: must be {name}, got {type(value).__name__}")
    return value


def _float32(value: float) -> float:
    """A float32 field as JSON: the shortest decimal that reads back as the same float32."""
    return round(value, 6)


def _num(value: float) -> int | float:
    return int(value) if value.is_integer() else value


# -- content parts, tools, tool calls ---------------------------------------------------------------------


def _part_from_json(p: Any, where: str) -> pb.ContentPart:
    if not isinstance(p, dict) or not isinstance(p.get("type"), str):
        raise invalid(f"{where}: must be an object with a type")
    kind = p["type"]
    part = pb.ContentPart(type=kind)
    if kind == "text" and isinstance(p.get("text"), str):
        part.text = p["text"]
    elif kind == "image_url" and isinstance(p.get("image_url"), dict):
        image = p["image_url"]
        if isinstance(image.get("url"), str):
            part.image_url.url = image["url"]
        if isinstance(image.get("detail"), str):
            part.image_url.detail = image["detail"]
    elif kind == "input_audio" and isinstance(p.get("input_audio"), dict):
        audio = p["input_audio"]
        if isinstance(audio.get("data"), str) and isinstance(audio.get("format"), str):
            part.input_audio.data, part.input_audio.format = audio["data"], audio["format"]
    elif kind == "file" and isinstance(p.get("file"), dict):
        file = p["file"]
        for key in ("file_data", "file_id", "filename"):
            if isinstance(file.get(key), str):
                setattr(part.file, key, file[key])
    if part_to_json(part) != p:
        return pb.ContentPart(type=kind, json=_dumps(p))
    return part


def part_to_json(part: pb.ContentPart) -> dict[str, Any]:
    if part.json:
        return orjson.loads(part.json)
    body: dict[str, Any] = {"type": part.type}
    if part.type == "text":
        body["text"] = part.text
    elif part.type == "image_url":
        image: dict[str, Any] = {"url": part.image_url.url}
        if part.image_url.HasField("detail"):
            image["detail"] = part.image_url.detail
        body["image_url"] = image
    elif part.type == "input_audio":
        body["input_audio"] = {"data": part.input_audio.data, "format": part.input_audio.format}
    elif part.type == "file":
        body["file"] = {
            k: getattr(part.file, k) for k in ("file_data", "file_id", "filename") if part.file.HasField(k)
        }
    return body


def _tool_call_from_json(c: Any, where: str) -> pb.ToolCall:
    if not isinstance(c, dict):
        raise invalid(f"{where}: must be an object")
    call = pb.ToolCall()
    function = c.get("function")
    if (
        c.get("type") == "function"
        and isinstance(c.get("id"), str)
        and isinstance(function, dict)
        and isinstance(function.get("name"), str)
        and isinstance(function.get("arguments"), str)
    ):
        call = pb.ToolCall(
            id=c["id"], type="function", name=function["name"], arguments=function["arguments"]
        )
        if tool_call_to_json(call) == c:
            return call
    return pb.ToolCall(type=str(c.get("type", "")), json=_dumps(c))


def tool_call_to_json(call: pb.ToolCall) -> dict[str, Any]:
    if call.json:
        return orjson.loads(call.json)
    return {"id": call.id, "type": call.type, "function": {"name": call.name, "arguments": call.arguments}}


def _tool_from_json(t: Any, where: str) -> pb.Tool:
    if not isinstance(t, dict) or not isinstance(t.get("type"), str):
        raise invalid(f"{where}: must be an object with a type")
    function = t.get("function")
    if t["type"] == "function" and isinstance(function, dict) and isinstance(function.get("name"), str):
        tool = pb.Tool(type="function")
        f = tool.function
        f.name = function["name"]
        if isinstance(function.get("description"), str):
            f.description = function["description"]
        if isinstance(function.get("parameters"), dict):
            f.parameters_json = _dumps(function["parameters"])
        if isinstance(function.get("strict"), bool):
            f.strict = function["strict"]
        if tool_to_json(tool) == t:
            return tool
    elif t["type"] == "function":
        raise invalid(f"{where}.function: must be an object with a name")
    return pb.Tool(type=t["type"], json=_dumps(t))


def tool_to_json(tool: pb.Tool) -> dict[str, Any]:
    if tool.json:
        return orjson.loads(tool.json)
    f = tool.function
    function: dict[str, Any] = {"name": f.name}
    if f.HasField("description"):
        function["description"] = f.description
    if f.HasField("parameters_json"):
        function["parameters"] = orjson.loads(f.parameters_json)
    if f.HasField("strict"):
        function["strict"] = f.strict
    return {"type": tool.type, "function": function}


def _tool_choice_from_json(value: Any) -> pb.ToolChoice:
    if isinstance(value, str):
        return pb.ToolChoice(mode=value)
    if not isinstance(value, dict):
        raise invalid("tool_choice: must be a string or an object")
    function = value.get("function")
    if (
        len(value) == 2
        and value.get("type") == "function"
        and isinstance(function, dict)
        and list(function) == ["name"]
        and isinstance(function["name"], str)
    ):
        return pb.ToolChoice(function_name=function["name"])
    return pb.ToolChoice(json=_dumps(value))


def tool_choice_to_json(choice: pb.ToolChoice) -> Any:
    which = choice.WhichOneof("choice")
    if which == "mode":
        return choice.mode
    if which == "function_name":
        return {"type": "function", "function": {"name": choice.function_name}}
    return orjson.loads(choice.json) if choice.json else None


def _response_format_from_json(value: Any) -> pb.ResponseFormat:
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise invalid("response_format: must be an object with a type")
    fmt = pb.ResponseFormat(type=value["type"])
    schema = value.get("json_schema")
    if value["type"] == "json_schema" and isinstance(schema, dict) and isinstance(schema.get("name"), str):
        js = fmt.json_schema
        js.name = schema["name"]
        if isinstance(schema.get("description"), str):
            js.description = schema["description"]
        if isinstance(schema.get("schema"), dict):
            js.schema_json = _dumps(schema["schema"])
        if isinstance(schema.get("strict"), bool):
            js.strict = schema["strict"]
    if response_format_to_json(fmt) != value:
        return pb.ResponseFormat(type=value["type"], json=_dumps(value))
    return fmt


def response_format_to_json(fmt: pb.ResponseFormat) -> dict[str, Any]:
    if fmt.json:
        return orjson.loads(fmt.json)
    body: dict[str, Any] = {"type": fmt.type}
    if fmt.HasField("json_schema"):
        js = fmt.json_schema
        schema: dict[str, Any] = {"name": js.name}
        if js.HasField("description"):
            schema["description"] = js.description
        if js.HasField("schema_json"):
            schema["schema"] = orjson.loads(js.schema_json)
        if js.HasField("strict"):
            schema["strict"] = js.strict
        body["json_schema"] = schema
    return body


# -- messages ---------------------------------------------------------------------------------------------


def message_from_json(m: Any, where: str) -> pb.ChatMessage:
    """One message of a request, or a reply's message."""
    if not isinstance(m, dict):
        raise invalid(f"{where}: must be an object with role and content")
    role = m.get("role")
    if not isinstance(role, str) or role not in ROLE_BY_NAME:
        raise invalid(f"{where}.role: unknown role {clip(role)} (expected one of {', '.join(ROLE_BY_NAME)})")
    msg = pb.ChatMessage(role=ROLE_BY_NAME[role])
    content = m.get("content")
    if isinstance(content, str):
        msg.content = content
    elif isinstance(content, list):
        msg.parts.extend(_part_from_json(p, f"{where}.content[{j}]") for j, p in enumerate(content))
    elif content is not None:
        raise invalid(f"{where}.content: must be a string or a list of content parts")
    for key in ("name", "tool_call_id", "refusal", "reasoning_content"):
        value = _typed(m, key, str, f"{where}.")
        if value is not None:
            setattr(msg, key, value)
    calls = _typed(m, "tool_calls", list, f"{where}.")
    if calls:
        msg.tool_calls.extend(
            _tool_call_from_json(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(calls)
        )
    msg.extra_json = _extra(m, message_to_json(msg))
    return msg


def message_to_json(m: pb.ChatMessage) -> dict[str, Any]:
    item: dict[str, Any] = {"role": ROLE_NAME.get(m.role, "user")}
    if m.parts:
        item["content"] = [part_to_json(p) for p in m.parts]
    elif m.HasField("content"):
        item["content"] = m.content
    elif m.role != pb.ROLE_ASSISTANT:
        item["content"] = ""  # a message of a gRPC client that left its text empty
    if m.HasField("name"):
        item["name"] = m.name
    if m.tool_calls:
        item["tool_calls"] = [tool_call_to_json(c) for c in m.tool_calls]
    for key in ("tool_call_id", "refusal", "reasoning_content"):
        if m.HasField(key):
            item[key] = getattr(m, key)
    return _merge(item, m.extra_json)


# -- requests ---------------------------------------------------------------------------------------------

# Request fields with a scalar protobuf field of the same name.
_BOOLS = ("parallel_tool_calls", "logprobs", "store")
_STRINGS = ("user", "reasoning_effort", "service_tier")


def request_from_json(body: Any) -> tuple[pb.ChatRequest, bool]:
    """Parse an OpenAI chat request body; returns the request and whether it asked for a stream.

    Every field reaches the request: the ones the gateway knows into their typed fields (checked, naming the
    field in errors), any other (vendor extras such as ``top_k``) and any sent as null into ``extra_json``.
    """
    if not isinstance(body, dict):
        raise invalid("request body: must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("model: required, a non-empty string")
    raw_messages = body.get("messages")
    if not isinstance(raw_messages, list):
        raise invalid("messages: required, a list of messages")
    req = pb.ChatRequest(model=model)
    req.messages.extend(message_from_json(m, f"messages[{i}]") for i, m in enumerate(raw_messages))
    temperature = _number(body, "temperature")
    if temperature is not None:
        req.temperature = temperature
    top_p = _number(body, "top_p")
    if top_p is not None:
        req.top_p = top_p
    for key in ("max_tokens", "max_completion_tokens"):
        value = _int(body, key, 1, _INT32_MAX)
        if value is not None:
            setattr(req, key, value)
    stop = body.get("stop")
    if isinstance(stop, str):
        req.stop.append(stop)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        if len(stop) > MAX_STOP_SEQUENCES:
            raise invalid(f"stop: at most {MAX_STOP_SEQUENCES} sequences, got {len(stop)}")
        req.stop.extend(stop)
    elif stop is not None:
        raise invalid("stop: must be a string or a list of strings")
    for key in _STRINGS:
        value = _typed(body, key, str)
        if value is not None:
            setattr(req, key, value)
    for key in _BOOLS:
        value = _typed(body, key, bool)
        if value is not None:
            setattr(req, key, value)
    metadata = _typed(body, "metadata", dict)
    if metadata is not None:
        if not all(isinstance(v, str) for v in metadata.values()):
            raise invalid("metadata: must be an object of string values")
        req.metadata.update(metadata)
    tools = _typed(body, "tools", list)
    if tools is not None:
        req.tools.extend(_tool_from_json(t, f"tools[{i}]") for i, t in enumerate(tools))
    if body.get("tool_choice") is not None:
        req.tool_choice.CopyFrom(_tool_choice_from_json(body["tool_choice"]))
    if body.get("response_format") is not None:
        req.response_format.CopyFrom(_response_format_from_json(body["response_format"]))
    for key, low, high in (("n", 1, 128), ("top_logprobs", 0, 20)):
        value = _int(body, key, low, high)
        if value is not None:
            setattr(req, key, value)
    seed = _int(body, "seed", -_INT64, _INT64 - 1)
    if seed is not None:
        req.seed = seed
    for key in ("presence_penalty", "frequency_penalty"):
        penalty = _number(body, key)
        if penalty is not None:
            setattr(req, key, penalty)
    logit_bias = _typed(body, "logit_bias", dict)
    if logit_bias is not None:
        for token, bias in logit_bias.items():
            if isinstance(bias, bool) or not isinstance(bias, int | float):
                raise invalid(f"logit_bias[{clip(token)}]: must be a number")
            req.logit_bias[token] = float(bias)
    options = _typed(body, "stream_options", dict)
    if options is not None:
        include_usage = _typed(options, "include_usage", bool, "stream_options.")
        if include_usage is not None:
            req.stream_options.include_usage = include_usage
        req.stream_options.extra_json = _extra(options, _stream_options_to_json(req.stream_options))
    prediction = _typed(body, "prediction", dict)
    if prediction is not None:
        req.prediction_json = _dumps(prediction)
    modalities = _typed(body, "modalities", list)
    if modalities is not None:
        if not all(isinstance(m, str) for m in modalities):
            raise invalid("modalities: must be a list of strings")
        req.modalities.extend(modalities)
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise invalid("stream: must be true or false")
    typed = _request_fields(req)
    if stream:
        typed["stream"] = True  # the front's business; an explicit false or null is kept as an extra
    req.extra_json = _extra(body, typed)
    return req, bool(stream)


def _stream_options_to_json(options: pb.StreamOptions) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if options.HasField("include_usage"):
        body["include_usage"] = options.include_usage
    return _merge(body, options.extra_json)


def _request_fields(req: pb.ChatRequest) -> dict[str, Any]:
    """Every field of ``req`` as OpenAI's JSON, extras not merged."""
    body: dict[str, Any] = {"model": req.model, "messages": [message_to_json(m) for m in req.messages]}
    if req.HasField("temperature"):
        body["temperature"] = _float32(req.temperature)
    if req.HasField("top_p"):
        body["top_p"] = _float32(req.top_p)
    for key in ("max_tokens", "max_completion_tokens", "n", "top_logprobs", "seed"):
        if req.HasField(key):
            body[key] = getattr(req, key)
    if req.stop:
        body["stop"] = list(req.stop)
    for key in (*_STRINGS, *_BOOLS, "presence_penalty", "frequency_penalty"):
        if req.HasField(key):
            body[key] = getattr(req, key)
    if req.metadata:
        body["metadata"] = dict(req.metadata)
    if req.tools:
        body["tools"] = [tool_to_json(t) for t in req.tools]
    if req.HasField("tool_choice"):
        body["tool_choice"] = tool_choice_to_json(req.tool_choice)
    if req.HasField("response_format"):
        body["response_format"] = response_format_to_json(req.response_format)
    if req.logit_bias:
        body["logit_bias"] = {k: _num(v) for k, v in req.logit_bias.items()}
    if req.HasField("stream_options"):
        body["stream_options"] = _stream_options_to_json(req.stream_options)
    if req.HasField("prediction_json"):
        body["prediction"] = orjson.loads(req.prediction_json)
    if req.modalities:
        body["modalities"] = list(req.modalities)
    return body


def request_to_json(req: pb.ChatRequest, *, model: str | None = None, stream: bool = False) -> dict[str, Any]:
    """The OpenAI request body for ``req``; ``model`` overrides the model name sent upstream.

    A request of the simple chunk layout (a gRPC client's) asks for the usage of a stream, which that layout
    always carries; an OpenAI-layout request is sent as its client sent it.
    """
    body = _merge(_request_fields(req), req.extra_json)
    body["model"] = model or req.model
    if stream:
        body["stream"] = True
        if req.chunk_layout != pb.CHUNK_LAYOUT_OPENAI and not req.HasField("stream_options"):
            body["stream_options"] = {"include_usage": True}
    elif body.get("stream") is not False:
        body.pop("stream", None)
    return body


# -- answers ----------------------------------------------------------------------------------------------


def _details_from_json(value: Any, details: Any, keys: tuple[str, ...]) -> None:
    if not isinstance(value, dict):
        raise TypeError("token details: not an object")
    for key in keys:
        if _is_int(value.get(key)):
            setattr(details, key, value[key])
    details.extra_json = _extra(value, _details_to_json(details, keys))


def _details_to_json(details: Any, keys: tuple[str, ...]) -> dict[str, Any]:
    body = {k: getattr(details, k) for k in keys if details.HasField(k)}
    return _merge(body, details.extra_json)


_PROMPT_DETAILS = ("cached_tokens", "audio_tokens")
_COMPLETION_DETAILS = (
    "reasoning_tokens",
    "audio_tokens",
    "accepted_prediction_tokens",
    "rejected_prediction_tokens",
)


def usage_to_json(usage: pb.Usage) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }
    if usage.HasField("prompt_tokens_details"):
        body["prompt_tokens_details"] = _details_to_json(usage.prompt_tokens_details, _PROMPT_DETAILS)
    if usage.HasField("completion_tokens_details"):
        body["completion_tokens_details"] = _details_to_json(
            usage.completion_tokens_details, _COMPLETION_DETAILS
        )
    return _merge(body, usage.extra_json)


def usage_from_json(usage: Any) -> pb.Usage | None:
    if not isinstance(usage, dict):
        return None
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    result = pb.Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=int(usage.get("total_tokens") or prompt + completion),
    )
    if usage.get("prompt_tokens_details") is not None:
        _details_from_json(usage["prompt_tokens_details"], result.prompt_tokens_details, _PROMPT_DETAILS)
    if usage.get("completion_tokens_details") is not None:
        _details_from_json(
            usage["completion_tokens_details"], result.completion_tokens_details, _COMPLETION_DETAILS
        )
    result.extra_json = _extra(usage, usage_to_json(result))
    return result


def _choice_to_json(choice: pb.Choice) -> dict[str, Any]:
    body = {
        "index": choice.index,
        "message": message_to_json(choice.message),
        "logprobs": orjson.loads(choice.logprobs_json) if choice.HasField("logprobs_json") else None,
        "finish_reason": choice.finish_reason if choice.HasField("finish_reason") else None,
    }
    return _merge(body, choice.extra_json)


def _choice_from_json(c: Any, i: int) -> pb.Choice:
    choice = pb.Choice(index=int(c.get("index", i)))
    try:
        choice.message.CopyFrom(message_from_json(c["message"], f"choices[{i}].message"))
    except Exception as exc:  # a GatewayError here is the provider's fault, not the client's
        raise ValueError(str(exc)) from None
    if isinstance(c.get("finish_reason"), str):
        choice.finish_reason = c["finish_reason"]
    if c.get("logprobs") is not None:
        choice.logprobs_json = _dumps(c["logprobs"])
    choice.extra_json = _extra(c, _choice_to_json(choice))
    return choice


def _finish_enum(reason: str | None) -> pb.FinishReason:
    return FINISH_BY_NAME.get(reason or "stop", pb.FINISH_REASON_STOP)


def response_from_json(body: Any) -> pb.ChatResponse:
    """Parse an upstream OpenAI chat completion; raises KeyError/TypeError/ValueError on a malformed one."""
    choices = [_choice_from_json(c, i) for i, c in enumerate(body["choices"])]
    resp = pb.ChatResponse(
        id=str(body.get("id", "")), model=str(body.get("model", "")), created=int(body.get("created") or 0)
    )
    resp.choices.extend(choices)
    if choices:
        first = choices[0]
        resp.content = first.message.content
        resp.finish_reason = _finish_enum(first.finish_reason if first.HasField("finish_reason") else None)
    usage = usage_from_json(body.get("usage"))
    if usage is not None:
        resp.usage.CopyFrom(usage)
    for key in ("system_fingerprint", "service_tier"):
        if isinstance(body.get(key), str):
            setattr(resp, key, body[key])
    resp.extra_json = _extra(body, response_to_json(resp, merge=False))
    return resp


def response_to_json(resp: pb.ChatResponse, *, merge: bool = True) -> dict[str, Any]:
    if resp.choices:
        choices = [_choice_to_json(c) for c in resp.choices]
    else:  # a provider that fills only the first choice's fields (anthropic, a simple gRPC upstream)
        choices = [
            {
                "index": 0,
                "message": {"role": "assistant", "content": resp.content, "refusal": None},
                "logprobs": None,
                "finish_reason": FINISH_NAME.get(resp.finish_reason, "stop"),
            }
        ]
    body: dict[str, Any] = {
        "id": resp.id,
        "object": "chat.completion",
        "created": resp.created,
        "model": resp.model,
        "choices": choices,
    }
    if resp.HasField("usage") or not resp.choices:
        body["usage"] = usage_to_json(resp.usage)
    for key in ("system_fingerprint", "service_tier"):
        if resp.HasField(key):
            body[key] = getattr(resp, key)
    return _merge(body, resp.extra_json) if merge else body


# -- stream chunks ----------------------------------------------------------------------------------------


def _tool_delta_from_json(d: Any) -> pb.ToolCallDelta:
    if not isinstance(d, dict):
        raise TypeError("tool call delta: not an object")
    delta = pb.ToolCallDelta(index=int(d.get("index") or 0))
    for key in ("id", "type"):
        if isinstance(d.get(key), str):
            setattr(delta, key, d[key])
    function = d.get("function")
    if isinstance(function, dict):
        if isinstance(function.get("name"), str):
            delta.name = function["name"]
        if isinstance(function.get("arguments"), str):
            delta.arguments = function["arguments"]
    if _tool_delta_to_json(delta) != d:
        return pb.ToolCallDelta(index=delta.index, json=_dumps(d))
    return delta


def _tool_delta_to_json(delta: pb.ToolCallDelta) -> dict[str, Any]:
    if delta.json:
        return orjson.loads(delta.json)
    body: dict[str, Any] = {"index": delta.index}
    for key in ("id", "type"):
        if delta.HasField(key):
            body[key] = getattr(delta, key)
    function = {k: getattr(delta, k) for k in ("name", "arguments") if delta.HasField(k)}
    if function:
        body["function"] = function
    return body


_DELTA_STRINGS = ("role", "content", "refusal", "reasoning_content")


def _delta_to_json(delta: pb.ChunkDelta) -> dict[str, Any]:
    body: dict[str, Any] = {k: getattr(delta, k) for k in _DELTA_STRINGS if delta.HasField(k)}
    if delta.tool_calls:
        body["tool_calls"] = [_tool_delta_to_json(d) for d in delta.tool_calls]
    return _merge(body, delta.extra_json)


def _delta_from_json(d: Any, delta: pb.ChunkDelta) -> None:
    if not isinstance(d, dict):
        raise TypeError("delta: not an object")
    for key in _DELTA_STRINGS:
        if isinstance(d.get(key), str):
            setattr(delta, key, d[key])
    if isinstance(d.get("tool_calls"), list):
        delta.tool_calls.extend(_tool_delta_from_json(t) for t in d["tool_calls"])
    delta.extra_json = _extra(d, _delta_to_json(delta))


def _chunk_choice_to_json(choice: pb.ChunkChoice) -> dict[str, Any]:
    body = {
        "index": choice.index,
        "delta": _delta_to_json(choice.delta),
        "logprobs": orjson.loads(choice.logprobs_json) if choice.HasField("logprobs_json") else None,
        "finish_reason": choice.finish_reason if choice.HasField("finish_reason") else None,
    }
    return _merge(body, choice.extra_json)


def _chunk_choice_from_json(c: Any, i: int) -> pb.ChunkChoice:
    choice = pb.ChunkChoice(index=int(c.get("index", i)))
    _delta_from_json(c.get("delta") or {}, choice.delta)
    if isinstance(c.get("finish_reason"), str):
        choice.finish_reason = c["finish_reason"]
    if c.get("logprobs") is not None:
        choice.logprobs_json = _dumps(c["logprobs"])
    choice.extra_json = _extra(c, _chunk_choice_to_json(choice))
    return choice


def chunk_to_json(chunk: pb.ChatChunk, *, first: bool = False) -> dict[str, Any]:
    """One ``chat.completion.chunk``. A chunk of the simple layout (``delta``/``finish_reason``, no
    ``choices``) becomes one choice; ``first`` adds the assistant role to it."""
    body: dict[str, Any] = {
        "id": chunk.id,
        "object": "chat.completion.chunk",
        "created": chunk.created,
        "model": chunk.model,
    }
    for key in ("service_tier", "system_fingerprint"):
        if chunk.HasField(key):
            body[key] = getattr(chunk, key)
    if chunk.choices or not (chunk.delta or chunk.finish_reason):
        body["choices"] = [_chunk_choice_to_json(c) for c in chunk.choices]
    else:
        delta: dict[str, Any] = {"content": chunk.delta}
        if first:
            delta["role"] = "assistant"
        body["choices"] = [
            {
                "index": 0,
                "delta": delta,
                "logprobs": None,
                "finish_reason": FINISH_NAME.get(chunk.finish_reason),
            }
        ]
    if chunk.HasField("usage"):
        body["usage"] = usage_to_json(chunk.usage)
    elif chunk.usage_null:
        body["usage"] = None
    return _merge(body, chunk.extra_json)


def chunk_from_json(body: Any) -> pb.ChatChunk:
    """Parse one upstream ``chat.completion.chunk`` into the OpenAI layout (``choices``)."""
    chunk = pb.ChatChunk(
        id=str(body.get("id", "")), model=str(body.get("model", "")), created=int(body.get("created") or 0)
    )
    chunk.choices.extend(_chunk_choice_from_json(c, i) for i, c in enumerate(body.get("choices") or ()))
    for key in ("system_fingerprint", "service_tier"):
        if isinstance(body.get(key), str):
            setattr(chunk, key, body[key])
    if "usage" in body:
        usage = usage_from_json(body["usage"])
        if usage is not None:
            chunk.usage.CopyFrom(usage)
        elif body["usage"] is None:
            chunk.usage_null = True
    extra = _extra(body, chunk_to_json(chunk))
    if extra:
        chunk.extra_json = extra
    return chunk


def error_body(
    message: str, error_type: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """OpenAI's error envelope."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def _is_opening(chunk: pb.ChatChunk) -> bool:
    """A chunk that carries nothing yet: no text, reasoning, tool call, logprobs, finish reason or usage."""
    if chunk.HasField("usage"):
        return False
    for choice in chunk.choices:
        d = choice.delta
        if d.content or d.refusal or d.reasoning_content or d.tool_calls:
            return False
        if choice.HasField("finish_reason") or choice.HasField("logprobs_json"):
            return False
    return True


async def read_stream(
    events: AsyncIterable[bytes], on_error: Callable[[dict[str, Any]], Exception]
) -> AsyncIterator[pb.ChatChunk]:
    """The chunks of an OpenAI SSE stream (the data of each event), one per event, in the OpenAI layout.

    Opening chunks that carry nothing yet (the role-only first chunk) are held back and yielded with the
    first chunk that does, so that a stream's first chunk is its first token (what fallback relies on). An
    ``{"error": ...}`` event raises ``on_error(body)``; malformed data raises ValueError (or
    KeyError/TypeError for a wrong shape), and so does a stream that ends without a finish_reason.
    """
    held: list[pb.ChatChunk] = []
    started = finished = False
    async for data in events:
        if data == b"[DONE]":
            break
        body = orjson.loads(data)
        if not isinstance(body, dict):
            raise TypeError("a stream chunk is not a JSON object")
        if "error" in body and "choices" not in body:
            raise on_error(body)
        chunk = chunk_from_json(body)
        finished = finished or any(c.HasField("finish_reason") for c in chunk.choices)
        if not started and _is_opening(chunk):
            held.append(chunk)
            continue
        started = True
        for early in held:
            yield early
        held.clear()
        yield chunk
    if not finished:
        raise ValueError("the stream ended without a finish_reason")


async def read_simple_stream(
    events: AsyncIterable[bytes], on_error: Callable[[dict[str, Any]], Exception]
) -> AsyncIterator[pb.ChatChunk]:
    """The chunks of an OpenAI SSE stream in the simple layout of ``StreamingChat``: content chunks, then one
    final chunk with the finish reason and the usage (see :func:`llmgw.chat.to_simple_layout`)."""
    async for chunk in to_simple_layout(read_stream(events, on_error)):
        yield chunk
