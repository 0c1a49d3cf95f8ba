"""The ``openai`` provider type's client: any OpenAI-compatible API (OpenAI, vLLM, LiteLLM, ...).

Chat Completions through the protobuf messages (:mod:`llmgw.codecs.openai_chat`), Embeddings too
(:mod:`llmgw.codecs.openai_embeddings`), and the Responses and (legacy) Completions APIs relayed as they
are: the request's JSON with the upstream's model name, the answer's JSON or Server-Sent Events unchanged.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import orjson

from llmgateway.v1 import llm_service_pb2 as pb
from llmgw.codecs import openai_chat, openai_embeddings
from llmgw.providers._rest import RestClient
from llmgw.providers.base import CallStats, OnLimit, malformed_response
from llmgw_common.config import Limits, Provider
from llmgw_common.providers.openai import OpenAISettings


class OpenAIClient(RestClient):
    path_suffix = "/chat/completions"
    relayed_endpoints = frozenset({"/responses", "/completions"})  # what relay() and relay_stream() serve

    def __init__(
        self, provider: Provider, api_key: str | None, limits: Limits, on_limit: OnLimit | None = None
    ) -> None:
        settings: OpenAISettings = provider.settings
        super().__init__(
            provider, api_key, limits.rest_client, settings.base_url, settings.max_connections, on_limit
        )

    async def complete(
        self, req: pb.ChatRequest, model: str, timeout: float, stats: CallStats
    ) -> pb.ChatResponse:
        resp = await self.post(openai_chat.request_to_json(req, model=model), timeout, stats)
        body = await self.read_json(resp, stats)
        try:
            return openai_chat.response_from_json(body)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            raise malformed_response(self.provider, exc) from None

    async def stream(
        self, req: pb.ChatRequest, model: str, timeout: float, stats: CallStats
    ) -> AsyncGenerator[pb.ChatChunk, None]:
        resp = await self.post(openai_chat.request_to_json(req, model=model, stream=True), timeout, stats)
        events = (data async for _, data in self.sse_events(resp, stats))
        try:
            async for chunk in openai_chat.read_stream(
                events, lambda body: self.error(502, orjson.dumps(body), {})
            ):
                yield chunk
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise malformed_response(self.provider, exc) from None

    async def embed(
        self, req: pb.EmbeddingRequest, model: str, timeout: float, stats: CallStats
    ) -> pb.EmbeddingResponse:
        resp = await self.post(openai_embeddings.request_to_json(req, model), timeout, stats, "/embeddings")
        body = await self.read_json(resp, stats)
        try:
            return openai_embeddings.response_from_json(body)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            raise malformed_response(self.provider, exc) from None

    async def relay(self, endpoint: str, body: dict[str, Any], timeout: float, stats: CallStats) -> Any:
        """``POST {baseURL}{endpoint}`` with ``body``; the JSON answer as it is."""
        resp = await self.post(body, timeout, stats, endpoint)
        return await self.read_json(resp, stats)

    async def relay_stream(
        self, endpoint: str, body: dict[str, Any], timeout: float, stats: CallStats
    ) -> AsyncGenerator[tuple[str, bytes], None]:
        """``POST {baseURL}{endpoint}`` with ``body`` (which asks for a stream); its events as they come."""
        resp = await self.post(body, timeout, stats, endpoint)
        if not resp.headers.get("content-type", "").startswith("text/event-stream"):
            resp.close()
            raise malformed_response(
                self.provider, ValueError("a streamed answer that is not text/event-stream")
            )
        async for event in self.sse_events(resp, stats):
            yield event
