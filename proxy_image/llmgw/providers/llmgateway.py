"""The ``llmgateway`` provider type's client: an upstream ``llmgateway.v1.LLMService`` over one HTTP/2
connection, multiplexing many calls (:mod:`llmgw._net.grpc_channel`).

A client is told the provider's name, never its address (the channel's messages name it; the log keeps
it), and the upstream's status message only through :func:`llmgw.redact.redact`, before it is shortened.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator

import grpc
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]

from llmgateway.v1 import llm_service_pb2 as pb
from llmgw._net import grpc_channel
from llmgw._net.grpc_wire import RpcError
from llmgw.chat import chunk_carries, chunk_finishes
from llmgw.codecs import retry_after
from llmgw.errors import GatewayError, from_upstream_grpc
from llmgw.providers._responses import ResponsesOnChatPath
from llmgw.providers.base import (
    MAX_RELAYED_CHARS,
    CallStats,
    OnLimit,
    limit_exceeded,
    malformed_response,
    timed_out,
)
from llmgw.redact import redact
from llmgw_common.config import Limits, Provider
from llmgw_common.providers.llmgateway import LLMGatewaySettings

_SERVICE = pb.DESCRIPTOR.services_by_name["LLMService"].full_name
_UNAVAILABLE_LOG_INTERVAL = 10.0  # seconds between two log lines about one provider being unavailable

log = logging.getLogger("llmgw.providers")


class LLMGatewayClient(ResponsesOnChatPath):
    native_fields: frozenset[str] = frozenset()

    def __init__(
        self, provider: Provider, api_key: str | None, limits: Limits, on_limit: OnLimit | None = None
    ) -> None:
        self.provider = provider
        self._logged_unavailable = float("-inf")
        settings: LLMGatewaySettings = provider.settings
        metadata = ((("authorization", f"Bearer {api_key}"),) if api_key else ()) + tuple(provider.headers)
        self.channel = grpc_channel.Channel(
            settings.target,
            tls=settings.tls,
            metadata=metadata,
            limits=limits.grpc_client,
            connect_timeout=provider.connect_timeout_s,
            on_limit=None if on_limit is None else lambda key: on_limit(f"grpcClient.{key}"),
        )

    def error(self, exc: RpcError) -> GatewayError:
        code = exc.code
        name = self.provider.name
        target = self.channel.target
        details = redact(exc.details or "")
        if target in details:  # the channel's own messages ("cannot connect to 10.0.0.5:8000: ...")
            now = time.monotonic()
            if now - self._logged_unavailable >= _UNAVAILABLE_LOG_INTERVAL:
                self._logged_unavailable = now
                log.warning("provider %r: %s", name, details)
            details = details.replace(target, "the provider")
        details = details[:MAX_RELAYED_CHARS]
        if isinstance(exc, grpc_channel.CallTimeout):
            return timed_out(self.provider, exc)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and details == "Deadline Exceeded":
            return timed_out(self.provider, TimeoutError("the request's deadline passed"))
        if isinstance(exc, grpc_channel.LimitExceeded):
            return limit_exceeded(self.provider, f"grpcClient.{exc.limit}", details)
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            message = f"provider {name!r} rejected the gateway's credentials ({code.name})"
        else:
            message = f"provider {name!r} failed with {code.name}: {details}".rstrip(": ")
        hint = retry_after.from_trailers(exc.trailers)
        if hint is None:
            raw = next((str(v) for k, v in exc.trailers or () if k == "retry-after"), None)
            if raw:
                log.info(
                    "provider %r sent an unreadable Retry-After (retry-after=%r); ignored", name, raw[:60]
                )
        return from_upstream_grpc(code, message, hint)

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
            body = await self.channel.unary(
                f"/{_SERVICE}/ChatCompletion",
                upstream,
                timeout,
                first_message_timeout=self.provider.timeout_s,
            )
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
        chunks = self.channel.server_stream(
            f"/{_SERVICE}/StreamingChat",
            upstream,
            timeout,
            first_message_timeout=self.provider.timeout_s,
            idle_timeout=self.provider.idle_timeout_s,
        )
        finished = False
        try:
            async for body in chunks:
                stats.received += len(body)
                chunk = pb.ChatChunk.FromString(body)
                finished = finished or chunk_finishes(chunk)
                if chunk_carries(chunk):
                    yield chunk
        except RpcError as exc:
            raise self.error(exc) from None
        except DecodeError as exc:
            raise malformed_response(self.provider, exc) from None
        finally:
            await chunks.aclose()  # no-op when the call completed; stops the upstream when we were cancelled
        if not finished:
            raise malformed_response(self.provider, ValueError("stream ended without a finish_reason"))

    async def embed(
        self, req: pb.EmbeddingRequest, model: str, timeout: float, stats: CallStats
    ) -> pb.EmbeddingResponse:
        if model != req.model:
            renamed = pb.EmbeddingRequest()
            renamed.CopyFrom(req)
            renamed.model = model
            req = renamed
        upstream = req.SerializeToString()
        stats.sent += len(upstream)
        try:
            body = await self.channel.unary(
                f"/{_SERVICE}/Embed", upstream, timeout, first_message_timeout=self.provider.timeout_s
            )
            resp = pb.EmbeddingResponse.FromString(body)
        except RpcError as exc:
            raise self.error(exc) from None
        except DecodeError as exc:
            raise malformed_response(self.provider, exc) from None
        stats.received += len(body)
        return resp

    async def close(self) -> None:
        await self.channel.close()
