"""The fake of Anthropic's Messages API (kind ``anthropic``).

``POST /v1/messages/count_tokens`` answers ``{"input_tokens"}``; ``POST /v1/messages`` answers JSON, or the real Server-Sent Events sequence with ``"stream": true``
(``message_start``, ``content_block_start``, ``ping``, one ``content_block_delta`` a token,
``content_block_stop``, ``message_delta``, ``message_stop``); ``GET /v1/models`` lists the models. The key
comes in ``x-api-key`` (or, as newer SDKs send it, ``Authorization: Bearer``) and the ``anthropic-version``
header is required. Errors use Anthropic's envelope (``{"type": "error", "error": {"type", "message"},
"request_id"}``), ``overloaded_error`` is HTTP 529 and a 429 carries ``retry-after``. Ids start ``msg_``;
``stop_reason`` is ``end_turn``, ``max_tokens`` or ``stop_sequence``. A stream broken midway ends with an
``error`` event. ``max_tokens`` is required; ``temperature`` and ``top_p`` are checked for range but change
nothing; the system prompt counts toward the prompt's tokens. ``received`` keeps the JSON of each request.

Rich answers (:class:`_Rich`), in the real JSON and event shapes: with ``tools`` (and ``tool_choice`` not
``none``, and the last user turn not a ``tool_result``) the model calls the forced tool of ``tool_choice``
``tool`` (else the first) once, with input made from its ``input_schema`` (:func:`.completions.example`),
``stop_reason`` ``tool_use``, the input streamed as ``input_json_delta`` fragments of at most 8 characters;
after a tool result the reply answers it. With ``thinking`` enabled a ``thinking`` block comes first
("Thinking about: <prompt>", streamed as ``thinking_delta``s and a ``signature_delta``), signed: a replayed
thinking block whose signature is not the one given is refused, as Anthropic does. When any block, tool or
the system prompt has ``cache_control``, the prompt's words before the last message count as
``cache_read_input_tokens`` and only the rest as ``input_tokens``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import re
from collections.abc import Mapping
from typing import Any, Final

import orjson
from aiohttp import web

from llmgw_dev.fakes.completions import example
from llmgw_dev.fakes.faults import Chat, Reply, count_words, new_id, seconds
from llmgw_dev.fakes.server import BadRequest, HttpApi, json_response

_MODEL_CREATED_AT: Final = "2023-11-14T22:13:20Z"  # faults.MODEL_CREATED in RFC 3339
_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
_MESSAGES: Final = {
    429: "Number of request tokens has exceeded your per-minute rate limit. Please try again later.",
    500: "Internal server error",
    504: "Request timed out",
    529: "Overloaded",
}
_STOP: Final = {"stop": "end_turn", "length": "max_tokens"}
_BLOCK_START: Final = (
    b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
    b'"content_block":{"type":"text","text":""}}\n\n'
)
_PING: Final = b'event: ping\ndata: {"type": "ping"}\n\n'
_DELTA: Final = (
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"text_delta","text":'
)
_BLOCK_STOP: Final = b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
_MESSAGE_STOP: Final = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'


def _error_body(status: int, message: str | None = None) -> dict[str, Any]:
    text = message or _MESSAGES.get(status) or f"HTTP {status} (injected)"
    error_type = _TYPES.get(status) or ("api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": error_type, "message": text}, "request_id": new_id("req_")}


def _error(status: int, message: str | None = None, headers: Mapping[str, str] | None = None) -> web.Response:
    return json_response(_error_body(status, message), status, headers)


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, block in enumerate(content):
            if not isinstance(block, dict) or not isinstance(block.get("type"), str):
                raise BadRequest(f"{where}.{j}.type: Field required")
            if block["type"] == "text":
                text = block.get("text")
                if not isinstance(text, str):
                    raise BadRequest(f"{where}.{j}.text: Field required")
                parts.append(text)
            elif block["type"] == "tool_result":
                if not isinstance(block.get("tool_use_id"), str):
                    raise BadRequest(f"{where}.{j}.tool_use_id: Field required")
                parts.append(_text(block.get("content", ""), f"{where}.{j}.content"))
            elif block["type"] == "tool_use":
                if not isinstance(block.get("id"), str) or not isinstance(block.get("input"), dict):
                    raise BadRequest(f"{where}.{j}: a tool_use block needs an id and an input object")
            elif block["type"] == "thinking":
                thinking = block.get("thinking")
                if not isinstance(thinking, str) or block.get("signature") != signature(thinking):
                    raise BadRequest(f"{where}.{j}: Invalid `signature` in `thinking` block")
            elif block["type"] == "image":
                source = block.get("source")
                if not isinstance(source, dict) or source.get("type") not in ("base64", "url"):
                    raise BadRequest(f"{where}.{j}.source: Input should be a base64 or url source")
        return "".join(parts)
    raise BadRequest(f"{where}: Input should be a valid string or a list of content blocks")


def signature(thinking: str) -> str:
    """The signature the fake gives a thinking block (and checks when it is sent back)."""
    return "sig_" + hashlib.sha256(thinking.encode()).hexdigest()[:32]


def _parse(raw: bytes, received: Any) -> Chat:
    try:
        body = orjson.loads(raw)
        received.append(body)
    except orjson.JSONDecodeError:
        raise BadRequest("There was an error parsing the body of your request: invalid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("body: Input should be a valid dictionary")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("model: Field required")
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        raise BadRequest("max_tokens: Field required")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise BadRequest("max_tokens: Input should be a valid integer greater than or equal to 1")
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise BadRequest(
            "messages: Field required" if messages is None else "messages: Input should be a valid list"
        )
    if not messages:
        raise BadRequest("messages: at least one message is required")
    system = body.get("system")
    prompt_tokens = 0 if system is None else count_words(_text(system, "system"))
    last_user = ""
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRequest(f"messages.{i}: Input should be a valid dictionary")
        role = message.get("role")
        if role not in ("user", "assistant"):
            raise BadRequest(f"messages.{i}.role: Input should be 'user' or 'assistant'")
        if "content" not in message:
            raise BadRequest(f"messages.{i}.content: Field required")
        text = _text(message["content"], f"messages.{i}.content")
        prompt_tokens += count_words(text)
        if role == "user":
            last_user = text
    stop = body.get("stop_sequences")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise BadRequest("stop_sequences: Input should be a valid list of strings")
    for key in ("temperature", "top_p"):
        value = body.get(key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1
        ):
            raise BadRequest(f"{key}: Input should be a number between 0 and 1")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise BadRequest("stream: Input should be a valid boolean")
    return Chat(model, last_user, prompt_tokens, max_tokens, stops, stream, body=body)


def _usage(chat: Chat, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": chat.prompt_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": output_tokens,
        "service_tier": "standard",
    }


def _event(name: bytes, data: Any) -> bytes:
    return b"event: " + name + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def _has_cache_control(value: Any) -> bool:
    if isinstance(value, dict):
        return "cache_control" in value or any(_has_cache_control(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_cache_control(v) for v in value)
    return False


def _tool_to_call(body: Mapping[str, Any]) -> dict[str, Any] | None:
    tools = [t for t in body.get("tools") or () if isinstance(t, dict) and "input_schema" in t]
    choice = body.get("tool_choice") or {}
    messages = body.get("messages") or []
    last = messages[-1].get("content") if messages else None
    answered = isinstance(last, list) and any(
        isinstance(b, dict) and b.get("type") == "tool_result" for b in last
    )
    if not tools or choice.get("type") == "none" or answered:
        return None
    if choice.get("type") == "tool":
        tools = [t for t in tools if t.get("name") == choice.get("name")] or tools
    return tools[0]


def _is_rich(body: Mapping[str, Any]) -> bool:
    thinking = body.get("thinking")
    return bool(body.get("tools")) or (isinstance(thinking, dict) and thinking.get("type") == "enabled")


class _Rich:
    """A rich answer: its content blocks, stop reason and usage, as JSON and as the event sequence."""

    def __init__(self, chat: Chat, reply: Reply, message: dict[str, Any]) -> None:
        body = chat.body
        self.message = message
        thinking = body.get("thinking")
        self.thinking = (
            f"Thinking about: {chat.prompt}"
            if isinstance(thinking, dict) and thinking.get("type") == "enabled"
            else None
        )
        self.tool = _tool_to_call(body)
        self.tool_id = "toolu_01" + os.urandom(11).hex()
        self.input = example(self.tool.get("input_schema") or {}, chat.prompt) if self.tool else None
        self.text = reply.text if self.tool is None else ""
        self.tokens = list(reply.tokens) if self.tool is None else []
        self.stop_reason = (
            "tool_use"
            if self.tool is not None
            else ("stop_sequence" if reply.stop_sequence is not None else _STOP[reply.finish])
        )
        self.stop_sequence = reply.stop_sequence if self.tool is None else None
        output = count_words(self.thinking or "") + (
            len(self.tokens) if self.tool is None else count_words(orjson.dumps(self.input).decode()) + 1
        )
        usage = _usage(chat, output)
        if _has_cache_control(body):
            messages = body.get("messages") or []
            last = _text(messages[-1].get("content", ""), "last") if messages else ""
            cached = max(0, chat.prompt_tokens - count_words(last))
            usage["cache_read_input_tokens"] = cached
            usage["input_tokens"] = chat.prompt_tokens - cached
        self.usage = usage

    def blocks(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if self.thinking is not None:
            out.append({"type": "thinking", "thinking": self.thinking, "signature": signature(self.thinking)})
        if self.tool is None:
            out.append({"type": "text", "text": self.text})
        else:
            out.append(
                {"type": "tool_use", "id": self.tool_id, "name": self.tool["name"], "input": self.input}
            )
        return out

    def completion(self) -> dict[str, Any]:
        return {
            **self.message,
            "content": self.blocks(),
            "stop_reason": self.stop_reason,
            "stop_sequence": self.stop_sequence,
            "usage": self.usage,
        }

    def events(self) -> list[bytes]:
        start_usage = {**self.usage, "output_tokens": 1}
        frames = [
            _event(
                b"message_start",
                {
                    "type": "message_start",
                    "message": {
                        **self.message, "content": [], "stop_reason": None, "stop_sequence": None,
                        "usage": start_usage,
                    },
                },
            )
        ]  # fmt: skip
        index = 0

        def delta(d: dict[str, Any]) -> bytes:
            return _event(b"content_block_delta", {"type": "content_block_delta", "index": index, "delta": d})

        def start(block: dict[str, Any]) -> bytes:
            return _event(
                b"content_block_start",
                {"type": "content_block_start", "index": index, "content_block": block},
            )

        def stop() -> bytes:
            return _event(b"content_block_stop", {"type": "content_block_stop", "index": index})

        if self.thinking is not None:
            frames.append(start({"type": "thinking", "thinking": "", "signature": ""}) + _PING)
            frames.extend(
                # joined, the words give back the signed text
                delta({"type": "thinking_delta", "thinking": w})
                for w in re.findall(r"\S+\s*", self.thinking)
            )
            frames.append(delta({"type": "signature_delta", "signature": signature(self.thinking)}) + stop())
            index += 1
        if self.tool is None:
            frames.append(start({"type": "text", "text": ""}) + (b"" if index else _PING))
            frames.extend(delta({"type": "text_delta", "text": t}) for t in self.tokens)
        else:
            frames.append(
                start({"type": "tool_use", "id": self.tool_id, "name": self.tool["name"], "input": {}})
                + (b"" if index else _PING)
            )
            arguments = orjson.dumps(self.input).decode()
            frames.extend(
                delta({"type": "input_json_delta", "partial_json": arguments[i : i + 8]})
                for i in range(0, len(arguments), 8)
            )
        message_delta = {
            "type": "message_delta",
            "delta": {"stop_reason": self.stop_reason, "stop_sequence": self.stop_sequence},
            "usage": {"output_tokens": self.usage["output_tokens"]},
        }
        frames.append(stop() + _event(b"message_delta", message_delta) + _MESSAGE_STOP)
        return frames


class Anthropic(HttpApi):
    """Anthropic's Messages API; see the module docstring."""

    def _routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1/messages", self._chat),
            web.post("/v1/messages/count_tokens", self._count_tokens),
            web.get("/v1/models", self._models),
        ]

    async def _not_found(self, request: web.Request) -> web.Response:
        return _error(404, "Not Found")

    def _check(self, request: web.Request) -> web.Response | None:
        api_key = self.fake.api_key
        if api_key is not None:
            key = request.headers.get("x-api-key")
            if key is None:
                scheme, _, key = request.headers.get("Authorization", "").partition(" ")
                if scheme.lower() != "bearer":
                    key = ""
            if not key:
                self.fake.stats["unauthorized"] += 1
                return _error(401, "x-api-key header is required")
            if not hmac.compare_digest(key.encode(), api_key.encode()):
                self.fake.stats["unauthorized"] += 1
                return _error(401, "invalid x-api-key")
        if not request.headers.get("anthropic-version"):
            return _error(400, "anthropic-version: header is required")
        self.fake.received_betas.append(request.headers.getall("anthropic-beta", []))
        return None

    def _parse(self, raw: bytes) -> Chat:
        return _parse(raw, self.fake.received)

    def _unknown_model(self, model: str) -> BadRequest:
        return BadRequest(f"model: {model}", status=404)

    def _invalid(self, exc: BadRequest) -> web.Response:
        return _error(exc.status, exc.message)

    def _injected(self, status: int, retry_after: float) -> web.Response:
        headers = None
        if status == 429:
            headers = {
                "retry-after": seconds(retry_after),
                "anthropic-ratelimit-requests-limit": "60",
                "anthropic-ratelimit-requests-remaining": "0",
            }
        return _error(status, None, headers)

    def _stream_error(self) -> bytes:
        return _event(b"error", _error_body(self.fake.faults.error_status))

    async def _answer(self, request: web.Request, chat: Chat, reply: Reply) -> web.StreamResponse:
        message_id = "msg_01" + os.urandom(11).hex()
        stop_reason = "stop_sequence" if reply.stop_sequence is not None else _STOP[reply.finish]
        message = {"id": message_id, "type": "message", "role": "assistant", "model": chat.model}
        if _is_rich(chat.body):
            rich = _Rich(chat, reply, message)
            if not chat.stream:
                return self._completed(rich.completion())
            frames = rich.events()
            paced = dataclasses.replace(reply, json_tokens=tuple(frames[1:-1]))
            return await self._stream(request, paced, frames[0], lambda frame: frame, frames[-1])
        if not chat.stream:
            return self._completed(
                {
                    **message,
                    "content": [{"type": "text", "text": reply.text}],
                    "stop_reason": stop_reason,
                    "stop_sequence": reply.stop_sequence,
                    "usage": _usage(chat, reply.completion_tokens),
                }
            )
        start = {
            "type": "message_start",
            "message": {
                **message,
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": _usage(chat, 1),
            },
        }
        delta = {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": reply.stop_sequence},
            "usage": {"output_tokens": reply.completion_tokens},
        }
        return await self._stream(
            request,
            reply,
            _event(b"message_start", start) + _BLOCK_START + _PING,
            lambda token: _DELTA + token + b"}}\n\n",
            _BLOCK_STOP + _event(b"message_delta", delta) + _MESSAGE_STOP,
        )

    async def _count_tokens(self, request: web.Request) -> web.Response:
        denied = self._check(request)
        if denied is not None:
            return denied
        raw = await request.read()
        try:
            body = orjson.loads(raw)
            if isinstance(body, dict):
                body.setdefault("max_tokens", 1)  # count_tokens takes no max_tokens
            chat = _parse(orjson.dumps(body), self.fake.received)
        except BadRequest as exc:
            return self._invalid(exc)
        return json_response({"input_tokens": chat.prompt_tokens})

    async def _models(self, request: web.Request) -> web.Response:
        denied = self._check(request)
        if denied is not None:
            return denied
        data = [
            {
                "type": "model",
                "id": m,
                "display_name": m.replace("-", " ").title(),
                "created_at": _MODEL_CREATED_AT,
            }
            for m in self.fake.models
        ]
        return json_response(
            {"data": data, "has_more": False, "first_id": data[0]["id"], "last_id": data[-1]["id"]}
        )
