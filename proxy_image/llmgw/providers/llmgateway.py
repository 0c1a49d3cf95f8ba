"""The ``llmgateway`` provider type's client: an upstream ``llmgateway.v1.LLMService`` over one HTTP/2
connection, multiplexing many calls (:mod:`llmgw._net.grpc_channel`)."""

from __future__ import annotations

from collections.abc import AsyncGenerator

import grpc
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]

from llmgateway.v1 import llm_service_pb2 as pb
from llmgw._net import grpc_channel
from llmgw._net.grpc_wire import RpcError
from llmgw.codecs import retry_after
from llmgw.errors import GatewayError, from_upstream_grpc
from llmgw.providers.base import CallStats, malformed_response
from llmgw_common.config import Limits, Provider
from llmgw_common.providers.llmgateway import LLMGatewaySettings

_SERVICE = pb.DESCRIPTOR.services_by_name["LLMService"].full_name


class LLMGatewayClient:
    def __init__(self, provider: Provider, api_key: str | None, limits: Limits) -> None:
        self.provider = provider
        settings: LLMGatewaySettings = provider.settings
        metadata = ((("authorization", f"Bearer {api_key}"),) if api_key else ()) + tuple(provider.headers)
        self.channel = grpc_channel.Channel(
            settings.target,
            tls=settings.tls,
            metadata=metadata,
            limits=limits.grpc_client,
            connect_timeout=provider.connect_timeout_s,
        )

    def error(self, exc: RpcError) -> GatewayError:
        code = exc.code
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            message = f"provider {self.provider.name!r} rejected the gateway's credentials ({code.name})"
        else:
            message = f"provider {self.provider.name!r} failed with {code.name}: {exc.details}".rstrip(": ")
        return from_upstream_grpc(code, message, retry_after.from_trailers(exc.trailers))

    @staticmethod
    def upstream_request(req: pb.ChatRequest, model: str) -> bytes:
        if model == req.model:
            return req.SerializeToString()
        renamed = pb.ChatRequest()
        renamed.CopyFrom(req)
        renamed.model = model
        return renamed.SerializeToString()

    async def complete(
        self, req: pb.ChatRequest, model: str, timeout: float, stats: CallStats
    ) -> pb.ChatResponse:
        upstream = self.upstream_request(req, model)
        stats.sent += len(upstream)
        try:
            body = await self.channel.unary(f"/{_SERVICE}/ChatCompletion", upstream, timeout)
            resp = pb.ChatResponse.FromString(body)
        except RpcError as exc:
            raise self.error(exc) from None
        except DecodeError as exc:
            raise malformed_response(self.provider, exc) from None
        stats.received += len(body)
        return resp

    async def stream(
        self, req: pb.ChatRequest, model: str, timeout: float, stats: CallStats
    ) -> AsyncGenerator[pb.ChatChunk, None]:
        upstream = self.upstream_request(req, model)
        stats.sent += len(upstream)
        chunks = self.channel.server_stream(f"/{_SERVICE}/StreamingChat", upstream, timeout)
        finished = False
        try:
            async for body in chunks:
                stats.received += len(body)
                chunk = pb.ChatChunk.FromString(body)
                if chunk.finish_reason:
                    finished = True
                    yield chunk
                elif chunk.delta:
                    yield chunk
        except RpcError as exc:
            raise self.error(exc) from None
        except DecodeError as exc:
            raise malformed_response(self.provider, exc) from None
        finally:
            await chunks.aclose()  # no-op when the call completed; stops the upstream when we were cancelled
        if not finished:
            raise malformed_response(self.provider, ValueError("stream ended without a finish_reason"))

    async def close(self) -> None:
        await self.channel.close()
