"""The ``anthropic`` provider type's client: Anthropic's Messages API, converted both ways by
:mod:`llmgw.codecs.anthropic_messages` (tools, images, thinking, JSON output by a forced tool, cache usage),
including its streaming events, which become chunks in OpenAI's layout."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from typing import Any

import orjson

from llmgateway.v1 import llm_service_pb2 as pb
from llmgw.codecs import anthropic_messages
from llmgw.errors import GatewayError, from_upstream_http
from llmgw.providers._responses import ResponsesOnChatPath
from llmgw.providers._rest import RestClient
from llmgw.providers.base import MAX_RELAYED_CHARS, CallStats, OnLimit, malformed_response
from llmgw.redact import redact
from llmgw_common.config import Limits, Provider
from llmgw_common.providers.anthropic import AnthropicSettings

_MALFORMED = (KeyError, TypeError, ValueError, AttributeError)  # orjson.JSONDecodeError is a ValueError


class AnthropicClient(RestClient, ResponsesOnChatPath):
    path_suffix = "/v1/messages"
    native_fields = anthropic_messages.PASSED_KEYS

    def __init__(
        self, provider: Provider, api_key: str | None, limits: Limits, on_limit: OnLimit | None = None
    ) -> None:
        self.settings: AnthropicSettings = provider.settings
        super().__init__(
            provider,
            api_key,
            limits.rest_client,
            self.settings.base_url,
            self.settings.max_connections,
            on_limit,
        )

    def auth_headers(self, api_key: str | None) -> dict[str, str]:
        headers = {"anthropic-version": self.settings.version}
        if api_key:
            headers["x-api-key"] = api_key
        return headers

    def request_body(self, req: pb.ChatRequest, model: str, stream: bool) -> dict[str, Any]:
        return anthropic_messages.request_to_json(
            req,
            model=model,
            stream=stream,
            default_max_tokens=self.settings.default_max_tokens,
            provider=self.provider.name,
        )

    async def count_tokens(
        self, body: dict[str, Any], timeout: float, stats: CallStats, betas: Sequence[str] = ()
    ) -> bytes:
        """``POST /v1/messages/count_tokens`` with ``body`` as it is: the answer's JSON, else GatewayError."""
        resp = await self.post(
            body, timeout, stats, path="/v1/messages/count_tokens", extra_headers=_beta_header(betas)
        )
        return orjson.dumps(await self.read_json(resp, stats))

    async def complete(
        self, req: pb.ChatRequest, model: str, timeout: float, stats: CallStats
    ) -> pb.ChatResponse:
        resp = await self.post(
            self.request_body(req, model, False),
            timeout,
            stats,
            extra_headers=_beta_header(req.anthropic_beta),
        )
        body = await self.read_json(resp, stats)
        try:
            return anthropic_messages.response_from_json(
                body, model, anthropic_messages.format_tool_name(req)
            )
        except _MALFORMED as exc:
            raise malformed_response(self.provider, exc) from None

    def _stream_error(self, error: dict[str, Any]) -> GatewayError:
        status = 529 if error.get("type") == "overloaded_error" else 502
        text = redact(str(error.get("message", "")))[:MAX_RELAYED_CHARS]  # redacted before it is cut
        return from_upstream_http(status, f"provider {self.provider.name!r} failed mid-stream: {text}")

    async def stream(
        self, req: pb.ChatRequest, model: str, timeout: float, stats: CallStats
    ) -> AsyncGenerator[pb.ChatChunk, None]:
        resp = await self.post(
            self.request_body(req, model, True),
            timeout,
            stats,
            extra_headers=_beta_header(req.anthropic_beta),
        )
        try:
            async for chunk in anthropic_messages.read_stream(
                self.sse_events(resp, stats),
                model,
                self._stream_error,
                format_tool=anthropic_messages.format_tool_name(req),
            ):
                yield chunk
        except _MALFORMED as exc:
            raise malformed_response(self.provider, exc) from None


def _beta_header(betas: Sequence[str]) -> bytes:
    """The anthropic-beta header line of a request's betas (checked tokens: see anthropic_messages.betas)."""
    return b"anthropic-beta: %s\r\n" % ",".join(betas).encode("ascii") if betas else b""
