"""Anthropic's Messages API on the REST port, so the official ``anthropic`` SDKs work unchanged.

``POST /v1/messages`` takes a Messages API request (``x-api-key`` or ``Authorization: Bearer`` carries the
client key, checked like the OpenAI front's; ``anthropic-version`` is accepted and not required;
``anthropic-beta`` goes on to an Anthropic provider as it came, beside any the provider's headers set) and routes
it by model like chat: the request becomes a hub ``ChatRequest`` (:mod:`llmgw.codecs.anthropic_messages`).
When the model is served by an Anthropic provider, what only Anthropic understands (``thinking``, ``top_k``,
``cache_control``, server tools, documents) is kept as it is and reaches the provider unchanged; otherwise it
is translated (``thinking`` to ``reasoning_effort``) or refused with 400 naming it. The answer is a Messages
API ``message``, or with ``"stream": true`` Anthropic's event sequence (``message_start``, ``ping``, each
block's ``content_block_start`` / ``content_block_delta`` / ``content_block_stop``, ``message_delta`` with
the usage, ``message_stop``). Errors take Anthropic's shape (``{"type": "error", "error": {"type",
"message"}}``); an overloaded or unavailable upstream is ``overloaded_error`` with HTTP 529.

``POST /v1/messages/count_tokens`` is passed to the Anthropic provider of the model's route; a model served by
another provider type gets a 400 that says so.
"""

from __future__ import annotations

from collections.abc import Mapping

import orjson

from llmgateway.v1 import llm_service_pb2 as pb
from llmgw._net.http_server import Request, Responder
from llmgw.chat import clip
from llmgw.codecs import anthropic_messages as am
from llmgw.errors import GatewayError, Kind
from llmgw.fronts.rest import JSON_HEADERS, NotServed, Routes
from llmgw.gateway import Gateway
from llmgw.providers.anthropic import AnthropicClient
from llmgw.providers.base import CallStats

_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_OVERLOADED = frozenset({503, 529})  # upstream statuses reported as Anthropic's overloaded_error


def error_status(exc: GatewayError) -> tuple[int, str]:
    """The HTTP status and Anthropic error type of ``exc``."""
    if exc.upstream_status in _OVERLOADED or exc.kind is Kind.UNAVAILABLE:
        return 529, "overloaded_error"
    status = exc.kind.http_status
    if exc.kind is Kind.BAD_GATEWAY or exc.kind is Kind.INTERNAL:
        return status, "api_error"
    if exc.kind is Kind.CANCELLED:
        return 499, "api_error"
    return status, exc.kind.error_type


def send_error(respond: Responder, exc: GatewayError) -> None:
    status, error_type = error_status(exc)
    headers = dict(JSON_HEADERS)
    if exc.retry_after is not None:
        headers["retry-after"] = f"{max(1, round(exc.retry_after))}"
    elif exc.kind is Kind.RESOURCE_EXHAUSTED:
        headers["retry-after"] = "1"
    respond.send(status, orjson.dumps(am.error_json(error_type, exc.message)), headers)


def not_served(respond: Responder, status: int, message: str, headers: Mapping[str, str]) -> None:
    """A 404 or 405 below ``/v1/messages``, in Anthropic's error shape."""
    error_type = "not_found_error" if status == 404 else "invalid_request_error"
    respond.send(status, orjson.dumps(am.error_json(error_type, message)), {**JSON_HEADERS, **headers})


class AnthropicFront:
    """``POST /v1/messages`` and ``POST /v1/messages/count_tokens``."""

    def __init__(self, gateway: Gateway, max_request_bytes: int) -> None:
        self.gateway = gateway
        self.max_request_bytes = max_request_bytes

    error_shapes: Mapping[str, NotServed] = {"/v1/messages": not_served}

    def routes(self) -> Routes:
        return {
            "/v1/messages": ("POST", self.messages),
            "/v1/messages/count_tokens": ("POST", self.count_tokens),
        }

    def _authenticate(self, request: Request) -> None:
        authorization = request.headers.get("authorization")
        key = request.headers.get("x-api-key")
        if key is not None and not authorization:
            authorization = f"Bearer {key}"
        self.gateway.authenticate(authorization, "rest")

    def _body(self, request: Request) -> object:
        if request.too_large:
            self.gateway.metrics.rejected.labels("rest", "too_large").inc()
            raise GatewayError(
                Kind.PAYLOAD_TOO_LARGE, f"request body exceeds the limit of {self.max_request_bytes} bytes"
            )
        try:
            return orjson.loads(request.body)
        except orjson.JSONDecodeError as exc:
            self.gateway.metrics.rejected.labels("rest", "invalid").inc()
            raise GatewayError(Kind.INVALID_ARGUMENT, f"request body: not valid JSON ({exc})") from None

    def _anthropic_client(self, model: object) -> AnthropicClient | None:
        """The Anthropic provider that serves ``model`` on every path of its route, if one does."""
        if not isinstance(model, str):
            return None
        runtime = self.gateway.runtime
        try:
            route = runtime.route(model)
        except GatewayError:
            return None
        if route.rest is None or (route.grpc is not None and route.grpc_weight > 0):
            return None
        client = runtime.clients.get(route.rest)
        return client if isinstance(client, AnthropicClient) else None

    def _parse(self, request: Request) -> tuple[pb.ChatRequest, bool]:
        body = self._body(request)
        model = body.get("model") if isinstance(body, dict) else None
        try:
            req, stream = am.request_from_json(body, native=self._anthropic_client(model) is not None)
            req.anthropic_beta.extend(am.betas(request.headers.get("anthropic-beta")))
            return req, stream
        except GatewayError:
            self.gateway.metrics.rejected.labels("rest", "invalid").inc()
            raise

    async def messages(self, request: Request, respond: Responder) -> None:
        try:
            self._authenticate(request)
            req, stream = self._parse(request)
            if not stream:
                response = await self.gateway.complete(req, front="rest")
                respond.send(200, orjson.dumps(am.response_to_json(response)), JSON_HEADERS)
                return
            req.chunk_layout = pb.CHUNK_LAYOUT_OPENAI
            chunks = self.gateway.stream(req, front="rest")
            try:
                first = await anext(chunks)
            except StopAsyncIteration:
                raise GatewayError(Kind.BAD_GATEWAY, "the provider's stream ended without a reply") from None
            except BaseException:
                await chunks.aclose()
                raise
        except GatewayError as exc:
            send_error(respond, exc)
            return
        writer = am.EventWriter(req.model)
        respond.limit_time(self.gateway.stream_write_limit(None))
        respond.start(200, _SSE_HEADERS)
        try:
            await respond.write(writer.feed(first))
            async for chunk in chunks:
                if data := writer.feed(chunk):
                    await respond.write(data)
            await respond.write(writer.end())
        except GatewayError as exc:
            # Headers are gone: Anthropic's SDKs raise on an error event inside the stream.
            error_type = error_status(exc)[1]
            await respond.write(am.event("error", am.error_json(error_type, exc.message)))
        finally:
            await chunks.aclose()
        await respond.end()

    async def count_tokens(self, request: Request, respond: Responder) -> None:
        try:
            self._authenticate(request)
            body = self._body(request)
            if not isinstance(body, dict) or not isinstance(body.get("model"), str):
                raise GatewayError(Kind.INVALID_ARGUMENT, "model: Field required")
            model = body["model"]
            route = self.gateway.runtime.route(model)
            client = self._anthropic_client(model)
            if client is None:
                raise GatewayError(
                    Kind.INVALID_ARGUMENT,
                    f"count_tokens: model {clip(model)} is not served by an Anthropic provider, which alone "
                    "counts tokens",
                )
            body["model"] = route.upstream_model or model
            betas = am.betas(request.headers.get("anthropic-beta"))
            data = await client.count_tokens(body, client.provider.timeout_s, CallStats(), betas)
        except GatewayError as exc:
            send_error(respond, exc)
            return
        respond.send(200, data, JSON_HEADERS)
