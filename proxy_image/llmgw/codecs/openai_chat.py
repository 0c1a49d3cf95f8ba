"""OpenAI Chat Completions JSON <-> the gateway's protobuf messages, losslessly.

Used by the REST front (clients speak OpenAI's API), by the ``openai`` provider client (providers speak it) and by
the client library. Request parsing names the offending field in every error, so that a client sees
``messages[2].role: unknown role 'robot'`` and not a stack trace.

Lossless both ways: every object is read into its typed fields in one pass over its keys, and whatever the typed
fields would not write back exactly (an unknown key, a vendor extra such as ``top_k``, a key sent as null, a float
that float32 would round, an integer where a float field is) is kept verbatim in the object's ``extra_json`` and
merged back when it is written out.
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
from llmgw.errors import GatewayError

_INT32_MAX = 2**31 - 1
_INT64 = 2**63


# -- JSON helpers ---------------------------------------------------------------------------------------


def _merge(body: dict[str, Any], extra_json: str) -> dict[str, Any]:
    if extra_json:
        body.update(orjson.loads(extra_json))
    return body


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _float32(value: float) -> float:
    """A float32 field (temperature, top_p) as JSON: 6 decimals, so 0.7 is written 0.7, not 0.699999988
    (a value with more digits than that is also kept whole in extra_json)."""
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


def _tool_call_from_json(c: Any, where: str) -> dict[str, Any]:
    """A tool call as the fields of ``pb.ToolCall``: typed when that writes it back exactly, else whole."""
    if not isinstance(c, dict):
        raise invalid(f"{where}: must be an object")
    function = c.get("function")
    if (
        len(c) == 3
        and c.get("type") == "function"
        and type(call_id := c.get("id")) is str
        and type(function) is dict
        and len(function) == 2
        and type(name := function.get("name")) is str
        and type(arguments := function.get("arguments")) is str
    ):
        return {"id": call_id, "type": "function", "name": name, "arguments": arguments}
    return {"type": str(c.get("type", "")), "json": _dumps(c)}


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
        _read_named_schema(tool.function, function, "parameters")
        if tool_to_json(tool) == t:
            return tool
    elif t["type"] == "function":
        raise invalid(f"{where}.function: must be an object with a name")
    return pb.Tool(type=t["type"], json=_dumps(t))


def tool_to_json(tool: pb.Tool) -> dict[str, Any]:
    if tool.json:
        return orjson.loads(tool.json)
    return {"type": tool.type, "function": _named_schema_to_json(tool.function, "parameters")}


def _read_named_schema(target: Any, source: dict[str, Any], schema_key: str) -> None:
    """``name``, ``description``, the JSON Schema at ``schema_key`` and ``strict``: what a function and a
    json_schema response format share (``target`` is a pb.Function or a pb.JsonSchema)."""
    target.name = source["name"]
    if isinstance(source.get("description"), str):
        target.description = source["description"]
    if isinstance(source.get(schema_key), dict):
        setattr(target, f"{schema_key}_json", _dumps(source[schema_key]))
    if isinstance(source.get("strict"), bool):
        target.strict = source["strict"]


def _named_schema_to_json(source: Any, schema_key: str) -> dict[str, Any]:
    out: dict[str, Any] = {"name": source.name}
    if source.HasField("description"):
        out["description"] = source.description
    if source.HasField(f"{schema_key}_json"):
        out[schema_key] = orjson.loads(getattr(source, f"{schema_key}_json"))
    if source.HasField("strict"):
        out["strict"] = source.strict
    return out


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
        _read_named_schema(fmt.json_schema, schema, "schema")
    if response_format_to_json(fmt) != value:
        return pb.ResponseFormat(type=value["type"], json=_dumps(value))
    return fmt


def response_format_to_json(fmt: pb.ResponseFormat) -> dict[str, Any]:
    if fmt.json:
        return orjson.loads(fmt.json)
    body: dict[str, Any] = {"type": fmt.type}
    if fmt.HasField("json_schema"):
        body["json_schema"] = _named_schema_to_json(fmt.json_schema, "schema")
    return body


# -- messages ---------------------------------------------------------------------------------------------


_MESSAGE_STRINGS = frozenset({"name", "tool_call_id", "refusal", "reasoning_content"})


def message_from_json(m: Any, where: str) -> pb.ChatMessage:
    """One message of a request, or a reply's message; keys it has no field for go to ``extra_json``."""
    return pb.ChatMessage(**_message_fields(m, where))


def _message_fields(m: Any, where: str) -> dict[str, Any]:
    """A message's fields as keyword arguments of ``pb.ChatMessage`` (the message is built once, by its
    constructor: a protobuf field set one by one costs more than the whole message built at once)."""
    if not isinstance(m, dict):
        raise invalid(f"{where}: must be an object with role and content")
    role = m.get("role")
    if not isinstance(role, str) or role not in ROLE_BY_NAME:
        raise invalid(f"{where}.role: unknown role {clip(role)} (expected one of {', '.join(ROLE_BY_NAME)})")
    fields: dict[str, Any] = {"role": ROLE_BY_NAME[role]}
    extra: dict[str, Any] | None = None
    for key, value in m.items():
        if key == "role":
            continue
        if value is None:
            pass  # kept as an extra: null is not absent for every provider
        elif key == "content":
            if type(value) is str:
                fields["content"] = value
                continue
            if type(value) is list and value:
                fields["parts"] = [_part_from_json(p, f"{where}.content[{j}]") for j, p in enumerate(value)]
                continue
            if type(value) is not list:
                raise invalid(f"{where}.content: must be a string or a list of content parts")
        elif key in _MESSAGE_STRINGS:
            if type(value) is not str:
                raise invalid(f"{where}.{key}: must be a string, got {type(value).__name__}")
            fields[key] = value
            continue
        elif key == "tool_calls":
            if type(value) is not list:
                raise invalid(f"{where}.tool_calls: must be a list, got {type(value).__name__}")
            if value:
                fields["tool_calls"] = [
                    _tool_call_from_json(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(value)
                ]
                continue
        if extra is None:
            extra = {}
        extra[key] = value
    if extra:
        fields["extra_json"] = _dumps(extra)
    return fields


def message_to_json(m: pb.ChatMessage) -> dict[str, Any]:
    item: dict[str, Any] = {"role": ROLE_NAME.get(m.role, "user")}
    extra = ""
    for field, value in m.ListFields():
        name = field.name
        if name == "content":
            if not m.parts:
                item["content"] = value
        elif name == "parts":
            item["content"] = [part_to_json(p) for p in value]
        elif name == "tool_calls":
            item["tool_calls"] = [tool_call_to_json(c) for c in value]
        elif name == "extra_json":
            extra = value
        elif name != "role":
            item[name] = value
    if "content" not in item and m.role != pb.ROLE_ASSISTANT and '"content"' not in extra:
        item["content"] = ""  # a message of a gRPC client that left its text empty
    return _merge(item, extra)


# -- requests ---------------------------------------------------------------------------------------------

# Each request field the gateway knows: a function that sets it on the request from its JSON value (checked,
# naming the field) and returns whether writing the field back gives that value exactly (else the value is
# also kept in extra_json, e.g. a temperature float32 would round, an integer penalty, a stop string).


def _set_number(req: pb.ChatRequest, key: str, value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid(f"{key}: must be a number, got {type(value).__name__}")
    setattr(req, key, float(value))
    written = getattr(req, key)
    if key in ("temperature", "top_p"):
        written = _float32(written)
    return type(value) is float and written == value


def _ranged(low: int, high: int) -> Callable[[pb.ChatRequest, str, Any], bool]:
    def set_int(req: pb.ChatRequest, key: str, value: Any) -> bool:
        if not _is_int(value):
            raise invalid(f"{key}: must be an integer, got {type(value).__name__}")
        if not low <= value <= high:
            raise invalid(f"{key}: {value} must be between {low} and {high}")
        setattr(req, key, value)
        return True

    return set_int


def _typed_setter(kind: type) -> Callable[[pb.ChatRequest, str, Any], bool]:
    name = {str: "a string", bool: "true or false"}[kind]

    def set_value(req: pb.ChatRequest, key: str, value: Any) -> bool:
        if type(value) is not kind:
            raise invalid(f"{key}: must be {name}, got {type(value).__name__}")
        setattr(req, key, value)
        return True

    return set_value


def _set_stop(req: pb.ChatRequest, key: str, value: Any) -> bool:
    if isinstance(value, str):
        req.stop.append(value)
        return False  # written back as a list
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise invalid("stop: must be a string or a list of strings")
    if len(value) > MAX_STOP_SEQUENCES:
        raise invalid(f"stop: at most {MAX_STOP_SEQUENCES} sequences, got {len(value)}")
    req.stop.extend(value)
    return bool(value)


def _set_metadata(req: pb.ChatRequest, key: str, value: Any) -> bool:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise invalid("metadata: must be an object of string values")
    req.metadata.update(value)
    return bool(value)


def _set_tools(req: pb.ChatRequest, key: str, value: Any) -> bool:
    if not isinstance(value, list):
        raise invalid(f"tools: must be a list, got {type(value).__name__}")
    req.tools.extend(_tool_from_json(t, f"tools[{i}]") for i, t in enumerate(value))
    return bool(value)


def _set_tool_choice(req: pb.ChatRequest, key: str, value: Any) -> bool:
    req.tool_choice.CopyFrom(_tool_choice_from_json(value))
    return True


def _set_response_format(req: pb.ChatRequest, key: str, value: Any) -> bool:
    req.response_format.CopyFrom(_response_format_from_json(value))
    return True


def _set_logit_bias(req: pb.ChatRequest, key: str, value: Any) -> bool:
    if not isinstance(value, dict):
        raise invalid(f"logit_bias: must be an object, got {type(value).__name__}")
    exact = bool(value)
    for token, bias in value.items():
        if isinstance(bias, bool) or not isinstance(bias, int | float):
            raise invalid(f"logit_bias[{clip(token)}]: must be a number")
        req.logit_bias[token] = float(bias)
        written = _num(float(bias))
        exact = exact and type(written) is type(bias) and written == bias
    return exact


def _set_stream_options(req: pb.ChatRequest, key: str, value: Any) -> bool:
    if not isinstance(value, dict):
        raise invalid(f"stream_options: must be an object, got {type(value).__name__}")
    options = req.stream_options
    options.SetInParent()
    include_usage = value.get("include_usage")
    if include_usage is not None:
        if type(include_usage) is not bool:
            raise invalid("stream_options.include_usage: must be true or false")
        options.include_usage = include_usage
    others = {k: v for k, v in value.items() if k != "include_usage" or v is None}
    if others:
        options.extra_json = _dumps(others)
    return True


def _set_prediction(req: pb.ChatRequest, key: str, value: Any) -> bool:
    if not isinstance(value, dict):
        raise invalid(f"prediction: must be an object, got {type(value).__name__}")
    req.prediction_json = _dumps(value)
    return True


def _set_modalities(req: pb.ChatRequest, key: str, value: Any) -> bool:
    if not isinstance(value, list) or not all(isinstance(m, str) for m in value):
        raise invalid("modalities: must be a list of strings")
    req.modalities.extend(value)
    return bool(value)


_REQUEST_FIELDS: dict[str, Callable[[pb.ChatRequest, str, Any], bool]] = {
    "temperature": _set_number,
    "top_p": _set_number,
    "presence_penalty": _set_number,
    "frequency_penalty": _set_number,
    "max_tokens": _ranged(1, _INT32_MAX),
    "max_completion_tokens": _ranged(1, _INT32_MAX),
    "n": _ranged(1, 128),
    "top_logprobs": _ranged(0, 20),
    "seed": _ranged(-_INT64, _INT64 - 1),
    "stop": _set_stop,
    "user": _typed_setter(str),
    "reasoning_effort": _typed_setter(str),
    "service_tier": _typed_setter(str),
    "parallel_tool_calls": _typed_setter(bool),
    "logprobs": _typed_setter(bool),
    "store": _typed_setter(bool),
    "metadata": _set_metadata,
    "tools": _set_tools,
    "tool_choice": _set_tool_choice,
    "response_format": _set_response_format,
    "logit_bias": _set_logit_bias,
    "stream_options": _set_stream_options,
    "prediction": _set_prediction,
    "modalities": _set_modalities,
}


# Every field of OpenAI's chat request (the openai SDK's CompletionCreateParams, and stream; a test holds the
# two equal). Any other field of a request is a vendor extra (vLLM's top_k, min_p, chat_template_kwargs, ...),
# which each provider's vendorExtras setting passes on, drops or refuses.
OPENAI_REQUEST_KEYS = frozenset(
    {
        "model", "messages", "stream", "audio", "frequency_penalty", "function_call", "functions",
        "logit_bias", "logprobs", "max_completion_tokens", "max_tokens", "metadata", "modalities", "moderation",
        "n", "parallel_tool_calls", "prediction", "presence_penalty", "prompt_cache_key",
        "prompt_cache_options", "prompt_cache_retention", "reasoning_effort", "response_format",
        "safety_identifier", "seed", "service_tier", "stop", "store", "stream_options", "temperature",
        "tool_choice", "tools", "top_logprobs", "top_p", "user", "verbosity", "web_search_options",
    }
)  # fmt: skip


def vendor_extras(req: pb.ChatRequest, native: frozenset[str] = frozenset()) -> list[str]:
    """The fields of ``req`` outside OpenAI's chat API, but for ``native`` ones (the provider's own API's)."""
    if not req.extra_json:
        return []
    return [
        key for key in orjson.loads(req.extra_json) if key not in OPENAI_REQUEST_KEYS and key not in native
    ]


def without_fields(req: pb.ChatRequest, keys: list[str]) -> pb.ChatRequest:
    """A copy of ``req`` without the extra fields ``keys``."""
    out = pb.ChatRequest()
    out.CopyFrom(req)
    kept = {key: value for key, value in orjson.loads(req.extra_json).items() if key not in keys}
    if kept:
        out.extra_json = _dumps(kept)
    else:
        out.ClearField("extra_json")
    return out


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
    req = pb.ChatRequest(
        model=model, messages=[_message_fields(m, f"messages[{i}]") for i, m in enumerate(raw_messages)]
    )
    stream = False
    extra: dict[str, Any] | None = None
    for key, value in body.items():
        if key in ("model", "messages"):
            continue
        if key == "stream":
            if value is True:
                stream = True  # the front's business; an explicit false or null is kept as an extra
                continue
            if value is not None and value is not False:
                raise invalid("stream: must be true or false")
        elif value is not None:
            setter = _REQUEST_FIELDS.get(key)
            if setter is not None and setter(req, key, value):
                continue
        if extra is None:
            extra = {}
        extra[key] = value
    if extra:
        req.extra_json = _dumps(extra)
    return req, stream


def _stream_options_to_json(options: pb.StreamOptions) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if options.HasField("include_usage"):
        body["include_usage"] = options.include_usage
    return _merge(body, options.extra_json)


def _emit_float32(value: Any) -> Any:
    return _float32(value)


def _emit_list(value: Any) -> Any:
    return list(value)


_REQUEST_EMIT: dict[str, tuple[str, Callable[[Any], Any]] | None] = {
    "model": None,  # set by request_to_json
    "extra_json": None,
    "chunk_layout": None,
    "anthropic_beta": None,  # sent by Anthropic providers as a header
    "messages": ("messages", lambda v: [message_to_json(m) for m in v]),
    "temperature": ("temperature", _emit_float32),
    "top_p": ("top_p", _emit_float32),
    "stop": ("stop", _emit_list),
    "modalities": ("modalities", _emit_list),
    "metadata": ("metadata", dict),
    "tools": ("tools", lambda v: [tool_to_json(t) for t in v]),
    "tool_choice": ("tool_choice", tool_choice_to_json),
    "response_format": ("response_format", response_format_to_json),
    "logit_bias": ("logit_bias", lambda v: {k: _num(b) for k, b in v.items()}),
    "stream_options": ("stream_options", _stream_options_to_json),
    "prediction_json": ("prediction", orjson.loads),
}


def _request_fields(req: pb.ChatRequest) -> dict[str, Any]:
    """Every field of ``req`` as OpenAI's JSON, extras not merged."""
    body: dict[str, Any] = {"model": req.model}
    for field, value in req.ListFields():
        name = field.name
        if name in _REQUEST_EMIT:
            emit = _REQUEST_EMIT[name]
            if emit is not None:
                body[emit[0]] = emit[1](value)
        else:
            body[name] = value
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


_USAGE_NUMBERS = frozenset({"prompt_tokens", "completion_tokens", "total_tokens"})
_PROMPT_DETAIL_KEYS = ("cached_tokens", "audio_tokens")
_COMPLETION_DETAIL_KEYS = (
    "reasoning_tokens",
    "audio_tokens",
    "accepted_prediction_tokens",
    "rejected_prediction_tokens",
)

# Decoding builds each answer as nested dicts of keyword arguments and makes the protobuf message with one
# constructor call: with upb, setting fields one by one (or copying sub-messages in) costs several times
# more than the whole message built at once. An empty sub-message is left out of the dicts, since a dict,
# even an empty one, marks its field present.


def _add_extra(extra: dict[str, Any] | None, key: str, value: Any) -> dict[str, Any]:
    if extra is None:
        extra = {}
    extra[key] = value
    return extra


def _details_fields(value: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    extra = None
    for k, v in value.items():
        if k in keys and type(v) is int:
            fields[k] = v
        else:
            extra = _add_extra(extra, k, v)
    if extra:
        fields["extra_json"] = _dumps(extra)
    return fields


def _details_to_json(details: Any, keys: tuple[str, ...]) -> dict[str, Any]:
    """Token details as JSON: its fields that are set (read by name: cheaper than ``ListFields`` for a
    few) and its ``extra_json``."""
    body = {key: getattr(details, key) for key in keys if details.HasField(key)}
    return _merge(body, details.extra_json)


def usage_to_json(usage: pb.Usage) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }
    if usage.HasField("prompt_tokens_details"):
        body["prompt_tokens_details"] = _details_to_json(usage.prompt_tokens_details, _PROMPT_DETAIL_KEYS)
    if usage.HasField("completion_tokens_details"):
        body["completion_tokens_details"] = _details_to_json(
            usage.completion_tokens_details, _COMPLETION_DETAIL_KEYS
        )
    return _merge(body, usage.extra_json)


def _usage_fields(usage: dict[str, Any]) -> dict[str, Any]:
    """An upstream's usage object as the keyword arguments of ``pb.Usage``."""
    fields: dict[str, Any] = {}
    extra = None
    for k, v in usage.items():
        if k in _USAGE_NUMBERS and type(v) is int:
            fields[k] = v
        elif k == "prompt_tokens_details" and type(v) is dict:
            fields[k] = _details_fields(v, _PROMPT_DETAIL_KEYS)
        elif k == "completion_tokens_details" and type(v) is dict:
            fields[k] = _details_fields(v, _COMPLETION_DETAIL_KEYS)
        else:
            extra = _add_extra(extra, k, v)
    if "total_tokens" not in fields:
        fields["total_tokens"] = fields.get("prompt_tokens", 0) + fields.get("completion_tokens", 0)
    if extra:
        fields["extra_json"] = _dumps(extra)
    return fields


def usage_from_json(usage: Any) -> pb.Usage | None:
    if not isinstance(usage, dict):
        return None
    return pb.Usage(**_usage_fields(usage))


def _choice_to_json(choice: pb.Choice) -> dict[str, Any]:
    body = {
        "index": choice.index,
        "message": message_to_json(choice.message),
        "logprobs": orjson.loads(choice.logprobs_json) if choice.HasField("logprobs_json") else None,
        "finish_reason": choice.finish_reason if choice.HasField("finish_reason") else None,
    }
    return _merge(body, choice.extra_json)


def _choice_fields(c: Any, i: int) -> dict[str, Any]:
    """A reply's choice as the keyword arguments of ``pb.Choice``."""
    if not isinstance(c, dict):
        raise TypeError(f"choices[{i}]: not an object")
    raw = c["message"]
    if isinstance(raw, dict) and "role" not in raw:
        raw = {"role": "assistant", **raw}  # a provider that leaves the role out of its reply
    try:
        message = _message_fields(raw, f"choices[{i}].message")
    except GatewayError as exc:  # the provider's fault, not the client's
        raise ValueError(exc.message) from None
    fields: dict[str, Any] = {"index": i, "message": message}
    extra = None
    for k, v in c.items():
        if k == "message":
            continue
        if k == "index" and type(v) is int:
            fields["index"] = v
        elif k == "finish_reason" and type(v) is str:
            fields["finish_reason"] = v
        elif k == "logprobs" and v is not None:
            fields["logprobs_json"] = _dumps(v)
        elif not (k in ("finish_reason", "logprobs") and v is None):  # written back as null
            extra = _add_extra(extra, k, v)
    if extra:
        fields["extra_json"] = _dumps(extra)
    return fields


def _finish_enum(reason: str | None) -> pb.FinishReason:
    return FINISH_BY_NAME.get(reason or "stop", pb.FINISH_REASON_STOP)


_RESPONSE_STRINGS = frozenset({"id", "model", "system_fingerprint", "service_tier"})


def response_from_json(body: Any) -> pb.ChatResponse:
    """Parse an upstream OpenAI chat completion; raises KeyError/TypeError/ValueError on a malformed one."""
    raw_choices = body["choices"]
    if not isinstance(raw_choices, list):
        raise TypeError("choices: not a list")
    choices = [_choice_fields(c, i) for i, c in enumerate(raw_choices)]
    fields: dict[str, Any] = {"choices": choices}
    extra = None
    for k, v in body.items():
        if k == "choices" or (k == "object" and v == "chat.completion"):
            continue
        if (type(v) is str and k in _RESPONSE_STRINGS) or (k == "created" and type(v) is int):
            fields[k] = v
        elif k == "usage" and type(v) is dict:
            fields["usage"] = _usage_fields(v)
        else:
            extra = _add_extra(extra, k, v)
    if choices:
        first = choices[0]
        fields["content"] = first["message"].get("content", "")
        fields["finish_reason"] = _finish_enum(first.get("finish_reason"))
    if extra:
        fields["extra_json"] = _dumps(extra)
    return pb.ChatResponse(**fields)


def response_to_json(resp: pb.ChatResponse) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": resp.id,
        "object": "chat.completion",
        "created": resp.created,
        "model": resp.model,
    }
    if resp.choices:
        body["choices"] = [_choice_to_json(c) for c in resp.choices]
        if resp.HasField("usage"):
            body["usage"] = usage_to_json(resp.usage)
    else:  # a provider that fills only the first choice's fields (anthropic, a simple gRPC upstream)
        body["choices"] = [
            {
                "index": 0,
                "message": {"role": "assistant", "content": resp.content, "refusal": None},
                "logprobs": None,
                "finish_reason": FINISH_NAME.get(resp.finish_reason, "stop"),
            }
        ]
        body["usage"] = usage_to_json(resp.usage)
    if resp.HasField("system_fingerprint"):
        body["system_fingerprint"] = resp.system_fingerprint
    if resp.HasField("service_tier"):
        body["service_tier"] = resp.service_tier
    return _merge(body, resp.extra_json)


# -- stream chunks ----------------------------------------------------------------------------------------


def _tool_delta_fields(d: Any) -> dict[str, Any]:
    """A tool-call fragment as the keyword arguments of ``pb.ToolCallDelta``: typed when that writes it
    back exactly, else whole in ``json``."""
    if not isinstance(d, dict):
        raise TypeError("tool call delta: not an object")
    index = int(d.get("index") or 0)
    fields: dict[str, Any] = {"index": index}
    written: dict[str, Any] = {"index": index}  # what _tool_delta_to_json will write
    for key in ("id", "type"):
        value = d.get(key)
        if isinstance(value, str):
            fields[key] = written[key] = value
    function = d.get("function")
    if isinstance(function, dict):
        parts = {}
        for key in ("name", "arguments"):
            value = function.get(key)
            if isinstance(value, str):
                fields[key] = parts[key] = value
        if parts:
            written["function"] = parts
    if written != d:
        return {"index": index, "json": _dumps(d)}
    return fields


def _tool_delta_to_json(delta: pb.ToolCallDelta) -> dict[str, Any]:
    if delta.json:
        return orjson.loads(delta.json)
    body: dict[str, Any] = {"index": delta.index}
    function: dict[str, Any] | None = None
    for field, value in delta.ListFields():
        name = field.name
        if name in ("id", "type"):
            body[name] = value
        elif name in ("name", "arguments"):
            if function is None:
                function = {}
            function[name] = value
    if function is not None:
        body["function"] = function
    return body


_DELTA_STRINGS = frozenset({"role", "content", "refusal", "reasoning_content"})


def _delta_to_json(delta: pb.ChunkDelta) -> dict[str, Any]:
    body: dict[str, Any] = {}
    extra = ""
    for field, value in delta.ListFields():
        name = field.name
        if name == "tool_calls":
            body["tool_calls"] = [_tool_delta_to_json(d) for d in value]
        elif name == "extra_json":
            extra = value
        else:
            body[name] = value
    return _merge(body, extra)


def _delta_from_json(d: dict[str, Any], delta: pb.ChunkDelta) -> None:
    extra = None
    for k, v in d.items():
        if k in _DELTA_STRINGS and type(v) is str:
            setattr(delta, k, v)
        elif k == "tool_calls" and type(v) is list and v:
            calls = delta.tool_calls
            for t in v:
                calls.add(**_tool_delta_fields(t))
        else:
            extra = _add_extra(extra, k, v)
    if extra:
        delta.extra_json = _dumps(extra)


def _chunk_choice_to_json(choice: pb.ChunkChoice) -> dict[str, Any]:
    body: dict[str, Any] = {"index": choice.index, "delta": {}, "logprobs": None, "finish_reason": None}
    extra = ""
    for field, value in choice.ListFields():
        name = field.name
        if name == "delta":
            body["delta"] = _delta_to_json(value)
        elif name == "logprobs_json":
            body["logprobs"] = orjson.loads(value)
        elif name == "finish_reason":
            body["finish_reason"] = value
        elif name == "extra_json":
            extra = value
    return _merge(body, extra)


def _chunk_choice_from_json(c: Any, i: int, choice: pb.ChunkChoice) -> None:
    """Fill ``choice`` in place. (A chunk is small: set field by field, it costs less than built from
    nested dicts by its constructor, unlike a reply.)"""
    if not isinstance(c, dict):
        raise TypeError(f"choices[{i}]: not an object")
    choice.index = i
    extra = None
    for k, v in c.items():
        if k == "index" and type(v) is int:
            choice.index = v
        elif k == "delta" and type(v) is dict:
            _delta_from_json(v, choice.delta)
        elif k == "finish_reason" and type(v) is str:
            choice.finish_reason = v
        elif k == "logprobs" and v is not None:
            choice.logprobs_json = _dumps(v)
        elif not (k in ("finish_reason", "logprobs") and v is None):  # written back as null
            extra = _add_extra(extra, k, v)
    if extra:
        choice.extra_json = _dumps(extra)


# -- the text chunk's fast path ---------------------------------------------------------------------------
#
# Most chunks of a stream are one choice's text delta, and the chunks of one stream share their id, model,
# created, system_fingerprint and service_tier. Such a chunk is written out by reading its serialized form
# (SerializeToString is one C call, where reading its ten fields one by one from Python costs ten, each
# several times a byte comparison): the head's wire bytes and JSON are made once per stream (cached by the
# general path, which every stream's first chunk takes), the text is read from the wire, inline (a helper
# function call per field would cost what it saves). The "usage": null that OpenAI puts in every chunk when
# the usage is asked for is read too. A chunk of any other shape (tool-call fragments, finish, usage,
# logprobs, extras, strings of 128 bytes or more), or whose wire does not match exactly, takes the general
# path: the fast path writes the same JSON, or none. (Building a chunk from wire bytes the same way costs
# as much as its constructor does.)


class _Head:
    """A stream's chunk head: its fields' wire bytes before the choices (id, model, created: fields 1, 2,
    6) and after them (system_fingerprint, service_tier: 8, 9), and its JSON."""

    __slots__ = ("json", "prefix", "suffix")

    def __init__(self, values: tuple[Any, ...]) -> None:
        chunk_id, model, created, fingerprint, tier = values
        before: dict[str, Any] = {}
        after: dict[str, Any] = {}
        body: dict[str, Any] = {"id": chunk_id or "", "object": "chat.completion.chunk"}
        body["created"] = created or 0
        body["model"] = model or ""
        if chunk_id is not None:
            before["id"] = chunk_id
        if model is not None:
            before["model"] = model
        if created is not None:
            before["created"] = created
        if tier is not None:
            after["service_tier"] = body["service_tier"] = tier
        if fingerprint is not None:
            after["system_fingerprint"] = body["system_fingerprint"] = fingerprint
        self.prefix = pb.ChatChunk(**before).SerializeToString()
        self.suffix = pb.ChatChunk(**after).SerializeToString()
        self.json = body


_heads: dict[tuple[Any, ...], _Head] = {}  # by the head's values
_wire_heads: dict[tuple[bytes, bytes], _Head] = {}  # by (prefix, suffix): the heads chunk_to_json has seen


def _head(values: tuple[Any, ...]) -> _Head:
    head = _heads.get(values)
    if head is None:
        if len(_heads) >= 256:
            _heads.clear()
        head = _heads[values] = _Head(values)
        if len(_wire_heads) >= 256:
            _wire_heads.clear()
        _wire_heads[(head.prefix, head.suffix)] = head
    return head


def _text_chunk_to_json(chunk: pb.ChatChunk) -> dict[str, Any] | None:
    """The JSON of a text delta chunk whose head was seen before, read from its wire bytes; None for any
    other chunk."""
    data = chunk.SerializeToString()
    end = len(data)
    pos = 0
    try:
        # the head's fields before the choices: id (1), model (2), created (6)
        for tag in (0x0A, 0x12):
            if data[pos] == tag:
                n = data[pos + 1]
                if n >= 0x80:
                    return None
                pos += 2 + n
        if data[pos] == 0x30:
            pos += 1
            while data[pos] & 0x80:
                pos += 1
            pos += 1
        # one choice (index 0, nothing but a delta), its length in one byte
        start = pos
        if data[pos] != 0x3A:
            return None
        size = data[pos + 1]
        choice_end = pos + 2 + size
        if size < 2 or size >= 0x80 or choice_end > end or data[pos + 2] != 0x12:
            return None
        if data[pos + 3] != choice_end - pos - 4:
            return None
        pos += 4
        delta: dict[str, Any] = {}
        for tag, key in ((0x0A, "role"), (0x12, "content")):
            if pos < choice_end and data[pos] == tag:
                n = data[pos + 1]
                if n >= 0x80 or pos + 2 + n > choice_end:
                    return None
                delta[key] = data[pos + 2 : pos + 2 + n].decode()
                pos += 2 + n
    except IndexError:
        return None
    if pos != choice_end:
        return None
    tail = data[choice_end:]
    usage_null = tail.endswith(b"\x50\x01")  # usage_null (10) = true: OpenAI's "usage": null
    if usage_null:
        tail = tail[:-2]  # (a string field that ended in these bytes would leave no head's suffix)
    head = _wire_heads.get((data[:start], tail))
    if head is None:
        return None
    body = {**head.json, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]}
    if usage_null:
        body["usage"] = None
    return body


def chunk_to_json(chunk: pb.ChatChunk, *, first: bool = False) -> dict[str, Any]:
    """One ``chat.completion.chunk``. A chunk of the simple layout (``delta``/``finish_reason``, no
    ``choices``) becomes one choice; ``first`` adds the assistant role to it."""
    fast = _text_chunk_to_json(chunk)
    if fast is not None:
        return fast
    chunk_id, created, model = chunk.id, chunk.created, chunk.model
    body: dict[str, Any] = {
        "id": chunk_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
    }
    tier = fingerprint = None
    if chunk.HasField("service_tier"):
        body["service_tier"] = tier = chunk.service_tier
    if chunk.HasField("system_fingerprint"):
        body["system_fingerprint"] = fingerprint = chunk.system_fingerprint
    choices = chunk.choices
    if choices:
        _head((chunk_id, model, created, fingerprint, tier))  # the stream's next chunks take the fast path
    if choices or not (chunk.delta or chunk.finish_reason):
        body["choices"] = [_chunk_choice_to_json(c) for c in choices]
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


_CHUNK_STRINGS = frozenset({"id", "model", "system_fingerprint", "service_tier"})


def chunk_from_json(body: Any) -> pb.ChatChunk:
    """Parse one upstream ``chat.completion.chunk`` into the OpenAI layout (``choices``)."""
    chunk = pb.ChatChunk()
    extra = None
    for k, v in body.items():
        if (type(v) is str and k in _CHUNK_STRINGS) or (k == "created" and type(v) is int):
            setattr(chunk, k, v)
        elif k == "choices" and type(v) is list:
            for i, c in enumerate(v):
                _chunk_choice_from_json(c, i, chunk.choices.add())
        elif k == "usage" and v is None:
            chunk.usage_null = True
        elif k == "usage" and type(v) is dict:
            chunk.usage.CopyFrom(pb.Usage(**_usage_fields(v)))
        elif not (k == "object" and v == "chat.completion.chunk"):
            extra = _add_extra(extra, k, v)
    if extra:
        chunk.extra_json = _dumps(extra)
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
