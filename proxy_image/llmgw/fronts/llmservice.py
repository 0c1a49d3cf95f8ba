"""The gRPC front of ``llmgateway.v1.LLMService``, the project's own gRPC API.

It carries the same Chat Completions API as the REST front, field for field. ``StreamingChat`` answers in the
request's ``chunk_layout``: the simple one (text chunks, then one final chunk with finish reason and usage)
unless the request asks for OpenAI's (every chunk as an OpenAI provider sends it), which is what another
gateway's ``llmgateway`` provider asks for on behalf of a REST client.

Its methods are served on llmgw's own gRPC server (:mod:`llmgw._net.grpc_server`) beside health and
reflection. One wrapper maps every exception of the handlers to a gRPC status, so the handlers stay plain:
:class:`~llmgw.errors.GatewayError` becomes its status code and message (plus a ``retry-after`` trailer
when known); anything unexpected becomes INTERNAL with a message that points at the logs. The service needs
an API key when client auth is on. ``Embed`` serves embeddings from openai and llmgateway providers.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from llmgateway.v1 import llm_service_pb2 as pb
from llmgw._net.grpc_server import SERVER_STREAM, UNARY, Method, ServerCall
from llmgw._net.grpc_wire import RpcError
from llmgw.chat import to_openai_layout, to_simple_layout
from llmgw.codecs import openai_embeddings
from llmgw.errors import GatewayError, Kind
from llmgw.gateway import Gateway

log = logging.getLogger("llmgw.grpc")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LLMService"].full_name


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


class LLMServiceFront:
    """``llmgateway.v1.LLMService``: the project's own gRPC API."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def chat_completion(self, request: pb.ChatRequest, call: ServerCall) -> pb.ChatResponse:
        self.gateway.authenticate(_authorization(call), "grpc")
        return await self.gateway.complete(request, front="grpc", timeout=call.time_remaining())

    async def streaming_chat(self, request: pb.ChatRequest, call: ServerCall) -> AsyncIterator[pb.ChatChunk]:
        self.gateway.authenticate(_authorization(call), "grpc")
        timeout = call.time_remaining()
        # The writes wait for the client's window: bounded by the request's time limit, as the REST front's.
        call.limit_time(self.gateway.stream_write_limit(timeout))
        upstream = self.gateway.stream(request, front="grpc", timeout=timeout)
        if request.chunk_layout == pb.CHUNK_LAYOUT_OPENAI:
            chunks = to_openai_layout(upstream, request.stream_options.include_usage)
        else:
            chunks = to_simple_layout(upstream)
        try:
            async for chunk in chunks:
                yield chunk
        except ValueError as exc:
            raise GatewayError(Kind.BAD_GATEWAY, f"the provider's stream was malformed: {exc}") from None
        finally:
            await chunks.aclose()
            await upstream.aclose()

    async def embed(self, request: pb.EmbeddingRequest, call: ServerCall) -> pb.EmbeddingResponse:
        self.gateway.authenticate(_authorization(call), "grpc")
        try:
            openai_embeddings.validate(request)
        except GatewayError:
            self.gateway.metrics.rejected.labels("grpc", "invalid").inc()
            raise
        return await self.gateway.embed(request, front="grpc", timeout=call.time_remaining())

    async def list_models(self, request: pb.ListModelsRequest, call: ServerCall) -> pb.ListModelsResponse:
        self.gateway.authenticate(_authorization(call), "grpc")
        return pb.ListModelsResponse(models=self.gateway.list_models())

    def methods(self) -> dict[str, Method]:
        """The service's methods by path, each with its errors mapped to gRPC statuses."""
        return {
            f"/{SERVICE_NAME}/ChatCompletion": Method(
                UNARY, pb.ChatRequest, _mapped_unary(self.chat_completion)
            ),
            f"/{SERVICE_NAME}/StreamingChat": Method(
                SERVER_STREAM, pb.ChatRequest, _mapped_stream(self.streaming_chat)
            ),
            f"/{SERVICE_NAME}/ListModels": Method(
                UNARY, pb.ListModelsRequest, _mapped_unary(self.list_models)
            ),
            f"/{SERVICE_NAME}/Embed": Method(UNARY, pb.EmbeddingRequest, _mapped_unary(self.embed)),
        }
