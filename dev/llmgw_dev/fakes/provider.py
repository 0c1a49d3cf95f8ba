"""Fake LLM upstreams that speak the real wire protocols, for tests, demos and benchmarks.

Three kinds, each an asyncio server bound to a loopback address only:

``openai``
    OpenAI's Chat Completions API: ``POST /v1/chat/completions`` (JSON, or Server-Sent Events with
    ``"stream": true``, including ``stream_options.include_usage`` and the final ``data: [DONE]``) and
    ``GET /v1/models``, with Bearer auth and OpenAI's error envelope.
``anthropic``
    Anthropic's Messages API: ``POST /v1/messages`` (JSON, or the real SSE event sequence
    ``message_start``, ``content_block_start``, ``ping``, ``content_block_delta``..., ``content_block_stop``,
    ``message_delta``, ``message_stop``) and ``GET /v1/models``, with ``x-api-key`` auth, the required
    ``anthropic-version`` header and Anthropic's error envelope (``overloaded_error`` is HTTP 529).
``grpc``
    The gateway's own ``llmgateway.v1.LLMService`` over grpc.aio, with the standard
    ``grpc.health.v1.Health`` service, Bearer auth in the ``authorization`` metadata and gRPC status codes.

What is faithful: URLs, methods, status codes, header names, JSON field names and their order, the SSE framing
and event order, the error envelopes and error ``type``/``code`` values, the ``Retry-After`` header (plus
OpenAI's ``x-ratelimit-*`` headers) on 429, id prefixes (``chatcmpl-``, ``msg_``), and the behaviour of
``max_tokens`` and stop sequences (generation stops before the stop sequence, which is not part of the text).
The official ``openai`` and ``anthropic`` SDKs work against it unchanged.

What is not: the reply is a deterministic echo ("This is a fake reply to: <words of the last user message>"
then filler words) of ``response_tokens`` tokens, where a token is a word plus its following space and
usage counts whitespace-separated words (the prompt counts the words of all input messages, system prompt
included). The same request gets the same text and usage from all three kinds, so tests can compare paths.
Sampling parameters are checked for type and range but do not change the answer; unknown request fields,
tools, images and other non-text content blocks are accepted and ignored rather than rejected or acted on.
Error messages resemble the real ones but are not copied verbatim for every case. Anthropic's newer SDKs
send the key as ``Authorization: Bearer``, which is accepted as well as ``x-api-key``. ``token_delay_ms``
only paces streams; a unary answer is sent right after ``latency_ms``.

Faults (:class:`Faults`) are injected per chat request after auth and request validation: rate limiting
first, then ``fail_next``, then ``error_rate``; ``latency_ms`` is waited before any of these answers.
``/v1/models`` and ``ListModels`` only check auth. Faults can be changed at runtime over HTTP:
``GET /_fake/stats``, ``DELETE /_fake/stats`` (reset), ``GET /_fake/faults`` and ``PUT /_fake/faults``
(JSON partial update) on the provider's own port, or on ``control_port`` for the grpc kind.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hmac
import math
import os
import random
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Final

import grpc
import orjson
import uvloop
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from llmgateway.v1 import llm_service_pb2 as pb
from llmgateway.v1 import llm_service_pb2_grpc
from llmgw.chat import validate_request
from llmgw.errors import GatewayError
from llmgw_common.config import is_loopback

KINDS: Final = ("openai", "anthropic", "grpc")
DEFAULT_LISTEN: Final = "127.0.0.1:18001"
MODEL_CREATED: Final = 1_700_000_000  # a fixed creation time for the model lists
_MODEL_CREATED_AT: Final = "2023-11-14T22:13:20Z"  # the same instant in RFC 3339
_REPLY_PREFIX: Final = ("This", "is", "a", "fake", "reply", "to:")
_FILLER: Final = (
    *("lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit", "sed", "do", "eiusmod"),
    *("tempor", "incididunt", "ut", "labore", "et", "dolore", "magna", "aliqua"),
)
_TOKEN_RE: Final = re.compile(r"\S+\s?")
_CACHE_LIMIT: Final = 4096  # replies kept, keyed by (prompt, max_tokens, stop)
_CACHE_MAX_PROMPT: Final = 2048  # longer prompts are not cached (they would pin memory)
_MAX_BODY: Final = 64 * 1024 * 1024


# ----------------------------------------------------------------------------------------------- faults


@dataclasses.dataclass
class Faults:
    """What goes wrong, and how slowly things go right. Mutable: changes apply to the next request."""

    latency_ms: float = 0.0  # delay before answering (before headers / first token)
    token_delay_ms: float = 0.0  # delay between streamed tokens
    error_rate: float = 0.0  # probability in [0, 1] that a request fails with error_status
    error_status: int = 500  # HTTP status of injected errors (mapped to a gRPC code for kind grpc)
    fail_next: int = 0  # the next N requests fail with error_status (deterministic; decremented)
    rate_limit_every: int = 0  # every Nth request is answered 429 / RESOURCE_EXHAUSTED with Retry-After
    retry_after_s: float = 1.0  # the Retry-After value sent with rate limiting
    stream_error_after_tokens: int = -1  # >= 0: break a stream after this many tokens (provider-native error)

    def update(self, changes: Mapping[str, Any]) -> None:
        """Apply a partial update (all or nothing); raises ValueError naming the first bad field."""
        checked = {name: _check_fault(name, value) for name, value in changes.items()}
        for name, value in checked.items():
            setattr(self, name, value)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_INT_FAULTS: Final[dict[str, tuple[float, float | None]]] = {
    "error_status": (100, 599),
    "fail_next": (0, None),
    "rate_limit_every": (0, None),
    "stream_error_after_tokens": (-1, None),
}
_FLOAT_FAULTS: Final[dict[str, tuple[float, float | None]]] = {
    "latency_ms": (0.0, None),
    "token_delay_ms": (0.0, None),
    "error_rate": (0.0, 1.0),
    "retry_after_s": (0.0, None),
}


def _check_fault(name: str, value: Any) -> int | float:
    if name in _INT_FAULTS:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name}: must be an integer, got {value!r}")
        low, high = _INT_FAULTS[name]
        checked: int | float = value
    elif name in _FLOAT_FAULTS:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"{name}: must be a finite number, got {value!r}")
        low, high = _FLOAT_FAULTS[name]
        checked = float(value)
    else:
        known = ", ".join(f.name for f in dataclasses.fields(Faults))
        raise ValueError(f"{name}: unknown fault (known: {known})")
    if checked < low or (high is not None and checked > high):
        bounds = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name}: {value!r} is out of range {bounds}")
    return checked


# ------------------------------------------------------------------------------------------------ reply


@dataclasses.dataclass(frozen=True, slots=True)
class Reply:
    """The generated answer: its text, split into streamed tokens, and why generation stopped."""

    text: str
    tokens: tuple[str, ...]
    finish: str  # "stop" (natural end or stop sequence) or "length" (max_tokens reached)
    stop_sequence: str | None  # the stop sequence that ended generation, if one did
    json_tokens: tuple[bytes, ...]  # each token as a JSON string, for the SSE templates

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)


def make_reply(
    prompt: str, response_tokens: int = 20, max_tokens: int | None = None, stop: Sequence[str] = ()
) -> Reply:
    """The deterministic answer to a last user message ``prompt``; the same for all three kinds."""
    words = [*_REPLY_PREFIX, *prompt.split()][:response_tokens]
    while len(words) < response_tokens:
        words.extend(_FILLER[: response_tokens - len(words)])
    finish = "stop"
    if max_tokens is not None and max_tokens < len(words):
        words = words[:max_tokens]
        finish = "length"
    text = " ".join(words)
    tokens = [w + " " for w in words]
    if tokens:
        tokens[-1] = words[-1]
    stop_sequence = None
    cut = -1
    for sequence in stop:
        at = text.find(sequence) if sequence else -1
        if at >= 0 and (cut < 0 or at < cut):
            cut, stop_sequence = at, sequence
    if stop_sequence is not None:
        text = text[:cut]
        tokens = _TOKEN_RE.findall(text)
        finish = "stop"
    return Reply(text, tuple(tokens), finish, stop_sequence, tuple(orjson.dumps(t) for t in tokens))


def _count_words(text: str) -> int:
    return len(text.split())


# ---------------------------------------------------------------------------------------------- helpers


class _BadRequest(Exception):
    """A request the provider rejects; ``param``/``code`` are OpenAI's fields."""

    def __init__(
        self, message: str, status: int = 400, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _seconds(value: float) -> str:
    """A Retry-After value: "1" for 1.0, "0.25" for 0.25."""
    return f"{value:.3f}".rstrip("0").rstrip(".") or "0"


def _mask_key(key: str) -> str:
    if len(key) < 16:
        return "*" * len(key)
    return f"{key[:3]}{'*' * (len(key) - 7)}{key[-4:]}"


def _new_id(prefix: str) -> str:
    return prefix + os.urandom(12).hex()


def _number(body: Mapping[str, Any], key: str, low: float, high: float) -> None:
    value = body.get(key)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _BadRequest(
            f"Invalid type for '{key}': expected a decimal, but got {type(value).__name__}.", param=key
        )
    if not low <= value <= high:
        raise _BadRequest(f"Invalid '{key}': {value} is out of range [{low:g}, {high:g}].", param=key)


_JSON: Final = {"Content-Type": "application/json"}
_SSE: Final = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}

_GRPC_CODES: Final = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    409: grpc.StatusCode.ABORTED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    500: grpc.StatusCode.INTERNAL,
    501: grpc.StatusCode.UNIMPLEMENTED,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
    529: grpc.StatusCode.UNAVAILABLE,
}


def grpc_code_for(status: int) -> grpc.StatusCode:
    """The gRPC status code an injected HTTP-like status is reported as."""
    code = _GRPC_CODES.get(status)
    if code is not None:
        return code
    return grpc.StatusCode.INTERNAL if status >= 500 else grpc.StatusCode.UNKNOWN


# ---- OpenAI

_OPENAI_ERRORS: Final = {
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


def _openai_error(
    status: int,
    message: str,
    error_type: str,
    code: str | None = None,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    body = {"error": {"message": message, "type": error_type, "param": param, "code": code}}
    return web.Response(status=status, body=orjson.dumps(body), headers={**_JSON, **(headers or {})})


def _openai_injected_body(status: int, retry_after: float) -> dict[str, Any]:
    error_type, code, message = _OPENAI_ERRORS.get(
        status,
        ("server_error" if status >= 500 else "invalid_request_error", None, f"HTTP {status} (injected)."),
    )
    return {
        "error": {
            "message": message.format(retry=_seconds(retry_after)),
            "type": error_type,
            "param": None,
            "code": code,
        }
    }


def _openai_text(content: Any, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise _BadRequest(
                    f"Invalid '{where}.content[{j}]': expected an object with a type.",
                    param=f"{where}.content[{j}]",
                    code="invalid_type",
                )
            if part["type"] == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise _BadRequest(
                        f"Missing required parameter: '{where}.content[{j}].text'.",
                        param=f"{where}.content[{j}].text",
                        code="missing_required_parameter",
                    )
                parts.append(text)
        return "".join(parts)
    raise _BadRequest(
        f"Invalid type for '{where}.content': expected one of a string or array of objects.",
        param=f"{where}.content",
        code="invalid_type",
    )


_OPENAI_ROLES: Final = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


def _openai_parse(raw: bytes) -> tuple[str, str, int, int | None, tuple[str, ...], bool, bool]:
    """(model, last user text, prompt tokens, max_tokens, stop, stream, include_usage) of a request body."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise _BadRequest(
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't using "
            "your HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not "
            "valid JSON.)"
        ) from None
    if not isinstance(body, dict):
        raise _BadRequest("Invalid type for request body: expected an object.", code="invalid_type")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _BadRequest("you must provide a model parameter", param="model")
    messages = body.get("messages")
    if messages is None:
        raise _BadRequest(
            "Missing required parameter: 'messages'.", param="messages", code="missing_required_parameter"
        )
    if not isinstance(messages, list):
        raise _BadRequest(
            "Invalid type for 'messages': expected an array.", param="messages", code="invalid_type"
        )
    if not messages:
        raise _BadRequest(
            "Invalid 'messages': empty array. Expected an array with minimum length 1, but got an "
            "empty array instead.",
            param="messages",
            code="empty_array",
        )
    prompt_tokens = 0
    last_user = ""
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _BadRequest(
                f"Invalid type for '{where}': expected an object.", param=where, code="invalid_type"
            )
        role = message.get("role")
        if role not in _OPENAI_ROLES:
            raise _BadRequest(
                f"Invalid value: {role!r}. Supported values are: 'system', 'assistant', 'user', "
                "'function', 'tool', and 'developer'.",
                param=f"{where}.role",
                code="invalid_value",
            )
        text = _openai_text(message.get("content"), where)
        prompt_tokens += _count_words(text)
        if role == "user":
            last_user = text
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
    ):
        raise _BadRequest(
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
        raise _BadRequest("Invalid 'stop': expected a string or an array of at most 4 strings.", param="stop")
    _number(body, "temperature", 0.0, 2.0)
    _number(body, "top_p", 0.0, 1.0)
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise _BadRequest(
            "Invalid type for 'stream': expected a boolean.", param="stream", code="invalid_type"
        )
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    if options is not None and not stream:
        raise _BadRequest(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.", param="stream_options"
        )
    return model, last_user, prompt_tokens, max_tokens, stops, stream, include_usage


# ---- Anthropic

_ANTHROPIC_TYPES: Final = {
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
_ANTHROPIC_MESSAGES: Final = {
    429: "Number of request tokens has exceeded your per-minute rate limit. Please try again later.",
    500: "Internal server error",
    504: "Request timed out",
    529: "Overloaded",
}


def _anthropic_type(status: int) -> str:
    return _ANTHROPIC_TYPES.get(status) or ("api_error" if status >= 500 else "invalid_request_error")


def _anthropic_error_body(status: int, message: str | None = None) -> dict[str, Any]:
    text = message or _ANTHROPIC_MESSAGES.get(status) or f"HTTP {status} (injected)"
    return {
        "type": "error",
        "error": {"type": _anthropic_type(status), "message": text},
        "request_id": _new_id("req_"),
    }


def _anthropic_error(
    status: int, message: str | None = None, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps(_anthropic_error_body(status, message)),
        headers={**_JSON, **(headers or {})},
    )


def _anthropic_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, block in enumerate(content):
            if not isinstance(block, dict) or not isinstance(block.get("type"), str):
                raise _BadRequest(f"{where}.{j}.type: Field required")
            if block["type"] == "text":
                text = block.get("text")
                if not isinstance(text, str):
                    raise _BadRequest(f"{where}.{j}.text: Field required")
                parts.append(text)
        return "".join(parts)
    raise _BadRequest(f"{where}: Input should be a valid string or a list of content blocks")


def _anthropic_parse(raw: bytes) -> tuple[str, str, int, int, tuple[str, ...], bool]:
    """(model, last user text, prompt tokens, max_tokens, stop sequences, stream) of a request body."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise _BadRequest("There was an error parsing the body of your request: invalid JSON") from None
    if not isinstance(body, dict):
        raise _BadRequest("body: Input should be a valid dictionary")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _BadRequest("model: Field required")
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        raise _BadRequest("max_tokens: Field required")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise _BadRequest("max_tokens: Input should be a valid integer greater than or equal to 1")
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise _BadRequest(
            "messages: Field required" if messages is None else "messages: Input should be a valid list"
        )
    if not messages:
        raise _BadRequest("messages: at least one message is required")
    system = body.get("system")
    prompt_tokens = 0 if system is None else _count_words(_anthropic_text(system, "system"))
    last_user = ""
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _BadRequest(f"messages.{i}: Input should be a valid dictionary")
        role = message.get("role")
        if role not in ("user", "assistant"):
            raise _BadRequest(f"messages.{i}.role: Input should be 'user' or 'assistant'")
        if "content" not in message:
            raise _BadRequest(f"messages.{i}.content: Field required")
        text = _anthropic_text(message["content"], f"messages.{i}.content")
        prompt_tokens += _count_words(text)
        if role == "user":
            last_user = text
    stop = body.get("stop_sequences")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise _BadRequest("stop_sequences: Input should be a valid list of strings")
    for key in ("temperature", "top_p"):
        value = body.get(key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1
        ):
            raise _BadRequest(f"{key}: Input should be a number between 0 and 1")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise _BadRequest("stream: Input should be a valid boolean")
    return model, last_user, prompt_tokens, max_tokens, stops, stream


_ANTHROPIC_STOP: Final = {"stop": "end_turn", "length": "max_tokens"}
_A_BLOCK_START: Final = (
    b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
    b'"content_block":{"type":"text","text":""}}\n\n'
)
_A_PING: Final = b'event: ping\ndata: {"type": "ping"}\n\n'
_A_DELTA: Final = (
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"text_delta","text":'
)
_A_BLOCK_STOP: Final = b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
_A_MESSAGE_STOP: Final = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
_OPENAI_DONE: Final = b"data: [DONE]\n\n"


# ------------------------------------------------------------------------------------------------ gRPC


class _LLMServicer:
    """The ``LLMService`` handlers, bound to the provider's methods.

    Bound methods rather than a subclass of the generated servicer, so that grpc.aio sees ``StreamingChat``
    as an async generator function (it inspects the handler, not what it returns).
    """

    def __init__(self, fake: FakeProvider) -> None:
        self.ChatCompletion = fake._grpc_unary
        self.StreamingChat = fake._grpc_stream
        self.ListModels = fake._grpc_list_models


# -------------------------------------------------------------------------------------------- provider


class FakeProvider:
    """One fake upstream of the given ``kind`` ("openai", "anthropic" or "grpc"); see the module docstring.

    ``port=0`` binds a free port; :attr:`port` holds the real one after :meth:`start`. ``faults`` may be
    mutated at any time. ``stats`` counts chat requests: ``requests`` (all received), ``completed``,
    ``cancelled`` (the client went away first), ``injected_errors`` (``fail_next``, ``error_rate`` and broken
    streams), ``rate_limited``, ``unauthorized`` and ``rejected`` (invalid request or unknown model);
    ``inflight`` is the number of chat requests being answered.
    """

    def __init__(
        self,
        kind: str,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        api_key: str | None = None,
        models: Sequence[str] = ("demo-model", "demo-claude"),
        faults: Faults | None = None,
        response_tokens: int = 20,
        control_port: int | None = None,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind: {kind!r} is not one of {', '.join(KINDS)}")
        if not is_loopback(host):
            raise ValueError(
                f"host: {host!r} is not a loopback address; the fake provider only binds loopback"
            )
        if response_tokens < 1:
            raise ValueError(f"response_tokens: {response_tokens} must be at least 1")
        if not models:
            raise ValueError("models: at least one model is required")
        self.kind = kind
        self.host = host.strip("[]")
        self.port = port
        self.control_port = control_port
        self.api_key = api_key
        self.models: tuple[str, ...] = tuple(models)
        self._model_set = frozenset(self.models)
        self.faults = faults if faults is not None else Faults()
        self.response_tokens = response_tokens
        self.stats: dict[str, int] = {}
        self.inflight = 0
        self.reset_stats()
        self._seq = 0
        self._replies: dict[tuple[str, int | None, tuple[str, ...]], Reply] = {}
        self._runner: web.AppRunner | None = None
        self._grpc_server: Any = None
        self._bearer = f"Bearer {api_key}" if api_key is not None else None
        self._grpc_models = pb.ListModelsResponse(
            models=[
                pb.Model(id=m, owned_by="fake-provider", created=MODEL_CREATED) for m in sorted(self.models)
            ]
        )

    # ---- public surface

    @property
    def target(self) -> str:
        """``HOST:PORT``, as a gRPC channel target."""
        return _hostport(self.host, self.port)

    @property
    def base_url(self) -> str:
        """An SDK's ``base_url``: ``http://HOST:PORT/v1`` for openai, ``http://HOST:PORT`` otherwise."""
        return f"http://{self.target}/v1" if self.kind == "openai" else f"http://{self.target}"

    @property
    def control_url(self) -> str | None:
        """Base URL of the ``/_fake/...`` control API (None for a grpc provider without control_port)."""
        if self.kind != "grpc":
            return f"http://{self.target}"
        return None if self.control_port is None else f"http://{_hostport(self.host, self.control_port)}"

    def reset_stats(self) -> None:
        self.stats.update(
            requests=0,
            completed=0,
            cancelled=0,
            injected_errors=0,
            rate_limited=0,
            unauthorized=0,
            rejected=0,
        )

    def reply(self, prompt: str, max_tokens: int | None = None, stop: Sequence[str] = ()) -> Reply:
        """The answer this provider gives when ``prompt`` is the last user message (cached)."""
        key = (prompt, max_tokens, tuple(stop))
        reply = self._replies.get(key)
        if reply is None:
            reply = make_reply(prompt, self.response_tokens, max_tokens, key[2])
            if len(prompt) <= _CACHE_MAX_PROMPT:
                if len(self._replies) >= _CACHE_LIMIT:
                    self._replies.clear()
                self._replies[key] = reply
        return reply

    async def start(self) -> None:
        """Bind and start serving; raises OSError if the address cannot be bound."""
        if self.kind == "grpc":
            await self._start_grpc()
            if self.control_port is not None:
                try:
                    self._runner, self.control_port = await self._start_http(
                        self._control_routes(), self.control_port
                    )
                except BaseException:
                    await self.stop()
                    raise
        elif self.kind == "openai":
            routes = [
                web.post("/v1/chat/completions", self._openai_chat),
                web.get("/v1/models", self._openai_models),
                *self._control_routes(),
                web.route("*", "/{tail:.*}", self._openai_unknown),
            ]
            self._runner, self.port = await self._start_http(routes, self.port)
        else:
            routes = [
                web.post("/v1/messages", self._anthropic_messages),
                web.get("/v1/models", self._anthropic_models),
                *self._control_routes(),
                web.route("*", "/{tail:.*}", self._anthropic_unknown),
            ]
            self._runner, self.port = await self._start_http(routes, self.port)

    async def stop(self) -> None:
        if self._grpc_server is not None:
            server, self._grpc_server = self._grpc_server, None
            await server.stop(None)
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def __aenter__(self) -> FakeProvider:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # ---- shared machinery

    async def _start_http(self, routes: list[web.RouteDef], port: int) -> tuple[web.AppRunner, int]:
        app = web.Application(client_max_size=_MAX_BODY)
        app.add_routes(routes)
        # handler_cancellation: cancel a handler whose client disconnects (off by default in aiohttp>=3.9).
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=0.25)
        await runner.setup()
        site = web.TCPSite(runner, self.host, port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        return runner, runner.addresses[0][1]

    def _decide_fault(self) -> tuple[int, float] | None:
        """None to answer normally, else (status, retry_after) of the error to answer with."""
        faults = self.faults
        self._seq += 1
        if faults.rate_limit_every > 0 and self._seq % faults.rate_limit_every == 0:
            self.stats["rate_limited"] += 1
            return 429, faults.retry_after_s
        if faults.fail_next > 0:
            faults.fail_next -= 1
        elif not (faults.error_rate > 0.0 and random.random() < faults.error_rate):
            return None
        self.stats["injected_errors"] += 1
        return faults.error_status, faults.retry_after_s

    async def _latency(self) -> None:
        if self.faults.latency_ms > 0:
            await asyncio.sleep(self.faults.latency_ms / 1000.0)

    def _token_delay(self) -> float:
        return self.faults.token_delay_ms / 1000.0

    def _break_after(self) -> int:
        return self.faults.stream_error_after_tokens

    # ---- control API

    def _control_routes(self) -> list[web.RouteDef]:
        return [
            web.get("/_fake/stats", self._control_stats),
            web.delete("/_fake/stats", self._control_reset),
            web.get("/_fake/faults", self._control_get_faults),
            web.put("/_fake/faults", self._control_put_faults),
        ]

    def _stats_body(self) -> web.Response:
        return web.Response(body=orjson.dumps({**self.stats, "inflight": self.inflight}), headers=_JSON)

    async def _control_stats(self, request: web.Request) -> web.Response:
        return self._stats_body()

    async def _control_reset(self, request: web.Request) -> web.Response:
        self.reset_stats()
        return self._stats_body()

    async def _control_get_faults(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(self.faults.as_dict()), headers=_JSON)

    async def _control_put_faults(self, request: web.Request) -> web.Response:
        try:
            changes = orjson.loads(await request.read())
            if not isinstance(changes, dict):
                raise ValueError("body: must be a JSON object of Faults fields")
            self.faults.update(changes)
        except (ValueError, orjson.JSONDecodeError) as exc:
            return web.Response(status=400, body=orjson.dumps({"error": str(exc)}), headers=_JSON)
        return web.Response(body=orjson.dumps(self.faults.as_dict()), headers=_JSON)

    # ---- OpenAI

    def _openai_check_auth(self, request: web.Request) -> web.Response | None:
        if self._bearer is None:
            return None
        header = request.headers.get("Authorization", "")
        if hmac.compare_digest(header.encode(), self._bearer.encode()):
            return None
        self.stats["unauthorized"] += 1
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return _openai_error(
                401,
                "You didn't provide an API key. You need to provide your API key in an Authorization header "
                "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                "invalid_request_error",
            )
        return _openai_error(
            401,
            f"Incorrect API key provided: {_mask_key(key.strip())}. You can find your API key at "
            "https://platform.openai.com/account/api-keys.",
            "invalid_request_error",
            "invalid_api_key",
        )

    def _openai_injected(self, status: int, retry_after: float) -> web.Response:
        headers: dict[str, str] = {}
        if status == 429:
            retry = _seconds(retry_after)
            headers = {
                "Retry-After": retry,
                "x-ratelimit-limit-requests": "60",
                "x-ratelimit-remaining-requests": "0",
                "x-ratelimit-reset-requests": f"{retry}s",
                "x-ratelimit-limit-tokens": "150000",
                "x-ratelimit-remaining-tokens": "149000",
                "x-ratelimit-reset-tokens": "0s",
            }
        body = _openai_injected_body(status, retry_after)
        return web.Response(status=status, body=orjson.dumps(body), headers={**_JSON, **headers})

    async def _openai_chat(self, request: web.Request) -> web.StreamResponse:
        self.stats["requests"] += 1
        self.inflight += 1
        try:
            denied = self._openai_check_auth(request)
            if denied is not None:
                return denied
            try:
                model, prompt, prompt_tokens, max_tokens, stop, stream, include_usage = _openai_parse(
                    await request.read()
                )
                if model not in self._model_set:
                    raise _BadRequest(
                        f"The model `{model}` does not exist or you do not have access to it.",
                        status=404,
                        code="model_not_found",
                    )
            except _BadRequest as exc:
                self.stats["rejected"] += 1
                return _openai_error(exc.status, exc.message, "invalid_request_error", exc.code, exc.param)
            fault = self._decide_fault()
            await self._latency()
            if fault is not None:
                return self._openai_injected(*fault)
            reply = self.reply(prompt, max_tokens, stop)
            completion_id = _new_id("chatcmpl-")
            created = int(time.time())
            if stream:
                return await self._openai_stream(
                    request, reply, completion_id, created, model, prompt_tokens, include_usage
                )
            body = {
                "id": completion_id,
                "object": "chat.completion",
                "created": created,
                "model": model,
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
                    "total_tokens": prompt_tokens + reply.completion_tokens,
                },
                "service_tier": "default",
                "system_fingerprint": "fp_fake",
            }
            self.stats["completed"] += 1
            return web.Response(body=orjson.dumps(body), headers=_JSON)
        except asyncio.CancelledError:
            self.stats["cancelled"] += 1
            raise
        finally:
            self.inflight -= 1

    async def _openai_stream(
        self,
        request: web.Request,
        reply: Reply,
        completion_id: str,
        created: int,
        model: str,
        prompt_tokens: int,
        include_usage: bool,
    ) -> web.StreamResponse:
        head = (
            b'data: {"id":"%s","object":"chat.completion.chunk","created":%d,"model":%s,'
            b'"service_tier":"default","system_fingerprint":"fp_fake","choices":'
            % (completion_id.encode(), created, orjson.dumps(model))
        )
        usage_null = b',"usage":null}\n\n' if include_usage else b"}\n\n"
        open_delta = head + b'[{"index":0,"delta":{'
        close_delta = b'},"logprobs":null,"finish_reason":null}]' + usage_null
        response = web.StreamResponse(headers=_SSE)
        delay = self._token_delay()
        break_after = self._break_after()
        try:
            await response.prepare(request)
            first = open_delta + b'"role":"assistant","content":"","refusal":null' + close_delta
            if delay <= 0 and break_after < 0:
                chunks = [first]
                chunks.extend(open_delta + b'"content":' + token + close_delta for token in reply.json_tokens)
            else:
                await response.write(first)
                chunks = []
                for i, token in enumerate(reply.json_tokens):
                    if i == break_after:
                        return await self._openai_break(response)
                    if delay > 0 and i:
                        await asyncio.sleep(delay)
                    await response.write(open_delta + b'"content":' + token + close_delta)
                if break_after == len(reply.json_tokens):
                    return await self._openai_break(response)
            chunks.append(
                head
                + b'[{"index":0,"delta":{},"logprobs":null,"finish_reason":"%s"}]' % reply.finish.encode()
                + usage_null
            )
            if include_usage:
                chunks.append(
                    head
                    + b'[],"usage":{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d}}\n\n'
                    % (prompt_tokens, reply.completion_tokens, prompt_tokens + reply.completion_tokens)
                )
            chunks.append(_OPENAI_DONE)
            await response.write(b"".join(chunks))
            await response.write_eof()
        except ConnectionResetError:
            self.stats["cancelled"] += 1
            return response
        self.stats["completed"] += 1
        return response

    async def _openai_break(self, response: web.StreamResponse) -> web.StreamResponse:
        """What OpenAI sends when a stream fails midway: an error event, then the connection ends."""
        self.stats["injected_errors"] += 1
        error = _openai_injected_body(self.faults.error_status, self.faults.retry_after_s)
        await response.write(b"data: " + orjson.dumps(error) + b"\n\n")
        await response.write_eof()
        return response

    async def _openai_models(self, request: web.Request) -> web.Response:
        denied = self._openai_check_auth(request)
        if denied is not None:
            return denied
        data = [
            {"id": m, "object": "model", "created": MODEL_CREATED, "owned_by": "system"} for m in self.models
        ]
        return web.Response(body=orjson.dumps({"object": "list", "data": data}), headers=_JSON)

    async def _openai_unknown(self, request: web.Request) -> web.Response:
        return _openai_error(404, f"Invalid URL ({request.method} {request.path})", "invalid_request_error")

    # ---- Anthropic

    def _anthropic_check_headers(self, request: web.Request) -> web.Response | None:
        if self.api_key is not None:
            key = request.headers.get("x-api-key")
            if key is None:
                scheme, _, key = request.headers.get("Authorization", "").partition(" ")
                if scheme.lower() != "bearer":
                    key = ""
            if not key:
                self.stats["unauthorized"] += 1
                return _anthropic_error(401, "x-api-key header is required")
            if not hmac.compare_digest(key.encode(), self.api_key.encode()):
                self.stats["unauthorized"] += 1
                return _anthropic_error(401, "invalid x-api-key")
        if not request.headers.get("anthropic-version"):
            return _anthropic_error(400, "anthropic-version: header is required")
        return None

    def _anthropic_injected(self, status: int, retry_after: float) -> web.Response:
        headers = None
        if status == 429:
            headers = {
                "retry-after": _seconds(retry_after),
                "anthropic-ratelimit-requests-limit": "60",
                "anthropic-ratelimit-requests-remaining": "0",
            }
        return _anthropic_error(status, None, headers)

    async def _anthropic_messages(self, request: web.Request) -> web.StreamResponse:
        self.stats["requests"] += 1
        self.inflight += 1
        try:
            denied = self._anthropic_check_headers(request)
            if denied is not None:
                if denied.status == 400:
                    self.stats["rejected"] += 1
                return denied
            try:
                model, prompt, prompt_tokens, max_tokens, stop, stream = _anthropic_parse(
                    await request.read()
                )
                if model not in self._model_set:
                    raise _BadRequest(f"model: {model}", status=404)
            except _BadRequest as exc:
                self.stats["rejected"] += 1
                return _anthropic_error(exc.status, exc.message)
            fault = self._decide_fault()
            await self._latency()
            if fault is not None:
                return self._anthropic_injected(*fault)
            reply = self.reply(prompt, max_tokens, stop)
            message_id = "msg_01" + os.urandom(11).hex()
            stop_reason = (
                "stop_sequence" if reply.stop_sequence is not None else _ANTHROPIC_STOP[reply.finish]
            )
            if stream:
                return await self._anthropic_stream(
                    request, reply, message_id, model, prompt_tokens, stop_reason
                )
            body = {
                "id": message_id,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [{"type": "text", "text": reply.text}],
                "stop_reason": stop_reason,
                "stop_sequence": reply.stop_sequence,
                "usage": {
                    "input_tokens": prompt_tokens,
                    "cache_creation_input_tokens": 0,
                    "cache_read_input_tokens": 0,
                    "output_tokens": reply.completion_tokens,
                    "service_tier": "standard",
                },
            }
            self.stats["completed"] += 1
            return web.Response(body=orjson.dumps(body), headers=_JSON)
        except asyncio.CancelledError:
            self.stats["cancelled"] += 1
            raise
        finally:
            self.inflight -= 1

    async def _anthropic_stream(
        self,
        request: web.Request,
        reply: Reply,
        message_id: str,
        model: str,
        prompt_tokens: int,
        stop_reason: str,
    ) -> web.StreamResponse:
        start = {
            "type": "message_start",
            "message": {
                "id": message_id,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {
                    "input_tokens": prompt_tokens,
                    "cache_creation_input_tokens": 0,
                    "cache_read_input_tokens": 0,
                    "output_tokens": 1,
                    "service_tier": "standard",
                },
            },
        }
        opening = b"event: message_start\ndata: " + orjson.dumps(start) + b"\n\n" + _A_BLOCK_START + _A_PING
        response = web.StreamResponse(headers=_SSE)
        delay = self._token_delay()
        break_after = self._break_after()
        try:
            await response.prepare(request)
            if delay <= 0 and break_after < 0:
                chunks = [opening]
                chunks.extend(_A_DELTA + token + b"}}\n\n" for token in reply.json_tokens)
            else:
                await response.write(opening)
                chunks = []
                for i, token in enumerate(reply.json_tokens):
                    if i == break_after:
                        return await self._anthropic_break(response)
                    if delay > 0 and i:
                        await asyncio.sleep(delay)
                    await response.write(_A_DELTA + token + b"}}\n\n")
                if break_after == len(reply.json_tokens):
                    return await self._anthropic_break(response)
            delta = {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": reply.stop_sequence},
                "usage": {"output_tokens": reply.completion_tokens},
            }
            chunks.append(_A_BLOCK_STOP + b"event: message_delta\ndata: " + orjson.dumps(delta) + b"\n\n")
            chunks.append(_A_MESSAGE_STOP)
            await response.write(b"".join(chunks))
            await response.write_eof()
        except ConnectionResetError:
            self.stats["cancelled"] += 1
            return response
        self.stats["completed"] += 1
        return response

    async def _anthropic_break(self, response: web.StreamResponse) -> web.StreamResponse:
        """What Anthropic sends when a stream fails midway: an ``error`` event, then the connection ends."""
        self.stats["injected_errors"] += 1
        error = _anthropic_error_body(self.faults.error_status)
        await response.write(b"event: error\ndata: " + orjson.dumps(error) + b"\n\n")
        await response.write_eof()
        return response

    async def _anthropic_models(self, request: web.Request) -> web.Response:
        denied = self._anthropic_check_headers(request)
        if denied is not None:
            return denied
        data = [
            {
                "type": "model",
                "id": m,
                "display_name": m.replace("-", " ").title(),
                "created_at": _MODEL_CREATED_AT,
            }
            for m in self.models
        ]
        body = {"data": data, "has_more": False, "first_id": data[0]["id"], "last_id": data[-1]["id"]}
        return web.Response(body=orjson.dumps(body), headers=_JSON)

    async def _anthropic_unknown(self, request: web.Request) -> web.Response:
        return _anthropic_error(404, "Not Found")

    # ---- gRPC

    async def _start_grpc(self) -> None:
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        llm_service_pb2_grpc.add_LLMServiceServicer_to_server(_LLMServicer(self), server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        try:
            port = server.add_insecure_port(self.target)
        except RuntimeError as exc:  # grpcio reports a failed bind as RuntimeError
            raise OSError(f"cannot bind the gRPC server to {self.target}: {exc}") from exc
        if not port:
            raise OSError(f"cannot bind the gRPC server to {self.target}")
        self.port = port
        await server.start()
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        await health_servicer.set("llmgateway.v1.LLMService", health_pb2.HealthCheckResponse.SERVING)
        self._grpc_server = server

    async def _grpc_auth(self, context: grpc.aio.ServicerContext) -> None:
        if self._bearer is None:
            return
        for key, value in context.invocation_metadata() or ():
            if key == "authorization" and hmac.compare_digest(value.encode(), self._bearer.encode()):
                return
        self.stats["unauthorized"] += 1
        await context.abort(
            grpc.StatusCode.UNAUTHENTICATED, "invalid or missing API key (authorization: Bearer ...)"
        )

    async def _grpc_list_models(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        await self._grpc_auth(context)
        return self._grpc_models

    async def _grpc_admit(self, request: pb.ChatRequest, context: grpc.aio.ServicerContext) -> None:
        """Auth, validation, faults and latency; aborts the RPC unless it is to be answered."""
        await self._grpc_auth(context)
        try:
            validate_request(request)
        except GatewayError as exc:
            self.stats["rejected"] += 1
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, exc.message)
        if request.model not in self._model_set:
            self.stats["rejected"] += 1
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model {request.model!r} not found")
        fault = self._decide_fault()
        await self._latency()
        if fault is not None:
            status, retry_after = fault
            await self._grpc_abort(context, status, retry_after)

    async def _grpc_abort(self, context: grpc.aio.ServicerContext, status: int, retry_after: float) -> None:
        code = grpc_code_for(status)
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            await context.abort(
                code,
                f"rate limit exceeded; retry after {_seconds(retry_after)}s",
                trailing_metadata=(("retry-after", _seconds(retry_after)),),
            )
        await context.abort(code, f"injected error (HTTP {status})")

    def _grpc_prompt(self, request: pb.ChatRequest) -> tuple[str, int]:
        last_user = ""
        prompt_tokens = 0
        for message in request.messages:
            prompt_tokens += _count_words(message.content)
            if message.role == pb.ROLE_USER:
                last_user = message.content
        return last_user, prompt_tokens

    async def _grpc_unary(
        self, request: pb.ChatRequest, context: grpc.aio.ServicerContext
    ) -> pb.ChatResponse:
        self.stats["requests"] += 1
        self.inflight += 1
        try:
            await self._grpc_admit(request, context)
            prompt, prompt_tokens = self._grpc_prompt(request)
            reply = self.reply(
                prompt, request.max_tokens if request.HasField("max_tokens") else None, request.stop
            )
            response = pb.ChatResponse(
                id=_new_id("chatcmpl-"),
                model=request.model,
                content=reply.text,
                finish_reason=pb.FINISH_REASON_LENGTH if reply.finish == "length" else pb.FINISH_REASON_STOP,
                usage=pb.Usage(
                    prompt_tokens=prompt_tokens,
                    completion_tokens=reply.completion_tokens,
                    total_tokens=prompt_tokens + reply.completion_tokens,
                ),
                created=int(time.time()),
            )
            self.stats["completed"] += 1
            return response
        except asyncio.CancelledError:
            self.stats["cancelled"] += 1
            raise
        finally:
            self.inflight -= 1

    async def _grpc_stream(
        self, request: pb.ChatRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ChatChunk]:
        self.stats["requests"] += 1
        self.inflight += 1
        try:
            await self._grpc_admit(request, context)
            prompt, prompt_tokens = self._grpc_prompt(request)
            reply = self.reply(
                prompt, request.max_tokens if request.HasField("max_tokens") else None, request.stop
            )
            chunk_id = _new_id("chatcmpl-")
            created = int(time.time())
            delay = self._token_delay()
            break_after = self._break_after()
            for i, token in enumerate(reply.tokens):
                if i == break_after:
                    self.stats["injected_errors"] += 1
                    await self._grpc_abort(context, self.faults.error_status, self.faults.retry_after_s)
                if delay > 0 and i:
                    await asyncio.sleep(delay)
                yield pb.ChatChunk(id=chunk_id, model=request.model, delta=token, created=created)
            if break_after == len(reply.tokens):
                self.stats["injected_errors"] += 1
                await self._grpc_abort(context, self.faults.error_status, self.faults.retry_after_s)
            yield pb.ChatChunk(
                id=chunk_id,
                model=request.model,
                finish_reason=pb.FINISH_REASON_LENGTH if reply.finish == "length" else pb.FINISH_REASON_STOP,
                usage=pb.Usage(
                    prompt_tokens=prompt_tokens,
                    completion_tokens=reply.completion_tokens,
                    total_tokens=prompt_tokens + reply.completion_tokens,
                ),
                created=created,
            )
            self.stats["completed"] += 1
        except (asyncio.CancelledError, GeneratorExit):
            self.stats["cancelled"] += 1
            raise
        finally:
            self.inflight -= 1


# ------------------------------------------------------------------------------------------------- CLI


def _listen(value: str) -> tuple[str, int]:
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not HOST:PORT (for example {DEFAULT_LISTEN})")
    host = host.strip("[]")
    if not is_loopback(host):
        raise argparse.ArgumentTypeError(
            f"{host!r} is not a loopback address; the fake provider only listens on 127.0.0.1, ::1 or "
            "localhost"
        )
    return host, int(port_text)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``fake-provider`` options to ``parser``."""
    parser.add_argument("--kind", required=True, choices=KINDS, help="the API to speak")
    parser.add_argument(
        "--listen",
        type=_listen,
        default=_listen(DEFAULT_LISTEN),
        metavar="HOST:PORT",
        help=f"loopback address to listen on (default {DEFAULT_LISTEN}; port 0 picks a free one)",
    )
    parser.add_argument(
        "--api-key-env",
        metavar="VAR",
        help="require the API key held in environment variable VAR (default: no auth)",
    )
    parser.add_argument(
        "--models", metavar="A,B", default="demo-model,demo-claude", help="comma-separated model names"
    )
    parser.add_argument(
        "--response-tokens", metavar="N", type=int, default=20, help="words per reply (default 20)"
    )
    parser.add_argument(
        "--control-port",
        metavar="PORT",
        type=int,
        default=None,
        help="grpc kind: serve the /_fake control API over HTTP on this port",
    )
    defaults = Faults()
    faults = parser.add_argument_group("faults (changeable at runtime with PUT /_fake/faults)")
    faults.add_argument(
        "--latency-ms", metavar="MS", type=float, default=defaults.latency_ms, help="delay before answering"
    )
    faults.add_argument(
        "--token-delay-ms",
        metavar="MS",
        type=float,
        default=defaults.token_delay_ms,
        help="delay between streamed tokens",
    )
    faults.add_argument(
        "--error-rate",
        metavar="P",
        type=float,
        default=defaults.error_rate,
        help="probability in [0, 1] that a request fails with --error-status",
    )
    faults.add_argument(
        "--error-status",
        metavar="STATUS",
        type=int,
        default=defaults.error_status,
        help="HTTP status of injected errors (mapped to a gRPC code for kind grpc)",
    )
    faults.add_argument(
        "--fail-next", metavar="N", type=int, default=defaults.fail_next, help="fail the next N requests"
    )
    faults.add_argument(
        "--rate-limit-every",
        metavar="N",
        type=int,
        default=defaults.rate_limit_every,
        help="answer every Nth request with 429 / RESOURCE_EXHAUSTED",
    )
    faults.add_argument(
        "--retry-after",
        metavar="SECONDS",
        dest="retry_after_s",
        type=float,
        default=defaults.retry_after_s,
        help="Retry-After seconds sent with rate limiting",
    )
    faults.add_argument(
        "--stream-error-after-tokens",
        metavar="N",
        type=int,
        default=defaults.stream_error_after_tokens,
        help="break streams with a provider-native error after this many tokens (-1: never)",
    )


def provider_from_args(args: argparse.Namespace) -> FakeProvider:
    """The (unstarted) provider that parsed ``configure_parser`` options describe; ValueError if invalid."""
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise ValueError(f"--api-key-env: environment variable {args.api_key_env} is not set or empty")
    faults = Faults()
    faults.update({f.name: getattr(args, f.name) for f in dataclasses.fields(Faults)})
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    host, port = args.listen
    return FakeProvider(
        args.kind,
        host,
        port,
        api_key=api_key,
        models=models,
        faults=faults,
        response_tokens=args.response_tokens,
        control_port=args.control_port,
    )


async def _serve(provider: FakeProvider) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await provider.start()
    try:
        print(f"fake-provider kind={provider.kind} listening on {provider.target}", flush=True)
        await stop.wait()
    finally:
        await provider.stop()


def run(args: argparse.Namespace) -> int:
    """Run the provider with uvloop until SIGINT or SIGTERM; returns the process exit code."""
    try:
        provider = provider_from_args(args)
    except ValueError as exc:
        print(f"fake-provider: {exc}", file=sys.stderr)
        return 2
    try:
        uvloop.run(_serve(provider))
    except OSError as exc:
        print(f"fake-provider: cannot listen on {provider.target}: {exc}", file=sys.stderr)
        return 1
    return 0
