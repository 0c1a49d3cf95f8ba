"""The gRPC front: ``llmgateway.v1.LLMService``, ``grpc.health.v1.Health`` and server reflection.

It runs on llmgw's own gRPC server (:mod:`llmgw._net.grpc_server`). One wrapper maps every exception of the
LLMService handlers to a gRPC status, so the handlers stay plain: :class:`~llmgw.errors.GatewayError`
becomes its status code and message (plus a ``retry-after`` trailer when known); anything unexpected
becomes INTERNAL with a message that points at the logs. Health and reflection need no API key; the LLM
service does when client auth is on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

from llmgateway.v1 import llm_service_pb2 as pb
from llmgw._net.grpc_server import BIDI, SERVER_STREAM, UNARY, Method, Server, ServerCall
from llmgw._net.grpc_wire import RpcError
from llmgw.errors import GatewayError
from llmgw.gateway import Gateway

log = logging.getLogger("llmgw.grpc")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LLMService"].full_name
HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


def _status(exc: Exception) -> RpcError:
    if isinstance(exc, GatewayError):
        trailers = () if exc.retry_after is None else (("retry-after", f"{exc.retry_after:g}"),)
        return RpcError(exc.kind.grpc_code, exc.message, trailers)
    log.exception("unexpected error in %s", type(exc).__name__, exc_info=exc)
    return RpcError(grpc.StatusCode.INTERNAL, "internal error in the gateway; its logs have the details")


def _mapped_unary(handler: Callable[[Any, ServerCall], Any]) -> Callable[[Any, ServerCall], Any]:
    async def unary(request: Any, call: ServerCall) -> Any:
        try:
            return await handler(request, call)
        except Exception as exc:
            raise _status(exc) from None

    return unary


def _mapped_stream(
    handler: Callable[[Any, ServerCall], AsyncIterator[Any]],
) -> Callable[[Any, ServerCall], AsyncIterator[Any]]:
    async def stream(request: Any, call: ServerCall) -> AsyncIterator[Any]:
        try:
            async for item in handler(request, call):
                yield item
        except Exception as exc:
            raise _status(exc) from None

    return stream


def _authorization(call: ServerCall) -> str | None:
    value = call.value("authorization")
    return value if isinstance(value, str) else None


class LLMServicer:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def chat_completion(self, request: pb.ChatRequest, call: ServerCall) -> pb.ChatResponse:
        self.gateway.authenticate(_authorization(call), "grpc")
        return await self.gateway.complete(request, front="grpc", timeout=call.time_remaining())

    async def streaming_chat(self, request: pb.ChatRequest, call: ServerCall) -> AsyncIterator[pb.ChatChunk]:
        self.gateway.authenticate(_authorization(call), "grpc")
        async for chunk in self.gateway.stream(request, front="grpc", timeout=call.time_remaining()):
            yield chunk

    async def list_models(self, request: pb.ListModelsRequest, call: ServerCall) -> pb.ListModelsResponse:
        self.gateway.authenticate(_authorization(call), "grpc")
        return pb.ListModelsResponse(models=self.gateway.list_models())


class HealthService:
    """``grpc.health.v1.Health``: the serving status per service name ("" is the whole server)."""

    def __init__(self) -> None:
        self._status: dict[str, int] = {}
        self._shutting_down = False
        self._changed = asyncio.Event()

    def set(self, service: str, status: int) -> None:
        if self._shutting_down:
            return  # a draining server stays NOT_SERVING
        self._status[service] = status
        self._changed.set()
        self._changed = asyncio.Event()

    def enter_graceful_shutdown(self) -> None:
        for service in self._status:
            self.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        self._shutting_down = True

    async def check(self, request: health_pb2.HealthCheckRequest, call: ServerCall) -> Any:
        status = self._status.get(request.service)
        if status is None:
            raise RpcError(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def watch(self, request: health_pb2.HealthCheckRequest, call: ServerCall) -> AsyncIterator[Any]:
        last = None
        while True:
            changed = self._changed
            status = self._status.get(request.service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            await changed.wait()


def build_server(gateway: Gateway, max_message_bytes: int) -> tuple[Server, HealthService]:
    """The gRPC server with the LLM service, health and reflection; the caller starts it on an address."""
    llm = LLMServicer(gateway)
    health = HealthService()
    names = (SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME)
    reflector = reflection.aio.ReflectionServicer(names)
    methods = {
        f"/{SERVICE_NAME}/ChatCompletion": Method(UNARY, pb.ChatRequest, _mapped_unary(llm.chat_completion)),
        f"/{SERVICE_NAME}/StreamingChat": Method(
            SERVER_STREAM, pb.ChatRequest, _mapped_stream(llm.streaming_chat)
        ),
        f"/{SERVICE_NAME}/ListModels": Method(UNARY, pb.ListModelsRequest, _mapped_unary(llm.list_models)),
        f"/{HEALTH_SERVICE_NAME}/Check": Method(UNARY, health_pb2.HealthCheckRequest, health.check),
        f"/{HEALTH_SERVICE_NAME}/Watch": Method(SERVER_STREAM, health_pb2.HealthCheckRequest, health.watch),
        f"/{reflection.SERVICE_NAME}/ServerReflectionInfo": Method(
            BIDI, reflection_pb2.ServerReflectionRequest, reflector.ServerReflectionInfo
        ),
    }
    return Server(methods, max_message_bytes), health
