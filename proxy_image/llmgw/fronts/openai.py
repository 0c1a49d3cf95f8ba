"""The OpenAI-compatible REST front, so existing clients and SDKs keep working.

Its routes are served by the REST port's router (:mod:`llmgw.fronts.rest`).

``POST /v1/chat/completions`` takes the whole Chat Completions API (tools, images, response_format, n,
logprobs, vendor extras, ...: :mod:`llmgw.codecs.openai_chat` keeps every field) and answers with JSON, or
with Server-Sent Events when ``"stream": true``, chunk for chunk as OpenAI sends them (the usage in a
separate last chunk with no choices only when ``stream_options.include_usage`` asks for it):
response headers go out only once the first token is there, so a failure before it is still a proper
HTTP error (and the gateway may still fall back to the other path); a failure after it ends the stream
with an OpenAI-style ``{"error": ...}`` event. A client that disconnects cancels its upstream call.

``POST /v1/embeddings`` goes through the protobuf messages too (:mod:`llmgw.codecs.openai_embeddings`), to an
openai provider or an engine's or llmgateway provider's ``Embed``. ``POST /v1/responses`` and
``POST /v1/completions`` (OpenAI's Responses and legacy Completions APIs, which vLLM serves too) are relayed as
JSON to the providers that serve them (openai providers as they are but for the model name, engine providers
both, see :mod:`llmgw.providers._engine_responses` and :mod:`llmgw.providers._engine_completions`), their
Server-Sent Events event for event;
a failure after the first event ends the stream with the API's own error event. ``GET /v1/models/{id}`` answers OpenAI's model object, or
its 404. ``x-llmgw-timeout-seconds`` sets a request's deadline (``limits.requestTimeoutSeconds`` stays the
cap).
"""

from __future__ import annotations

import urllib.parse
from typing import Any

import orjson

from llmgateway.v1 import llm_service_pb2 as pb
from llmgw._net.http_server import Request, Responder
from llmgw.chat import clip_text, to_openai_layout
from llmgw.codecs import openai_chat, openai_embeddings
from llmgw.errors import GatewayError, Kind
from llmgw.fronts.rest import JSON_HEADERS, Routes, error_json, send_error
from llmgw.gateway import Gateway

_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


TIMEOUT_HEADER = "x-llmgw-timeout-seconds"


def client_timeout(request: Request) -> float | None:
    """The deadline the client asks for in ``x-llmgw-timeout-seconds`` (seconds, a positive number), if
    any; ``limits.requestTimeoutSeconds`` stays the cap."""
    value = request.headers.get(TIMEOUT_HEADER)
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise GatewayError(
            Kind.INVALID_ARGUMENT,
            f"{TIMEOUT_HEADER}: must be a positive number of seconds, got {value[:32]!r}",
        )
    return seconds


def _sse(payload: object) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


class OpenAIFront:
    """``POST /v1/chat/completions``, ``/v1/embeddings``, ``/v1/responses``, ``/v1/completions``,
    ``GET /v1/models`` and ``GET /v1/models/{id}``."""

    def __init__(self, gateway: Gateway, max_request_bytes: int) -> None:
        self.gateway = gateway
        self.max_request_bytes = max_request_bytes

    def routes(self) -> Routes:
        return {
            "/v1/chat/completions": ("POST", self.chat_completions),
            "/v1/models": ("GET", self.models),
            "/v1/models/{id}": ("GET", self.model),
            "/v1/embeddings": ("POST", self.embeddings),
            "/v1/responses": ("POST", self.responses),
            "/v1/completions": ("POST", self.completions),
        }

    def _parse(self, request: Request) -> tuple[pb.ChatRequest, bool]:
        try:
            return openai_chat.request_from_json(self._body(request))
        except GatewayError as exc:
            reason = "too_large" if exc.kind is Kind.PAYLOAD_TOO_LARGE else "invalid"
            self.gateway.metrics.rejected.labels("rest", reason).inc()
            raise

    def _body(self, request: Request) -> object:
        if request.too_large:
            raise GatewayError(
                Kind.PAYLOAD_TOO_LARGE, f"request body exceeds the limit of {self.max_request_bytes} bytes"
            )
        try:
            return orjson.loads(request.body)
        except orjson.JSONDecodeError as exc:
            raise GatewayError(Kind.INVALID_ARGUMENT, f"request body: not valid JSON ({exc})") from None

    async def chat_completions(self, request: Request, respond: Responder) -> None:
        try:
            self.gateway.authenticate(request.headers.get("authorization"), "rest")
            req, stream = self._parse(request)
            timeout = client_timeout(request)
            if not stream:
                response = await self.gateway.complete(req, front="rest", timeout=timeout)
                respond.send(200, orjson.dumps(openai_chat.response_to_json(response)), JSON_HEADERS)
                return
            req.chunk_layout = pb.CHUNK_LAYOUT_OPENAI
            upstream = self.gateway.stream(req, front="rest", timeout=timeout)
            chunks = to_openai_layout(upstream, req.stream_options.include_usage)
            try:
                first = await anext(chunks)
            except BaseException:
                await chunks.aclose()
                await upstream.aclose()
                raise
        except GatewayError as exc:
            send_error(respond, exc)
            return
        respond.limit_time(self.gateway.stream_write_limit(timeout))
        respond.start(200, _SSE_HEADERS)
        try:
            await respond.write(_sse(openai_chat.chunk_to_json(first)))
            async for chunk in chunks:
                await respond.write(_sse(openai_chat.chunk_to_json(chunk)))
            await respond.write(b"data: [DONE]\n\n")
        except GatewayError as exc:
            # Headers are gone; the OpenAI SDKs raise on an error object inside the stream.
            await respond.write(_sse(error_json(exc)))
        finally:
            await chunks.aclose()
            await upstream.aclose()
        await respond.end()

    async def models(self, request: Request, respond: Responder) -> None:
        try:
            self.gateway.authenticate(request.headers.get("authorization"), "rest")
        except GatewayError as exc:
            send_error(respond, exc)
            return
        data = [
            {"id": m.id, "object": "model", "created": m.created, "owned_by": m.owned_by}
            for m in self.gateway.list_models()
        ]
        respond.send(200, orjson.dumps({"object": "list", "data": data}), JSON_HEADERS)

    async def model(self, request: Request, respond: Responder) -> None:
        try:
            self.gateway.authenticate(request.headers.get("authorization"), "rest")
        except GatewayError as exc:
            send_error(respond, exc)
            return
        model_id = urllib.parse.unquote(request.path[len("/v1/models/") :])
        m = self.gateway.find_model(model_id)
        if m is not None:
            body = {"id": m.id, "object": "model", "created": m.created, "owned_by": m.owned_by}
            respond.send(200, orjson.dumps(body), JSON_HEADERS)
            return
        message = f"The model {clip_text(model_id)!r} does not exist or you do not have access to it."
        error = openai_chat.error_body(message, "invalid_request_error", code="model_not_found")
        respond.send(404, orjson.dumps(error), JSON_HEADERS)

    def _json_object(self, request: Request) -> dict[str, Any]:
        try:
            body = self._body(request)
        except GatewayError as exc:
            reason = "too_large" if exc.kind is Kind.PAYLOAD_TOO_LARGE else "invalid"
            self.gateway.metrics.rejected.labels("rest", reason).inc()
            raise
        if not isinstance(body, dict):
            self.gateway.metrics.rejected.labels("rest", "invalid").inc()
            raise GatewayError(Kind.INVALID_ARGUMENT, "request body: must be a JSON object")
        return body

    async def embeddings(self, request: Request, respond: Responder) -> None:
        try:
            self.gateway.authenticate(request.headers.get("authorization"), "rest")
            body = self._json_object(request)
            try:
                req = openai_embeddings.request_from_json(body)
            except GatewayError:
                self.gateway.metrics.rejected.labels("rest", "invalid").inc()
                raise
            response = await self.gateway.embed(req, front="rest", timeout=client_timeout(request))
        except GatewayError as exc:
            send_error(respond, exc)
            return
        respond.send(200, orjson.dumps(openai_embeddings.response_to_json(response)), JSON_HEADERS)

    async def responses(self, request: Request, respond: Responder) -> None:
        await self._relay(request, respond, "/responses")

    async def completions(self, request: Request, respond: Responder) -> None:
        await self._relay(request, respond, "/completions")

    async def _relay(self, request: Request, respond: Responder, endpoint: str) -> None:
        """An API the gateway relays as JSON to the providers that serve it (openai: as it is, but for the
        model name)."""
        try:
            self.gateway.authenticate(request.headers.get("authorization"), "rest")
            body = self._json_object(request)
            model = body.get("model")
            if not isinstance(model, str) or not model:
                self.gateway.metrics.rejected.labels("rest", "invalid").inc()
                raise GatewayError(Kind.INVALID_ARGUMENT, "model: required, a non-empty string")
            timeout = client_timeout(request)
            if body.get("stream") is not True:
                answer = await self.gateway.relay(endpoint, body, front="rest", timeout=timeout)
                respond.send(200, orjson.dumps(answer), JSON_HEADERS)
                return
            events = self.gateway.relay_stream(endpoint, body, front="rest", timeout=timeout)
            try:
                first = await anext(events)
            except BaseException:
                await events.aclose()
                raise
        except StopAsyncIteration:
            first = None
        except GatewayError as exc:
            send_error(respond, exc)
            return
        respond.limit_time(self.gateway.stream_write_limit(timeout))
        respond.start(200, _SSE_HEADERS)
        try:
            if first is not None:
                await respond.write(_event(*first))
                async for event in events:
                    await respond.write(_event(*event))
        except GatewayError as exc:
            await respond.write(_relay_error(endpoint, exc))
        finally:
            await events.aclose()
        await respond.end()


def _event(name: str, data: bytes) -> bytes:
    if name:
        return b"event: " + name.encode() + b"\ndata: " + data + b"\n\n"
    return b"data: " + data + b"\n\n"


def _relay_error(endpoint: str, exc: GatewayError) -> bytes:
    """The event a relayed stream ends with when it fails midway, in the API's own shape."""
    if endpoint == "/responses":
        error = {"type": "error", "code": exc.kind.name.lower(), "message": exc.message, "param": None}
        return _event("error", orjson.dumps(error))
    return _sse(error_json(exc))
