"""OpenAI's Responses API (``POST /v1/responses``) on a provider client's chat path, for the provider types
whose upstream has no Responses API of its own: the inference engines (as vLLM's OpenAI server and the SMG
router serve it), Anthropic, and llmgateway (``LLMService`` has no such RPC). An openai provider's upstream
serves it itself (the request is relayed).

* **request**: :func:`llmgw.codecs.openai_responses.chat_request` makes the Responses request a chat request
  (the client's own fields, its ``native_fields``, carried along: an engine's ``top_k`` and
  ``chat_template_kwargs``, Anthropic's ``thinking``...), which the client serves as any other (what it
  cannot carry refused by name); ``n`` is 1.
* **answer**: the client's chat chunks (``stream``), as they come, through
  :class:`~llmgw.codecs.openai_responses.ResponseWriter`: unary, the Response it ends with; streamed, its
  events as Server-Sent Events ``(name, data)``, each named by its type, as the REST front writes a relayed
  stream's. Nothing is sent before the upstream's first chunk, so an error before it is a plain HTTP error
  (and the gateway may still retry); one after it is the front's ``error`` event.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Mapping
from typing import TYPE_CHECKING, Any, cast

import orjson

from llmgateway.v1 import llm_service_pb2 as pb
from llmgw.chat import to_openai_layout
from llmgw.codecs import openai_chat
from llmgw.codecs.openai_responses import ResponseWriter, chat_request, wants_logprobs
from llmgw.providers.base import CallStats

if TYPE_CHECKING:
    from llmgw.providers.base import ProviderClient


def _start(
    client: ProviderClient, body: Mapping[str, Any], timeout: float, stats: CallStats
) -> tuple[ResponseWriter, AsyncGenerator[pb.ChatChunk, None]]:
    """The writer of the answer, and the chat path's chunks it is written from."""
    provider = client.provider.name
    req, _ = openai_chat.request_from_json(chat_request(body, provider=provider, native=client.native_fields))
    # What an llmgateway upstream is asked for: OpenAI's layout (tool calls, reasoning...) and the usage.
    req.chunk_layout = pb.CHUNK_LAYOUT_OPENAI
    req.stream_options.include_usage = True
    writer = ResponseWriter(body, logprobs=wants_logprobs(body, provider))
    # An upstream that answers in the simple layout (text deltas, one finish chunk) gets OpenAI's here.
    return writer, to_openai_layout(client.stream(req, str(body.get("model")), timeout, stats), True)


async def answer(client: ProviderClient, body: Mapping[str, Any], timeout: float, stats: CallStats) -> Any:
    """The unary answer: a Response object."""
    writer, chunks = _start(client, body, timeout, stats)
    async with contextlib.aclosing(chunks):
        async for chunk in chunks:
            writer.feed(chunk)
    writer.end()
    return writer.response


async def events(
    client: ProviderClient, body: Mapping[str, Any], timeout: float, stats: CallStats
) -> AsyncGenerator[tuple[str, bytes], None]:
    """The streamed answer: ``response.created`` ... ``response.completed`` (or ``response.incomplete``)."""
    writer, chunks = _start(client, body, timeout, stats)
    async with contextlib.aclosing(chunks):
        first = True
        async for chunk in chunks:
            opening = writer.start() if first else []  # only once the upstream answers
            first = False
            for event in opening + writer.feed(chunk):
                yield event["type"], orjson.dumps(event)
    for event in writer.end():
        yield event["type"], orjson.dumps(event)


class ResponsesOnChatPath:
    """A provider client's ``relay`` of the Responses API, on its own chat path (``stream``)."""

    relayed_endpoints = frozenset({"/responses"})  # what relay() and relay_stream() serve

    async def relay(self, endpoint: str, body: dict[str, Any], timeout: float, stats: CallStats) -> Any:
        """The answer to a ``/responses`` request: a Response object."""
        return await answer(cast("ProviderClient", self), body, timeout, stats)

    def relay_stream(
        self, endpoint: str, body: dict[str, Any], timeout: float, stats: CallStats
    ) -> AsyncGenerator[tuple[str, bytes], None]:
        """The Server-Sent Events (name, data) of a streamed ``/responses`` request."""
        return events(cast("ProviderClient", self), body, timeout, stats)
