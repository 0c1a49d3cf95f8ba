"""Faithful fake LLM providers for tests, the demo and the benchmarks: OpenAI, Anthropic, gRPC and engines.

Never shipped in an image. ``llmgw fake-provider`` runs one as a process; tests start them in-process.

Each kind is an asyncio server bound to a loopback address only, speaking the real wire protocol: ``openai``
(:mod:`.openai`, Chat Completions), ``anthropic`` (:mod:`.anthropic`, Messages) and ``grpc``
(:mod:`.llmservice`, the gateway's own ``llmgateway.v1.LLMService``); the inference engines ``vllm``,
``sglang`` and ``trtllm`` (:mod:`.engine`, the engines' own gRPC protocols: token ids in and out) and
``vllm-http`` (:mod:`.vllm_http`, vLLM's OpenAI server), all four over the model of :mod:`.model`;
:mod:`.kinds` names them.

What is faithful: URLs, methods, status codes, header names, JSON field names and their order, the SSE framing
and event order, the error envelopes and error ``type``/``code`` values, the ``Retry-After`` header (plus
OpenAI's ``x-ratelimit-*`` headers) on 429, id prefixes (``chatcmpl-``, ``msg_``), and the behaviour of
``max_tokens`` and stop sequences (generation stops before the stop sequence, which is not part of the text).
The official ``openai`` and ``anthropic`` SDKs work against it unchanged.

What is not: the reply is a deterministic echo (:func:`make_reply`, in :mod:`.faults`), the same from all
kinds. Sampling parameters are checked for type and range but do not change the answer; unknown request
fields, images and other non-text content blocks are accepted and ignored rather than rejected or acted on.
Tools, structured outputs, reasoning, logprobs and ``n`` get deterministic answers of the real shapes
(:mod:`.completions`: a tool call with arguments made from the tool's schema, streamed in fragments; a JSON
reply that fits the schema; ``reasoning_content``; logprobs; n choices). Each kind keeps the latest requests
it received in ``FakeProvider.received``. Error messages resemble the real ones but are not copied verbatim for every case. ``token_delay_ms``
only paces streams; a unary answer is sent right after ``latency_ms``.

Faults (:class:`Faults`) are injected per chat request after auth and request validation: rate limiting
first, then ``fail_next``, then ``error_rate``; ``latency_ms`` is waited before any of these answers.
``/v1/models`` and ``ListModels`` only check auth. Faults can be changed at runtime over HTTP:
``GET /_fake/stats``, ``DELETE /_fake/stats`` (reset), ``GET /_fake/faults`` and ``PUT /_fake/faults``
(JSON partial update) on the provider's own port, or on ``control_port`` for the grpc kind
(:mod:`.server`, which also holds :class:`FakeProvider`). :mod:`.options` is the command line.

Importing this package imports neither grpc nor aiohttp; :class:`FakeProvider` is imported on first use.
Names of the modules that this package does not export are shared between its modules, not an API.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmgw_dev.fakes.faults import Faults, make_reply
from llmgw_dev.fakes.options import configure_parser, provider_from_args, run

if TYPE_CHECKING:
    from llmgw_dev.fakes.server import FakeProvider

__all__ = ["FakeProvider", "Faults", "configure_parser", "make_reply", "provider_from_args", "run"]


def __getattr__(name: str) -> Any:
    if name == "FakeProvider":
        from llmgw_dev.fakes.server import FakeProvider

        return FakeProvider
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
