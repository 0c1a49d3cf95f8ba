"""The fake of Anthropic's Messages API (kind ``anthropic``).

``POST /v1/messages`` answers JSON, or the real Server-Sent Events sequence with ``"stream": true``
(``message_start``, ``content_block_start``, ``ping``, one ``content_block_delta`` a token,
``content_block_stop``, ``message_delta``, ``message_stop``); ``GET /v1/models`` lists the models. The key
comes in ``x-api-key`` (or, as newer SDKs send it, ``Authorization: Bearer``) and the ``anthropic-version``
header is required. Errors use Anthropic's envelope (``{"type": "error", "error": {"type", "message"},
"request_id"}``), ``overloaded_error`` is HTTP 529 and a 429 carries ``retry-after``. Ids start ``msg_``;
``stop_reason`` is ``end_turn``, ``max_tokens`` or ``stop_sequence``. A stream broken midway ends with an
``error`` event. ``max_tokens`` is required; ``temperature`` and ``top_p`` are checked for range but change
nothing; the system prompt counts toward the prompt's tokens.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping
from typing import Any, Final

import orjson
from aiohttp import web

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
        return "".join(parts)
    raise BadRequest(f"{where}: Input should be a valid string or a list of content blocks")


def _parse(raw: bytes) -> Chat:
    try:
        body = orjson.loads(raw)
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
    return Chat(model, last_user, prompt_tokens, max_tokens, stops, stream)


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


class Anthropic(HttpApi):
    """Anthropic's Messages API; see the module docstring."""

    def _routes(self) -> list[web.RouteDef]:
        return [web.post("/v1/messages", self._chat), web.get("/v1/models", self._models)]

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
        return None

    def _parse(self, raw: bytes) -> Chat:
        return _parse(raw)

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
