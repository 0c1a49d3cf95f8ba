"""OpenAI's Responses API (``POST /v1/responses``) served by an inference engine, as vLLM's OpenAI server and the
SMG router serve it: on top of the chat path.

* **request**: :func:`llmgw.codecs.openai_responses.chat_request` makes the Responses request a chat request
  (the engine's own fields, :data:`._engine_request.NATIVE_FIELDS`, carried along), which the chat path plans
  as any other (chat template, sampling parameters, tool and reasoning parsers; what it cannot carry refused
  by name); ``n`` is 1.
* **answer**: the chat path's chunks (:meth:`EngineClient.stream`), as they come, through
  :class:`~llmgw.codecs.openai_responses.ResponseWriter`: unary, the Response it ends with; streamed, its
  events as Server-Sent Events ``(name, data)``, each named by its type, as the REST front writes a relayed
  stream's. Nothing is sent before the engine's first chunk, so an error before it is a plain HTTP error (and
  the gateway may still retry); one after it is the front's ``error`` event.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Mapping
from typing import TYPE_CHECKING, Any

import orjson

from llmgateway.v1 import llm_service_pb2 as pb
from llmgw.codecs import openai_chat
from llmgw.codecs.openai_responses import ResponseWriter, chat_request, wants_logprobs
from llmgw.providers._engine_request import NATIVE_FIELDS
from llmgw.providers.base import CallStats

if TYPE_CHECKING:
    from llmgw.providers.engine import EngineClient


def _start(
    client: EngineClient, body: Mapping[str, Any], timeout: float, stats: CallStats
) -> tuple[ResponseWriter, AsyncGenerator[pb.ChatChunk, None]]:
    """The writer of the answer, and the chat path's chunks it is written from."""
    provider = client.provider.name
    req, _ = openai_chat.request_from_json(chat_request(body, provider=provider, native=NATIVE_FIELDS))
    writer = ResponseWriter(body, logprobs=wants_logprobs(body, provider))
    return writer, client.stream(req, str(body.get("model")), timeout, stats)


async def answer(client: EngineClient, body: Mapping[str, Any], timeout: float, stats: CallStats) -> Any:
    """The unary answer: a Response object."""
    writer, chunks = _start(client, body, timeout, stats)
    async with contextlib.aclosing(chunks):
        async for chunk in chunks:
            writer.feed(chunk)
    writer.end()
    return writer.response


async def events(
    client: EngineClient, body: Mapping[str, Any], timeout: float, stats: CallStats
) -> AsyncGenerator[tuple[str, bytes], None]:
    """The streamed answer: ``response.created`` ... ``response.completed`` (or ``response.incomplete``)."""
    writer, chunks = _start(client, body, timeout, stats)
    async with contextlib.aclosing(chunks):
        first = True
        async for chunk in chunks:
            opening = writer.start() if first else []  # only once the engine answers
            first = False
            for event in opening + writer.feed(chunk):
                yield event["type"], orjson.dumps(event)
    for event in writer.end():
        yield event["type"], orjson.dumps(event)
