"""The REST front (OpenAI-compatible, so existing clients and SDKs keep working) and the admin endpoints.

``POST /v1/chat/completions`` answers with JSON, or with Server-Sent Events when ``"stream": true``:
response headers go out only once the first token is there, so a failure before it is still a proper
HTTP error (and the gateway may still fall back to the other path); a failure after it ends the stream
with an OpenAI-style ``{"error": ...}`` event. A client that disconnects cancels its upstream call.

The admin port serves ``/metrics`` (Prometheus), ``/healthz`` (the process is alive) and ``/readyz``
(the proxy accepts traffic; 503 while draining).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from llmgateway.v1 import llm_service_pb2 as pb

from . import openai_format
from .errors import GatewayError, Kind
from .gateway import Gateway

log = logging.getLogger("llmgw.rest")

_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _error_json(exc: GatewayError) -> dict[str, object]:
    """OpenAI's error envelope for ``exc``, for a plain response and for an error event inside a stream."""
    return openai_format.error_body(exc.message, exc.kind.error_type, code=exc.kind.name.lower())


def error_response(exc: GatewayError) -> web.Response:
    headers = {}
    if exc.retry_after is not None:
        headers["Retry-After"] = f"{max(1, round(exc.retry_after))}"
    elif exc.kind is Kind.RESOURCE_EXHAUSTED:
        headers["Retry-After"] = "1"
    body = _error_json(exc)
    return web.Response(
        status=exc.kind.http_status, body=orjson.dumps(body), content_type="application/json", headers=headers
    )


def _sse(payload: object) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


class RestFront:
    def __init__(self, gateway: Gateway, max_request_bytes: int) -> None:
        self.gateway = gateway
        self.max_request_bytes = max_request_bytes
        self.app = web.Application(client_max_size=max_request_bytes, handler_args={"max_field_size": 16384})
        self.app.router.add_post("/v1/chat/completions", self.chat_completions)
        self.app.router.add_get("/v1/models", self.models)

    async def _parse(self, request: web.Request) -> tuple[pb.ChatRequest, bool]:
        try:
            return openai_format.request_from_json(await self._body(request))
        except GatewayError as exc:
            reason = "too_large" if exc.kind is Kind.PAYLOAD_TOO_LARGE else "invalid"
            self.gateway.metrics.rejected.labels("rest", reason).inc()
            raise

    async def _body(self, request: web.Request) -> object:
        if request.content_length is not None and request.content_length > self.max_request_bytes:
            raise GatewayError(
                Kind.PAYLOAD_TOO_LARGE,
                f"request body of {request.content_length} bytes exceeds the limit of {self.max_request_bytes}",
            )
        try:
            data = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise GatewayError(
                Kind.PAYLOAD_TOO_LARGE, f"request body exceeds the limit of {self.max_request_bytes} bytes"
            ) from None
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise GatewayError(Kind.INVALID_ARGUMENT, f"request body: not valid JSON ({exc})") from None

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        try:
            self.gateway.authenticate(request.headers.get("Authorization"), "rest")
            req, stream = await self._parse(request)
            if not stream:
                response = await self.gateway.complete(req, front="rest")
                return web.Response(
                    body=orjson.dumps(openai_format.response_to_json(response)),
                    content_type="application/json",
                )
            chunks = self.gateway.stream(req, front="rest")
            first = await anext(chunks)
        except GatewayError as exc:
            return error_response(exc)
        stream_response = web.StreamResponse(headers=_SSE_HEADERS)
        await stream_response.prepare(request)
        try:
            await stream_response.write(_sse(openai_format.chunk_to_json(first, first=True)))
            async for chunk in chunks:
                await stream_response.write(_sse(openai_format.chunk_to_json(chunk, first=False)))
            await stream_response.write(b"data: [DONE]\n\n")
        except GatewayError as exc:
            # Headers are gone; the OpenAI SDKs raise on an error object inside the stream.
            await stream_response.write(_sse(_error_json(exc)))
        finally:
            await chunks.aclose()
        await stream_response.write_eof()
        return stream_response

    async def models(self, request: web.Request) -> web.Response:
        try:
            self.gateway.authenticate(request.headers.get("Authorization"), "rest")
        except GatewayError as exc:
            return error_response(exc)
        data = [
            {"id": m.id, "object": "model", "created": m.created, "owned_by": m.owned_by}
            for m in self.gateway.list_models()
        ]
        return web.Response(
            body=orjson.dumps({"object": "list", "data": data}), content_type="application/json"
        )


def admin_app(gateway: Gateway, ready: Callable[[], bool]) -> web.Application:
    async def metrics(_: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(gateway.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        if ready():
            return web.Response(text="ready\n")
        return web.Response(status=503, text="not ready: draining\n")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app
