"""The fake of OpenAI's Chat Completions API (kind ``openai``).

``POST /v1/chat/completions`` answers JSON, or Server-Sent Events with ``"stream": true`` (a role chunk,
one chunk a token, a finish chunk, a usage chunk with ``stream_options.include_usage``, then
``data: [DONE]``); ``GET /v1/models`` lists the models. Auth is ``Authorization: Bearer``; errors use
OpenAI's envelope (``{"error": {"message", "type", "param", "code"}}``) and a 429 carries ``Retry-After``
and OpenAI's ``x-ratelimit-*`` headers. Ids start ``chatcmpl-``. A stream broken midway ends with an error
``data:`` event. ``POST /v1/embeddings``, ``POST /v1/responses`` and ``POST /v1/completions`` answer as
:mod:`.endpoints` describes, streams paced and broken or stalled by the same faults as chat's, and
``GET /v1/models/{id}`` one model. ``max_completion_tokens`` wins over ``max_tokens``; ``temperature`` and ``top_p`` are
checked for range but change nothing; messages of any role count toward the prompt's tokens. Tools, structured
outputs, reasoning, logprobs and ``n`` get the answers of :mod:`.completions`; the reply answers the last user
message, or the last message when it is a tool result. ``received`` keeps the JSON of each request.
"""

from __future__ import annotations

import collections
import dataclasses
import hmac
import time
from collections.abc import Mapping
from typing import Any, Final

import orjson
from aiohttp import web

from llmgw_dev.fakes import endpoints
from llmgw_dev.fakes.completions import Answer, is_rich, prompt_of
from llmgw_dev.fakes.faults import MODEL_CREATED, Chat, Reply, count_words, new_id, seconds
from llmgw_dev.fakes.server import BadRequest, HttpApi, json_response

_ERRORS: Final = {
    400: ("invalid_request_error", None, "Bad request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: (
        "invalid_request_error",
        "unsupported_country_region_territory",
        "Country, region, or territory not supported.",
    ),
    404: (
        "invalid_request_error",
        "model_not_found",
        "The model does not exist or you do not have access to it.",
    ),
    429: (
        "requests",
        "rate_limit_exceeded",
        "Rate limit reached for requests per min (RPM): Limit 60, Used 60, "
        "Requested 1. Please try again in {retry}s.",
    ),
    500: ("server_error", None, "The server had an error while processing your request. Sorry about that!"),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
}
_ROLES: Final = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
_DONE: Final = b"data: [DONE]\n\n"


def _error(
    status: int,
    message: str,
    error_type: str,
    code: str | None = None,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    body = {"error": {"message": message, "type": error_type, "param": param, "code": code}}
    return json_response(body, status, headers)


def _injected_body(status: int, retry_after: float) -> dict[str, Any]:
    error_type, code, message = _ERRORS.get(
        status,
        ("server_error" if status >= 500 else "invalid_request_error", None, f"HTTP {status} (injected)."),
    )
    return {
        "error": {
            "message": message.format(retry=seconds(retry_after)),
            "type": error_type,
            "param": None,
            "code": code,
        }
    }


def _mask_key(key: str) -> str:
    if len(key) < 16:
        return "*" * len(key)
    return f"{key[:3]}{'*' * (len(key) - 7)}{key[-4:]}"


def _number(body: Mapping[str, Any], key: str, low: float, high: float) -> None:
    value = body.get(key)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(
            f"Invalid type for '{key}': expected a decimal, but got {type(value).__name__}.", param=key
        )
    if not low <= value <= high:
        raise BadRequest(f"Invalid '{key}': {value} is out of range [{low:g}, {high:g}].", param=key)


def _text(content: Any, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise BadRequest(
                    f"Invalid '{where}.content[{j}]': expected an object with a type.",
                    param=f"{where}.content[{j}]",
                    code="invalid_type",
                )
            if part["type"] == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise BadRequest(
                        f"Missing required parameter: '{where}.content[{j}].text'.",
                        param=f"{where}.content[{j}].text",
                        code="missing_required_parameter",
                    )
                parts.append(text)
        return "".join(parts)
    raise BadRequest(
        f"Invalid type for '{where}.content': expected one of a string or array of objects.",
        param=f"{where}.content",
        code="invalid_type",
    )


def _parse(raw: bytes, received: collections.deque[Any]) -> Chat:
    """The request; its JSON is appended to ``received`` before it is checked."""
    try:
        body = orjson.loads(raw)
        received.append(body)
    except orjson.JSONDecodeError:
        raise BadRequest(
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't using "
            "your HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not "
            "valid JSON.)"
        ) from None
    if not isinstance(body, dict):
        raise BadRequest("Invalid type for request body: expected an object.", code="invalid_type")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("you must provide a model parameter", param="model")
    messages = body.get("messages")
    if messages is None:
        raise BadRequest(
            "Missing required parameter: 'messages'.", param="messages", code="missing_required_parameter"
        )
    if not isinstance(messages, list):
        raise BadRequest(
            "Invalid type for 'messages': expected an array.", param="messages", code="invalid_type"
        )
    if not messages:
        raise BadRequest(
            "Invalid 'messages': empty array. Expected an array with minimum length 1, but got an "
            "empty array instead.",
            param="messages",
            code="empty_array",
        )
    prompt_tokens = 0
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise BadRequest(
                f"Invalid type for '{where}': expected an object.", param=where, code="invalid_type"
            )
        role = message.get("role")
        if role not in _ROLES:
            raise BadRequest(
                f"Invalid value: {role!r}. Supported values are: 'system', 'assistant', 'user', "
                "'function', 'tool', and 'developer'.",
                param=f"{where}.role",
                code="invalid_value",
            )
        text = _text(message.get("content"), where)
        prompt_tokens += count_words(text)
    last_user = prompt_of(messages)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
    ):
        raise BadRequest(
            f"Invalid 'max_tokens': integer below minimum value. Expected a value >= 1, but got "
            f"{max_tokens!r} instead.",
            param="max_tokens",
            code="integer_below_min_value",
        )
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise BadRequest("Invalid 'stop': expected a string or an array of at most 4 strings.", param="stop")
    _number(body, "temperature", 0.0, 2.0)
    _number(body, "top_p", 0.0, 1.0)
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise BadRequest(
            "Invalid type for 'stream': expected a boolean.", param="stream", code="invalid_type"
        )
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    if options is not None and not stream:
        raise BadRequest(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.", param="stream_options"
        )
    return Chat(model, last_user, prompt_tokens, max_tokens, stops, stream, include_usage, body)


class OpenAI(HttpApi):
    """OpenAI's Chat Completions API; see the module docstring."""

    base_path = "/v1"

    def _routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1/chat/completions", self._chat),
            web.get("/v1/models", self._models),
            web.get("/v1/models/{model:.+}", self._model),
            web.post("/v1/embeddings", self._embeddings),
            web.post("/v1/responses", self._responses),
            web.post("/v1/completions", self._completions),
        ]

    async def _not_found(self, request: web.Request) -> web.Response:
        return _error(404, f"Invalid URL ({request.method} {request.path})", "invalid_request_error")

    def _check(self, request: web.Request) -> web.Response | None:
        if self._bearer is None:
            return None
        header = request.headers.get("Authorization", "")
        if hmac.compare_digest(header.encode(), self._bearer.encode()):
            return None
        self.fake.stats["unauthorized"] += 1
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return _error(
                401,
                "You didn't provide an API key. You need to provide your API key in an Authorization header "
                "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                "invalid_request_error",
            )
        return _error(
            401,
            f"Incorrect API key provided: {_mask_key(key.strip())}. You can find your API key at "
            "https://platform.openai.com/account/api-keys.",
            "invalid_request_error",
            "invalid_api_key",
        )

    def _parse(self, raw: bytes) -> Chat:
        return _parse(raw, self.fake.received)

    def _unknown_model(self, model: str) -> BadRequest:
        return BadRequest(
            f"The model `{model}` does not exist or you do not have access to it.",
            status=404,
            code="model_not_found",
        )

    def _invalid(self, exc: BadRequest) -> web.Response:
        return _error(exc.status, exc.message, "invalid_request_error", exc.code, exc.param)

    def _injected(self, status: int, retry_after: float) -> web.Response:
        headers: dict[str, str] = {}
        if status == 429:
            retry = seconds(retry_after)
            headers = {
                "Retry-After": retry,
                "x-ratelimit-limit-requests": "60",
                "x-ratelimit-remaining-requests": "0",
                "x-ratelimit-reset-requests": f"{retry}s",
                "x-ratelimit-limit-tokens": "150000",
                "x-ratelimit-remaining-tokens": "149000",
                "x-ratelimit-reset-tokens": "0s",
            }
        return json_response(_injected_body(status, retry_after), status, headers)

    def _stream_error(self) -> bytes:
        faults = self.fake.faults
        return b"data: " + orjson.dumps(_injected_body(faults.error_status, faults.retry_after_s)) + b"\n\n"

    async def _answer(self, request: web.Request, chat: Chat, reply: Reply) -> web.StreamResponse:
        completion_id = new_id("chatcmpl-")
        created = int(time.time())
        prompt_tokens = chat.prompt_tokens
        total_tokens = prompt_tokens + reply.completion_tokens
        if is_rich(chat.body):
            answer = Answer(chat.body, reply, prompt_tokens)
            if not chat.stream:
                return self._completed(answer.completion(completion_id, created, chat.model))
            frames = [
                b"data: " + orjson.dumps(c) + b"\n\n"
                for c in answer.chunks(completion_id, created, chat.model, chat.include_usage)
            ]
            paced = dataclasses.replace(reply, json_tokens=tuple(frames[1:]))
            return await self._stream(request, paced, frames[0], lambda frame: frame, _DONE)
        if chat.stream:
            return await self._stream_chunks(request, chat, reply, completion_id, created)
        return self._completed(
            {
                "id": completion_id,
                "object": "chat.completion",
                "created": created,
                "model": chat.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {
                            "role": "assistant",
                            "content": reply.text,
                            "refusal": None,
                            "annotations": [],
                        },
                        "logprobs": None,
                        "finish_reason": reply.finish,
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": reply.completion_tokens,
                    "total_tokens": total_tokens,
                },
                "service_tier": "default",
                "system_fingerprint": "fp_fake",
            }
        )

    async def _stream_chunks(
        self, request: web.Request, chat: Chat, reply: Reply, completion_id: str, created: int
    ) -> web.StreamResponse:
        head = (
            b'data: {"id":"%s","object":"chat.completion.chunk","created":%d,"model":%s,'
            b'"service_tier":"default","system_fingerprint":"fp_fake","choices":'
            % (completion_id.encode(), created, orjson.dumps(chat.model))
        )
        usage_null = b',"usage":null}\n\n' if chat.include_usage else b"}\n\n"
        open_delta = head + b'[{"index":0,"delta":{'
        close_delta = b'},"logprobs":null,"finish_reason":null}]' + usage_null
        closing = [
            head
            + b'[{"index":0,"delta":{},"logprobs":null,"finish_reason":"%s"}]' % reply.finish.encode()
            + usage_null
        ]
        if chat.include_usage:
            closing.append(
                head
                + b'[],"usage":{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d}}\n\n'
                % (chat.prompt_tokens, reply.completion_tokens, chat.prompt_tokens + reply.completion_tokens)
            )
        closing.append(_DONE)
        return await self._stream(
            request,
            reply,
            open_delta + b'"role":"assistant","content":"","refusal":null' + close_delta,
            lambda token: open_delta + b'"content":' + token + close_delta,
            b"".join(closing),
        )

    async def _models(self, request: web.Request) -> web.Response:
        denied = self._check(request)
        if denied is not None:
            return denied
        data = [
            {"id": m, "object": "model", "created": MODEL_CREATED, "owned_by": "system"}
            for m in self.fake.models
        ]
        return json_response({"object": "list", "data": data})

    async def _model(self, request: web.Request) -> web.Response:
        denied = self._check(request)
        if denied is not None:
            return denied
        model = request.match_info["model"]
        if not self._known(model):
            return self._invalid(self._unknown_model(model))
        return json_response({"id": model, "object": "model", "created": MODEL_CREATED, "owned_by": "system"})

    async def _other(self, request: web.Request) -> tuple[dict[str, Any] | None, web.StreamResponse | None]:
        """An embeddings, responses or completions request through auth, JSON, model and faults: its body,
        or the error response to answer with."""
        denied = self._check(request)
        if denied is not None:
            return None, denied
        try:
            body = orjson.loads(await request.read())
            self.fake.received.append(body)
        except orjson.JSONDecodeError:
            self.fake.stats["rejected"] += 1
            return None, self._invalid(BadRequest("We could not parse the JSON body of your request."))
        if not isinstance(body, dict):
            self.fake.stats["rejected"] += 1
            return None, self._invalid(BadRequest("Invalid type for request body: expected an object."))
        model = body.get("model")
        if not isinstance(model, str) or not model:
            self.fake.stats["rejected"] += 1
            return None, self._invalid(BadRequest("you must provide a model parameter", param="model"))
        if not self._known(model):
            self.fake.stats["rejected"] += 1
            return None, self._invalid(self._unknown_model(model))
        fault = await self._admit()
        if fault is not None:
            return None, self._injected(*fault)
        return body, None

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        with self._counted():
            body, error = await self._other(request)
            if body is None:
                assert error is not None
                return error
            inputs = endpoints.embedding_inputs(body.get("input"))
            if inputs is None:
                self.fake.stats["rejected"] += 1
                return self._invalid(
                    BadRequest("'$.input' is invalid. Please check the API reference.", param="input")
                )
            fmt = body.get("encoding_format") or "float"
            if fmt not in ("float", "base64"):
                self.fake.stats["rejected"] += 1
                return self._invalid(
                    BadRequest(
                        f"Invalid value: {fmt!r}. Supported values are: 'float' and 'base64'.",
                        param="encoding_format",
                    )
                )
            dimensions = body.get("dimensions")
            if dimensions is not None and (
                not isinstance(dimensions, int) or isinstance(dimensions, bool) or dimensions < 1
            ):
                self.fake.stats["rejected"] += 1
                return self._invalid(
                    BadRequest("Invalid 'dimensions': expected a positive integer.", param="dimensions")
                )
            return self._completed(endpoints.embeddings_answer(body["model"], inputs, fmt, dimensions))

    def _reply_to(self, text: str, body: dict[str, Any], max_key: str) -> tuple[Reply, int]:
        max_tokens = body.get(max_key)
        reply = self.fake.reply(text, max_tokens if isinstance(max_tokens, int) else None)
        return reply, count_words(text)

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        with self._counted():
            body, error = await self._other(request)
            if body is None:
                assert error is not None
                return error
            reply, prompt_tokens = self._reply_to(
                endpoints.input_text(body.get("input")), body, "max_output_tokens"
            )
            response_id = new_id("resp_")
            created = int(time.time())
            if body.get("stream") is not True:
                return self._completed(
                    endpoints.response_object(response_id, created, body, reply, prompt_tokens)
                )
            frames = [
                b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"
                for kind, event in endpoints.response_events(response_id, created, body, reply, prompt_tokens)
            ]
            # Paced, broken and stalled at the deltas: 4 frames open the stream, 5 close it.
            paced = dataclasses.replace(reply, json_tokens=tuple(frames[4:-5]))
            return await self._stream(
                request, paced, b"".join(frames[:4]), lambda f: f, b"".join(frames[-5:])
            )

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        with self._counted():
            body, error = await self._other(request)
            if body is None:
                assert error is not None
                return error
            prompt = body.get("prompt")
            text = (
                prompt if isinstance(prompt, str) else " ".join(p for p in prompt or () if isinstance(p, str))
            )
            reply, prompt_tokens = self._reply_to(text, body, "max_tokens")
            completion_id = new_id("cmpl-")
            created = int(time.time())
            model = body["model"]
            if body.get("stream") is not True:
                return self._completed(
                    endpoints.completion_object(completion_id, created, model, reply, prompt_tokens)
                )
            options = body.get("stream_options")
            include_usage = isinstance(options, dict) and options.get("include_usage") is True
            frames = [
                b"data: " + orjson.dumps(c) + b"\n\n"
                for c in endpoints.completion_chunks(
                    completion_id, created, model, reply, prompt_tokens, include_usage
                )
            ]
            tail = 2 if include_usage else 1
            paced = dataclasses.replace(reply, json_tokens=tuple(frames[:-tail]))
            return await self._stream(request, paced, b"", lambda f: f, b"".join(frames[-tail:]) + _DONE)
