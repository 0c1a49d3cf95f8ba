"""The fake of the gateway's own gRPC API, ``llmgateway.v1.LLMService`` (kind ``grpc``).

``ChatCompletion`` (unary), ``StreamingChat`` (one ``ChatChunk`` a token, then one with the finish reason and
usage), ``ListModels`` and ``Embed`` (the deterministic vectors of :mod:`.endpoints`) over grpc.aio, beside the standard ``grpc.health.v1.Health`` service (SERVING for
"" and ``llmgateway.v1.LLMService``). The key comes as ``authorization: Bearer ...`` metadata; requests are
validated as the gateway validates them (``llmgw.chat.validate_request``). An injected fault is the gRPC
status :func:`grpc_code_for` maps its HTTP status to; rate limiting is ``RESOURCE_EXHAUSTED`` with a
``retry-after`` trailer, and a stream broken midway ends with the same status. The control API is served over
HTTP on ``control_port`` (see :mod:`llmgw_dev.fakes.server`).

A request with tools, structured outputs, reasoning, logprobs or ``n``, or one that asks for OpenAI's chunk
layout, gets the answers of :mod:`.completions`, converted by the gateway's codec (``choices``, tool calls,
tool-call fragments, reasoning deltas, a usage chunk only with ``stream_options.include_usage``).
``received`` keeps each ``ChatRequest`` as it arrived.

:class:`GrpcApi` is what a fake of any gRPC API needs (a grpc.aio server with health, auth, the faults'
status codes); :class:`LLMService` is this API on top of it.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Final

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from llmgateway.v1 import llm_service_pb2 as pb
from llmgateway.v1 import llm_service_pb2_grpc
from llmgw.chat import clip, message_text, validate_request
from llmgw.codecs import openai_chat, openai_embeddings
from llmgw.errors import GatewayError
from llmgw_dev.fakes.completions import Answer, prompt_of
from llmgw_dev.fakes.endpoints import embedding_inputs, embeddings_answer
from llmgw_dev.fakes.faults import MODEL_CREATED, Reply, count_words, new_id, seconds
from llmgw_dev.fakes.server import Api, FakeProvider, stall

_CODES: Final = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    409: grpc.StatusCode.ABORTED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    500: grpc.StatusCode.INTERNAL,
    501: grpc.StatusCode.UNIMPLEMENTED,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
    529: grpc.StatusCode.UNAVAILABLE,
}


def grpc_code_for(status: int) -> grpc.StatusCode:
    """The gRPC status code an injected HTTP-like status is reported as."""
    code = _CODES.get(status)
    if code is not None:
        return code
    return grpc.StatusCode.INTERNAL if status >= 500 else grpc.StatusCode.UNKNOWN


class GrpcApi(Api):
    """A gRPC API on a grpc.aio server, with the health service; a subclass adds its own services."""

    service_name: str = ""  # the full name of the subclass's service, reported SERVING by health

    def __init__(self, fake: FakeProvider) -> None:
        super().__init__(fake)
        self._server: Any = None

    def _add_services(self, server: Any) -> None:
        """Register the API's services on ``server``."""
        raise NotImplementedError

    async def start(self, port: int) -> int:
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        self._add_services(server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        target = self.fake.target
        try:
            port = server.add_insecure_port(target)
        except RuntimeError as exc:  # grpcio reports a failed bind as RuntimeError
            raise OSError(f"cannot bind the gRPC server to {target}: {exc}") from exc
        if not port:
            raise OSError(f"cannot bind the gRPC server to {target}")
        await server.start()
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        await health_servicer.set(self.service_name, health_pb2.HealthCheckResponse.SERVING)
        self._server = server
        return port

    async def stop(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            await server.stop(None)

    async def _auth(self, context: grpc.aio.ServicerContext) -> None:
        """Abort the RPC with UNAUTHENTICATED unless its metadata carries the key."""
        if self._bearer is None:
            return
        for key, value in context.invocation_metadata() or ():
            if key == "authorization" and hmac.compare_digest(value.encode(), self._bearer.encode()):
                return
        self.fake.stats["unauthorized"] += 1
        await context.abort(
            grpc.StatusCode.UNAUTHENTICATED, "invalid or missing API key (authorization: Bearer ...)"
        )

    async def _abort(self, context: grpc.aio.ServicerContext, status: int, retry_after: float) -> None:
        """Abort the RPC with an injected error of HTTP status ``status``."""
        code = grpc_code_for(status)
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            await context.abort(
                code,
                f"rate limit exceeded; retry after {seconds(retry_after)}s",
                trailing_metadata=(("retry-after", seconds(retry_after)),),
            )
        await context.abort(code, f"injected error (HTTP {status})")

    async def _break(self, context: grpc.aio.ServicerContext) -> None:
        """End a stream midway with the injected error."""
        self.fake.stats["injected_errors"] += 1
        await self._abort(context, self.fake.faults.error_status, self.fake.faults.retry_after_s)


class _Servicer:
    """The ``LLMService`` handlers, bound to the API's methods.

    Bound methods rather than a subclass of the generated servicer, so that grpc.aio sees ``StreamingChat``
    as an async generator function (it inspects the handler, not what it returns).
    """

    def __init__(self, api: LLMService) -> None:
        self.ChatCompletion = api._unary
        self.StreamingChat = api._stream
        self.ListModels = api._list_models
        self.Embed = api._embed


class LLMService(GrpcApi):
    """``llmgateway.v1.LLMService``; see the module docstring."""

    service_name = "llmgateway.v1.LLMService"

    def __init__(self, fake: FakeProvider) -> None:
        super().__init__(fake)
        self._models = pb.ListModelsResponse(
            models=[
                pb.Model(id=m, owned_by="fake-provider", created=MODEL_CREATED) for m in sorted(fake.models)
            ]
        )

    def _add_services(self, server: Any) -> None:
        llm_service_pb2_grpc.add_LLMServiceServicer_to_server(_Servicer(self), server)

    async def _list_models(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        await self._auth(context)
        return self._models

    async def _embed(
        self, request: pb.EmbeddingRequest, context: grpc.aio.ServicerContext
    ) -> pb.EmbeddingResponse:
        """The vectors of :mod:`.endpoints`, the same as the openai fake's."""
        with self._counted():
            self.fake.received.append(request)
            await self._admit_request(request, context, openai_embeddings.request_to_json)
            body = openai_embeddings.request_to_json(request)
            inputs = embedding_inputs(body["input"]) or []
            fmt = request.encoding_format if request.HasField("encoding_format") else "float"
            dimensions = request.dimensions if request.HasField("dimensions") else None
            answer = embeddings_answer(request.model, inputs, fmt, dimensions)
            self.fake.stats["completed"] += 1
            return openai_embeddings.response_from_json(answer)

    async def _admit_request(
        self, request: Any, context: grpc.aio.ServicerContext, validate: Callable[[Any], object]
    ) -> None:
        """Auth, ``validate``, the model known, then faults and latency; aborts the RPC on any of them."""
        await self._auth(context)
        try:
            validate(request)
        except GatewayError as exc:
            self.fake.stats["rejected"] += 1
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, exc.message)
        if not self._known(request.model):
            self.fake.stats["rejected"] += 1
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model {clip(request.model)} not found")
        fault = await self._admit()
        if fault is not None:
            await self._abort(context, *fault)

    async def _answer(
        self, request: pb.ChatRequest, context: grpc.aio.ServicerContext
    ) -> tuple[Reply, pb.Usage, pb.FinishReason, Answer | None]:
        """Auth, validation, faults and latency, then the reply (aborts the RPC unless it is answered); the
        rich answer of :mod:`.completions` when the request needs one."""
        self.fake.received.append(request)
        await self._admit_request(request, context, validate_request)
        body = openai_chat.request_to_json(request) if _is_rich(request) else None
        prompt = ""
        prompt_tokens = 0
        for message in request.messages:
            text = message_text(message)
            prompt_tokens += count_words(text)
            if message.role == pb.ROLE_USER:
                prompt = text
        if body is not None:
            prompt = prompt_of(body["messages"])
        if request.HasField("max_tokens"):
            max_tokens: int | None = request.max_tokens
        elif request.HasField("max_completion_tokens"):
            max_tokens = request.max_completion_tokens
        else:
            max_tokens = None
        reply = self.fake.reply(prompt, max_tokens, request.stop)
        usage = pb.Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=reply.completion_tokens,
            total_tokens=prompt_tokens + reply.completion_tokens,
        )
        finish = pb.FINISH_REASON_LENGTH if reply.finish == "length" else pb.FINISH_REASON_STOP
        answer = None if body is None else Answer(body, reply, prompt_tokens)
        return reply, usage, finish, answer

    async def _unary(self, request: pb.ChatRequest, context: grpc.aio.ServicerContext) -> pb.ChatResponse:
        with self._counted():
            reply, usage, finish, answer = await self._answer(request, context)
            if answer is not None:
                completion = answer.completion(new_id("chatcmpl-"), int(time.time()), request.model)
                response = openai_chat.response_from_json(completion)
            else:
                response = pb.ChatResponse(
                    id=new_id("chatcmpl-"),
                    model=request.model,
                    content=reply.text,
                    finish_reason=finish,
                    usage=usage,
                    created=int(time.time()),
                )
            self.fake.stats["completed"] += 1
            return response

    async def _stream(
        self, request: pb.ChatRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ChatChunk]:
        with self._counted():
            reply, usage, finish, answer = await self._answer(request, context)
            chunk_id = new_id("chatcmpl-")
            created = int(time.time())
            if answer is not None:
                # The simple layout always ends with the usage; OpenAI's only when asked for.
                include_usage = (
                    request.stream_options.include_usage or request.chunk_layout != pb.CHUNK_LAYOUT_OPENAI
                )
                dicts = answer.chunks(chunk_id, created, request.model, include_usage)
                chunks = [openai_chat.chunk_from_json(c) for c in dicts]
            else:
                chunks = [
                    pb.ChatChunk(id=chunk_id, model=request.model, delta=token, created=created)
                    for token in reply.tokens
                ]
                chunks.append(
                    pb.ChatChunk(
                        id=chunk_id, model=request.model, finish_reason=finish, usage=usage, created=created
                    )
                )
            delay = self._token_delay()
            break_after = self.fake.faults.stream_error_after_tokens
            stall_after = self.fake.faults.stream_stall_after_tokens
            for i, chunk in enumerate(chunks[:-1]):
                if i == break_after:
                    await self._break(context)
                if i == stall_after:
                    await stall()
                if delay > 0 and i:
                    await asyncio.sleep(delay)
                yield chunk
            if break_after == len(chunks) - 1:
                await self._break(context)
            yield chunks[-1]
            self.fake.stats["completed"] += 1


def _is_rich(request: pb.ChatRequest) -> bool:
    """Whether the request needs the answers of :mod:`.completions` (see :func:`.completions.is_rich`)."""
    return bool(
        request.chunk_layout == pb.CHUNK_LAYOUT_OPENAI
        or request.tools
        or (request.HasField("n") and request.n != 1)
        or request.HasField("reasoning_effort")
        or request.logprobs
        or request.response_format.type in ("json_object", "json_schema")
    )
