"""The REST front (OpenAI-compatible, so existing clients and SDKs keep working) and the admin endpoints.

The REST front runs on :mod:`llmgw._net.http_server` (lean, for the request path); the admin port on aiohttp.

``POST /v1/chat/completions`` answers with JSON, or with Server-Sent Events when ``"stream": true``:
response headers go out only once the first token is there, so a failure before it is still a proper
HTTP error (and the gateway may still fall back to the other path); a failure after it ends the stream
with an OpenAI-style ``{"error": ...}`` event. A client that disconnects cancels its upstream call.

The admin port serves ``/metrics`` (Prometheus), ``/healthz`` (the process is alive) and ``/readyz``
(the proxy accepts traffic; 503 while draining).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from llmgateway.v1 import llm_service_pb2 as pb
from llmgw._net.http_server import HTTPServer, Request, Responder
from llmgw.codecs import openai_chat
from llmgw.errors import GatewayError, Kind
from llmgw.gateway import Gateway

Handler = Callable[[Request, Responder], Awaitable[None]]

log = logging.getLogger("llmgw.rest")

_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_JSON = {"Content-Type": "application/json"}


def _error_json(exc: GatewayError) -> dict[str, object]:
    """OpenAI's error envelope for ``exc``, for a plain response and for an error event inside a stream."""
    return openai_chat.error_body(exc.message, exc.kind.error_type, code=exc.kind.name.lower())


def _send_error(respond: Responder, exc: GatewayError) -> None:
    headers = dict(_JSON)
    if exc.retry_after is not None:
        headers["Retry-After"] = f"{max(1, round(exc.retry_after))}"
    elif exc.kind is Kind.RESOURCE_EXHAUSTED:
        headers["Retry-After"] = "1"
    respond.send(exc.kind.http_status, orjson.dumps(_error_json(exc)), headers)


def _sse(payload: object) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


class RestFront:
    """The OpenAI-compatible routes, served by :class:`~llmgw._net.http_server.HTTPServer`."""

    def __init__(self, gateway: Gateway, max_request_bytes: int) -> None:
        self.gateway = gateway
        self.max_request_bytes = max_request_bytes
        self.server = HTTPServer(self.handle, max_body_bytes=max_request_bytes)
        self._routes: dict[str, tuple[str, Handler]] = {
            "/v1/chat/completions": ("POST", self.chat_completions),
            "/v1/models": ("GET", self.models),
        }

    async def handle(self, request: Request, respond: Responder) -> None:
        route = self._routes.get(request.path)
        if route is None:
            known = ", ".join(f"{m} {p}" for p, (m, _) in self._routes.items())
            message = f"no route for {request.method} {request.path} (this gateway serves {known})"
            _send_error(respond, GatewayError(Kind.NOT_FOUND, message))
        elif request.method != route[0]:
            message = f"{request.path} accepts {route[0]}, not {request.method}"
            body = orjson.dumps(
                openai_chat.error_body(message, "invalid_request_error", code="method_not_allowed")
            )
            respond.send(405, body, {**_JSON, "Allow": route[0]})
        else:
            await route[1](request, respond)

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
            if not stream:
                response = await self.gateway.complete(req, front="rest")
                respond.send(200, orjson.dumps(openai_chat.response_to_json(response)), _JSON)
                return
            chunks = self.gateway.stream(req, front="rest")
            first = await anext(chunks)
        except GatewayError as exc:
            _send_error(respond, exc)
            return
        respond.start(200, _SSE_HEADERS)
        try:
            await respond.write(_sse(openai_chat.chunk_to_json(first, first=True)))
            async for chunk in chunks:
                await respond.write(_sse(openai_chat.chunk_to_json(chunk, first=False)))
            await respond.write(b"data: [DONE]\n\n")
        except GatewayError as exc:
            # Headers are gone; the OpenAI SDKs raise on an error object inside the stream.
            await respond.write(_sse(_error_json(exc)))
        finally:
            await chunks.aclose()
        await respond.end()

    async def models(self, request: Request, respond: Responder) -> None:
        try:
            self.gateway.authenticate(request.headers.get("authorization"), "rest")
        except GatewayError as exc:
            _send_error(respond, exc)
            return
        data = [
            {"id": m.id, "object": "model", "created": m.created, "owned_by": m.owned_by}
            for m in self.gateway.list_models()
        ]
        respond.send(200, orjson.dumps({"object": "list", "data": data}), _JSON)


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
