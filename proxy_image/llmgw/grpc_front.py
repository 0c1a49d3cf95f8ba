"""The gRPC front: ``llmgateway.v1.LLMService`` on grpc.aio, with health and reflection.

One interceptor maps every exception of the LLMService handlers to a gRPC status, so the handlers stay
plain: :class:`~llmgw.errors.GatewayError` becomes its status code and message (plus a ``retry-after``
trailer when known); anything unexpected becomes INTERNAL with a message that points at the logs. Health
(``grpc.health.v1``) and reflection need no API key; the LLM service does when client auth is on.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from llmgateway.v1 import llm_service_pb2 as pb
from llmgateway.v1 import llm_service_pb2_grpc as pb_grpc

from .errors import GatewayError
from .gateway import Gateway

log = logging.getLogger("llmgw.grpc")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LLMService"].full_name
_METHOD_PREFIX = f"/{SERVICE_NAME}/"


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    if isinstance(exc, GatewayError):
        if exc.retry_after is not None:
            context.set_trailing_metadata((("retry-after", f"{exc.retry_after:g}"),))
        await context.abort(exc.kind.grpc_code, exc.message)
    log.exception("unexpected error in %s", type(exc).__name__, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error in the gateway; its logs have the details")


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self) -> None:
        self._wrapped: dict[str, Any] = {}  # method name -> wrapped handler, built once per method

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], handler_call_details: Any
    ) -> Any:
        method = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is not None:
            return wrapped
        handler = await continuation(handler_call_details)
        if handler is None or not method.startswith(_METHOD_PREFIX):
            return handler
        wrapped = self._wrapped[method] = self._wrap(handler)
        return wrapped

    @staticmethod
    def _wrap(handler: Any) -> Any:
        if handler.unary_unary is not None:
            behavior = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    return await behavior(request, context)
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:
                    await _abort(context, exc)

            return grpc.unary_unary_rpc_method_handler(
                unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            stream_behavior = handler.unary_stream

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                try:
                    async for item in stream_behavior(request, context):
                        yield item
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:
                    await _abort(context, exc)

            return grpc.unary_stream_rpc_method_handler(
                stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


def _authorization(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return str(value)
    return None


class LLMServicer(pb_grpc.LLMServiceServicer):
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def ChatCompletion(
        self, request: pb.ChatRequest, context: grpc.aio.ServicerContext
    ) -> pb.ChatResponse:
        self.gateway.authenticate(_authorization(context), "grpc")
        return await self.gateway.complete(request, front="grpc", timeout=context.time_remaining())

    async def StreamingChat(
        self, request: pb.ChatRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ChatChunk]:
        self.gateway.authenticate(_authorization(context), "grpc")
        async for chunk in self.gateway.stream(request, front="grpc", timeout=context.time_remaining()):
            yield chunk

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        self.gateway.authenticate(_authorization(context), "grpc")
        return pb.ListModelsResponse(models=self.gateway.list_models())


def build_server(
    gateway: Gateway, max_message_bytes: int
) -> tuple[grpc.aio.Server, health_aio.HealthServicer]:
    """The gRPC server with the LLM service, health and reflection; ports are added by the caller."""
    server = grpc.aio.server(
        interceptors=[ErrorInterceptor()],
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),
        ],
    )
    pb_grpc.add_LLMServiceServicer_to_server(LLMServicer(gateway), server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    return server, health
