"""Async client library for the gateway: gRPC, REST, and a hybrid that falls back from one to the other.

All three clients take the same requests and return the same protobuf messages, and every failure reaches
the caller as one :class:`~llmgw.errors.GatewayError` carrying the server's message::

    import asyncio
    from llmgw.client import LLMConnection

    async def main() -> None:
        async with LLMConnection(
            grpc_target="gateway:50051", rest_base_url="http://gateway:8080/v1", api_key="sk-..."
        ) as llm:
            messages = [{"role": "user", "content": "hi"}]
            reply = await llm.chat_completion(model="demo-model", messages=messages, max_tokens=64)
            print(reply.content, reply.usage.total_tokens, llm.last_transport)
            async for chunk in llm.streaming_chat(model="demo-model", messages=messages):
                print(chunk.delta, end="", flush=True)
            print(await llm.list_models())

    asyncio.run(main())

:class:`LLMGrpcClient` speaks ``llmgateway.v1.LLMService``; :class:`LLMHttpClient` speaks the
OpenAI-compatible REST API (``POST /chat/completions``, SSE streaming, ``GET /models``);
:class:`LLMConnection` prefers one and, on a retryable failure before anything was received, repeats the
call once on the other.

Requests are given either as a ``pb.ChatRequest`` or as OpenAI-style keyword arguments (``model``,
``messages``, ``temperature``, ``max_tokens``, ...), which are parsed by
:func:`llmgw.codecs.openai_chat.request_from_json`, so a malformed request is refused with the same message
the gateway's REST front would give.

Errors: ``GatewayError.kind`` is the gateway's verdict (401 -> UNAUTHENTICATED, 429 -> RESOURCE_EXHAUSTED,
503 or an unreachable server -> UNAVAILABLE, ...), ``upstream_status`` the HTTP status (or the gRPC code's
HTTP equivalent), ``retry_after`` the server's hint, ``retryable`` whether another attempt may succeed.

Retries: each call makes up to ``max_attempts`` attempts within ``timeout`` seconds in total (for a stream:
until the stream ends). Retryable failures (HTTP 408/409/429/5xx, gRPC UNAVAILABLE/RESOURCE_EXHAUSTED/...,
connection errors) are retried after :func:`backoff_delay` (exponential backoff with full jitter, never
shorter than the server's Retry-After; implemented once in :mod:`llmgw.retry` and re-exported here).
A stream is never retried once its first chunk was yielded.

Each client binds its channel/session to the event loop of its first call; use one client per loop.
Stop a stream early with ``contextlib.aclosing`` (or by closing the generator) so the call is cancelled.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from ssl import SSLContext
from types import TracebackType
from typing import Any, Literal, Self, TypeVar

import aiohttp
import grpc
import grpc.aio
import orjson

from llmgateway.v1 import llm_service_pb2 as pb
from llmgateway.v1 import llm_service_pb2_grpc
from llmgw.codecs import error_envelopes, openai_chat
from llmgw.codecs import retry_after as retry_after_codec
from llmgw.codecs.sse import sse_events
from llmgw.errors import GatewayError, Kind, from_upstream_grpc, from_upstream_http
from llmgw.retry import backoff_delay

__all__ = [
    "BACKOFF_BASE_S",
    "BACKOFF_CAP_S",
    "LLMConnection",
    "LLMGrpcClient",
    "LLMHttpClient",
    "backoff_delay",
    "build_request",
]

BACKOFF_BASE_S = 0.1
BACKOFF_CAP_S = 5.0

_T = TypeVar("_T")
Transport = Literal["grpc", "rest"]


def build_request(request: pb.ChatRequest | None, kwargs: dict[str, Any]) -> pb.ChatRequest:
    """The request for a call given either a ``pb.ChatRequest`` or OpenAI-style keyword arguments."""
    if request is not None:
        if kwargs:
            raise TypeError("pass either a ChatRequest or keyword arguments, not both")
        if not isinstance(request, pb.ChatRequest):
            raise TypeError(f"request: expected llmgateway.v1.ChatRequest, got {type(request).__name__}")
        return request
    if kwargs.get("stream"):
        raise TypeError("stream: use streaming_chat() for a streamed reply")
    body = {k: v for k, v in kwargs.items() if k != "stream"}
    req, _ = openai_chat.request_from_json(body)
    return req


_KIND_BY_HTTP: dict[int, Kind] = {kind.http_status: kind for kind in Kind}


def _as_client_error(err: GatewayError) -> GatewayError:
    """The error as the gateway meant it.

    ``from_upstream_*`` classify from a proxy's point of view (a 401 there means the proxy's provider
    credentials are bad, any 5xx is a bad gateway). Seen from a client the status is the gateway's own
    verdict: 401 is the caller's key, 503 the gateway being unavailable. ``retryable``, ``retry_after``
    and ``upstream_status`` (the HTTP status, or the gRPC code's HTTP equivalent) are kept.
    """
    if err.upstream_status is not None:
        err.kind = _KIND_BY_HTTP.get(err.upstream_status, err.kind)
    return err


def _unreachable(what: str, exc: BaseException) -> GatewayError:
    return GatewayError(Kind.UNAVAILABLE, f"cannot reach {what}: {exc or type(exc).__name__}", retryable=True)


def _timed_out(timeout: float) -> GatewayError:
    # The caller's whole budget is spent: neither a retry nor the other transport has time left.
    return GatewayError(Kind.DEADLINE_EXCEEDED, f"no answer within the client timeout of {timeout:g}s")


class _RetryPolicy:
    """Attempt counting and deadline keeping shared by both clients."""

    def __init__(self, *, timeout: float, max_attempts: int) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout: {timeout} must be positive")
        if max_attempts < 1:
            raise ValueError(f"max_attempts: {max_attempts} must be at least 1")
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.base = BACKOFF_BASE_S
        self.cap = BACKOFF_CAP_S
        self.rng = random.Random()

    def deadline(self) -> float:
        return asyncio.get_running_loop().time() + self.timeout

    @staticmethod
    def remaining(deadline: float) -> float:
        return deadline - asyncio.get_running_loop().time()

    def delay(self, err: GatewayError, attempt: int, deadline: float) -> float | None:
        """Seconds to sleep before another attempt, or None when ``err`` must be raised."""
        if not err.retryable or attempt >= self.max_attempts:
            return None
        delay = backoff_delay(
            attempt, base=self.base, cap=self.cap, retry_after=err.retry_after, rng=self.rng
        )
        if delay >= self.remaining(deadline):
            return None
        return delay

    async def run(self, once: Callable[[float], Awaitable[_T]]) -> _T:
        """Call ``once(deadline)`` until it succeeds, retrying retryable GatewayErrors."""
        deadline = self.deadline()
        attempt = 0
        while True:
            attempt += 1
            try:
                return await once(deadline)
            except GatewayError as err:
                delay = self.delay(err, attempt, deadline)
                if delay is None:
                    raise
            await asyncio.sleep(delay)

    async def run_stream(self, once: Callable[[float], AsyncGenerator[_T, None]]) -> AsyncGenerator[_T, None]:
        """Iterate ``once(deadline)``, retrying retryable GatewayErrors until its first item was yielded."""
        deadline = self.deadline()
        attempt = 0
        while True:
            attempt += 1
            yielded = False
            stream = once(deadline)
            try:
                async for item in stream:
                    yielded = True
                    yield item
                return
            except GatewayError as err:
                delay = None if yielded else self.delay(err, attempt, deadline)
                if delay is None:
                    raise
            finally:
                await stream.aclose()
            await asyncio.sleep(delay)


class _Closing:
    """``async with`` closes the client."""

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


class _LoopBound(_Closing):
    """Remembers the event loop of the first call; channels and sessions cannot move between loops."""

    _loop: asyncio.AbstractEventLoop | None = None

    def _check_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError(
                f"{type(self).__name__} was first used on another event loop; create one client per loop"
            )


class LLMGrpcClient(_LoopBound):
    """Client of the gateway's gRPC front (``llmgateway.v1.LLMService``).

    ``target`` is ``host:port``. With ``tls`` the channel is encrypted, verified against
    ``root_certificates`` (PEM) or the system roots. ``api_key`` is sent as ``authorization: Bearer``
    metadata on every call.
    """

    def __init__(
        self,
        target: str,
        *,
        api_key: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        timeout: float = 60.0,
        max_attempts: int = 3,
    ) -> None:
        self.target = target
        self._tls = tls or root_certificates is not None
        self._root_certificates = root_certificates
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {api_key}"),) if api_key else ()
        )
        self._policy = _RetryPolicy(timeout=timeout, max_attempts=max_attempts)
        self._channel: Any = None
        self._stub: Any = None

    def _get_stub(self) -> Any:
        self._check_loop()
        if self._stub is None:
            if self._tls:
                creds = grpc.ssl_channel_credentials(root_certificates=self._root_certificates)
                self._channel = grpc.aio.secure_channel(self.target, creds)
            else:
                self._channel = grpc.aio.insecure_channel(self.target)
            self._stub = llm_service_pb2_grpc.LLMServiceStub(self._channel)
        return self._stub

    def _error(self, exc: grpc.aio.AioRpcError, deadline: float) -> GatewayError:
        code = exc.code()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and self._policy.remaining(deadline) <= 0.01:
            return _timed_out(self._policy.timeout)
        retry_after = None
        for key, value in exc.trailing_metadata() or ():
            if key.lower() == "retry-after":
                retry_after = retry_after_codec.seconds(value)
        message = exc.details() or code.name
        return _as_client_error(from_upstream_grpc(code, message, retry_after))

    async def chat_completion(self, request: pb.ChatRequest | None = None, **kwargs: Any) -> pb.ChatResponse:
        """The complete reply to a request (a ``pb.ChatRequest`` or OpenAI-style keyword arguments)."""
        req = build_request(request, kwargs)

        async def once(deadline: float) -> pb.ChatResponse:
            stub = self._get_stub()
            try:
                response: pb.ChatResponse = await stub.ChatCompletion(
                    req, timeout=self._policy.remaining(deadline), metadata=self._metadata
                )
            except grpc.aio.AioRpcError as exc:
                raise self._error(exc, deadline) from None
            return response

        return await self._policy.run(once)

    async def streaming_chat(
        self, request: pb.ChatRequest | None = None, **kwargs: Any
    ) -> AsyncGenerator[pb.ChatChunk, None]:
        """The reply as it is generated: text-delta chunks, then a final chunk with finish_reason, usage."""
        req = build_request(request, kwargs)

        async def once(deadline: float) -> AsyncGenerator[pb.ChatChunk, None]:
            stub = self._get_stub()
            call = stub.StreamingChat(req, timeout=self._policy.remaining(deadline), metadata=self._metadata)
            try:
                async for chunk in call:
                    yield chunk
            except grpc.aio.AioRpcError as exc:
                raise self._error(exc, deadline) from None
            finally:
                call.cancel()  # no-op once the call has finished

        async for chunk in self._policy.run_stream(once):
            yield chunk

    async def list_models(self) -> list[str]:
        """The model names the gateway accepts."""

        async def once(deadline: float) -> list[str]:
            stub = self._get_stub()
            try:
                response = await stub.ListModels(
                    pb.ListModelsRequest(), timeout=self._policy.remaining(deadline), metadata=self._metadata
                )
            except grpc.aio.AioRpcError as exc:
                raise self._error(exc, deadline) from None
            return [m.id for m in response.models]

        return await self._policy.run(once)

    async def close(self) -> None:
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            await channel.close()
        self._loop = None


def _error_message(status: int, body: bytes) -> str:
    """The server's message from an OpenAI-style error body, or the body's text."""
    found = error_envelopes.message(body)
    if found is not None:
        return found
    text = body.decode("utf-8", "replace").strip()
    return text[:500] if text else f"HTTP {status}"


def _stream_error(body: dict[str, Any]) -> GatewayError:
    """An error event inside an SSE stream (``data: {"error": {...}}``), as the gateway or OpenAI send it."""
    error = body.get("error")
    if not isinstance(error, dict):
        return GatewayError(Kind.BAD_GATEWAY, str(error), retryable=True)
    message = str(error.get("message") or error)
    code = error.get("code")
    kind = Kind.__members__.get(code.upper()) if isinstance(code, str) else None  # the gateway's own errors
    if kind is None:
        kind = next((k for k in Kind if k.error_type == error.get("type")), Kind.BAD_GATEWAY)
    retryable = kind in (
        Kind.RESOURCE_EXHAUSTED,
        Kind.UNAVAILABLE,
        Kind.BAD_GATEWAY,
        Kind.INTERNAL,
        Kind.DEADLINE_EXCEEDED,
    )
    return GatewayError(kind, message, retryable=retryable)


class LLMHttpClient(_LoopBound):
    """Client of the gateway's OpenAI-compatible REST front; ``base_url`` ends in ``/v1``."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        max_attempts: int = 3,
        ssl: SSLContext | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._ssl = ssl
        self._policy = _RetryPolicy(timeout=timeout, max_attempts=max_attempts)
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        self._check_loop()
        if self._session is None:
            connector = aiohttp.TCPConnector(ssl=self._ssl if self._ssl is not None else True)
            self._session = aiohttp.ClientSession(connector=connector, headers=self._headers)
        return self._session

    def _timeout(self, deadline: float) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=max(self._policy.remaining(deadline), 0.001))

    async def _raise_for_status(self, resp: aiohttp.ClientResponse) -> None:
        if resp.status < 400:
            return
        body = await resp.read()
        retry_after = retry_after_codec.from_headers(resp.headers)
        raise _as_client_error(
            from_upstream_http(resp.status, _error_message(resp.status, body), retry_after)
        )

    async def _request_json(self, method: str, path: str, deadline: float, body: bytes | None = None) -> Any:
        url = f"{self.base_url}{path}"
        try:
            async with self._get_session().request(
                method, url, data=body, timeout=self._timeout(deadline)
            ) as resp:
                await self._raise_for_status(resp)
                raw = await resp.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise self._transport_error(exc, method, url) from None
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise GatewayError(Kind.BAD_GATEWAY, f"{method} {url}: response is not JSON: {exc}") from None

    def _transport_error(self, exc: BaseException, method: str, url: str) -> GatewayError:
        """The GatewayError for a failure below HTTP: a timeout, no connection, a broken body."""
        if isinstance(exc, TimeoutError):
            return _timed_out(self._policy.timeout)
        if isinstance(exc, aiohttp.ClientConnectionError | aiohttp.ClientPayloadError):
            return _unreachable(url, exc)
        return GatewayError(Kind.BAD_GATEWAY, f"{method} {url}: {exc}")

    async def chat_completion(self, request: pb.ChatRequest | None = None, **kwargs: Any) -> pb.ChatResponse:
        """The complete reply to a request (a ``pb.ChatRequest`` or OpenAI-style keyword arguments)."""
        body = orjson.dumps(openai_chat.request_to_json(build_request(request, kwargs)))

        async def once(deadline: float) -> pb.ChatResponse:
            parsed = await self._request_json("POST", "/chat/completions", deadline, body)
            try:
                return openai_chat.response_from_json(parsed)
            except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
                raise GatewayError(Kind.BAD_GATEWAY, f"malformed chat completion: {exc!r}") from None

        return await self._policy.run(once)

    async def streaming_chat(
        self, request: pb.ChatRequest | None = None, **kwargs: Any
    ) -> AsyncGenerator[pb.ChatChunk, None]:
        """The reply as it is generated, read from the server-sent events of ``stream: true``."""
        body = orjson.dumps(openai_chat.request_to_json(build_request(request, kwargs), stream=True))
        url = f"{self.base_url}/chat/completions"

        async def once(deadline: float) -> AsyncGenerator[pb.ChatChunk, None]:
            try:
                async with self._get_session().post(
                    url, data=body, timeout=self._timeout(deadline), headers={"Accept": "text/event-stream"}
                ) as resp:
                    await self._raise_for_status(resp)
                    async for chunk in _chunks_from_sse(resp.content):
                        yield chunk
            except (TimeoutError, aiohttp.ClientError) as exc:
                raise self._transport_error(exc, "POST", url) from None

        async for chunk in self._policy.run_stream(once):
            yield chunk

    async def list_models(self) -> list[str]:
        """The model names the gateway accepts."""

        async def once(deadline: float) -> list[str]:
            parsed = await self._request_json("GET", "/models", deadline)
            try:
                return [str(m["id"]) for m in parsed["data"]]
            except (KeyError, TypeError) as exc:
                raise GatewayError(Kind.BAD_GATEWAY, f"malformed model list: {exc!r}") from None

        return await self._policy.run(once)

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()
        self._loop = None


async def _chunks_from_sse(content: aiohttp.StreamReader) -> AsyncIterator[pb.ChatChunk]:
    """The chunks of an OpenAI SSE stream, shaped like the gRPC stream's (see ``openai_chat.read_simple_stream``)."""
    try:
        async for chunk in openai_chat.read_simple_stream(
            (data async for _, data in sse_events(content)), _stream_error
        ):
            yield chunk
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise GatewayError(Kind.BAD_GATEWAY, f"malformed stream: {exc}", retryable=True) from None


class LLMConnection(_Closing):
    """The hybrid of the seed design: gRPC when a ``grpc_target`` is given and ``use_grpc``, else REST.

    With ``fallback`` (and both transports configured), a call whose preferred transport fails with a
    retryable error (after that transport's own retries) and before anything was yielded is repeated
    once on the other transport. ``last_transport`` names the transport that answered (or last failed)
    the latest call.
    """

    def __init__(
        self,
        *,
        grpc_target: str | None = None,
        rest_base_url: str | None = None,
        api_key: str | None = None,
        use_grpc: bool = True,
        fallback: bool = True,
        tls: bool = False,
        root_certificates: bytes | None = None,
        ssl: SSLContext | None = None,
        timeout: float = 60.0,
        max_attempts: int = 3,
    ) -> None:
        if grpc_target is None and rest_base_url is None:
            raise ValueError("LLMConnection needs a grpc_target, a rest_base_url, or both")
        self.grpc: LLMGrpcClient | None = None
        self.rest: LLMHttpClient | None = None
        if grpc_target is not None:
            self.grpc = LLMGrpcClient(
                grpc_target,
                api_key=api_key,
                tls=tls,
                root_certificates=root_certificates,
                timeout=timeout,
                max_attempts=max_attempts,
            )
        if rest_base_url is not None:
            self.rest = LLMHttpClient(
                rest_base_url, api_key=api_key, timeout=timeout, max_attempts=max_attempts, ssl=ssl
            )
        self.fallback = fallback
        self.preferred: Transport = "grpc" if use_grpc and self.grpc is not None else "rest"
        self.last_transport: Transport | None = None

    def _order(self) -> list[tuple[Transport, LLMGrpcClient | LLMHttpClient]]:
        clients: dict[Transport, LLMGrpcClient | LLMHttpClient | None] = {
            "grpc": self.grpc,
            "rest": self.rest,
        }
        other: Transport = "rest" if self.preferred == "grpc" else "grpc"
        preferred_client = clients[self.preferred]
        assert preferred_client is not None
        order: list[tuple[Transport, LLMGrpcClient | LLMHttpClient]] = [(self.preferred, preferred_client)]
        other_client = clients[other]
        if self.fallback and other_client is not None:
            order.append((other, other_client))
        return order

    async def _call(self, op: Callable[[LLMGrpcClient | LLMHttpClient], Awaitable[_T]]) -> _T:
        order = self._order()
        for i, (transport, client) in enumerate(order):
            self.last_transport = transport
            try:
                return await op(client)
            except GatewayError as err:
                if not err.retryable or i == len(order) - 1:
                    raise
        raise AssertionError("unreachable")

    async def chat_completion(self, request: pb.ChatRequest | None = None, **kwargs: Any) -> pb.ChatResponse:
        """The complete reply, from the preferred transport or (on a retryable failure) the other one."""
        req = build_request(request, kwargs)
        return await self._call(lambda client: client.chat_completion(req))

    async def streaming_chat(
        self, request: pb.ChatRequest | None = None, **kwargs: Any
    ) -> AsyncGenerator[pb.ChatChunk, None]:
        """The streamed reply; falls back only if the preferred transport failed before its first chunk."""
        req = build_request(request, kwargs)
        order = self._order()
        for i, (transport, client) in enumerate(order):
            self.last_transport = transport
            yielded = False
            stream = client.streaming_chat(req)
            try:
                async for chunk in stream:
                    yielded = True
                    yield chunk
                return
            except GatewayError as err:
                if yielded or not err.retryable or i == len(order) - 1:
                    raise
            finally:
                await stream.aclose()

    async def list_models(self) -> list[str]:
        """The model names the gateway accepts."""
        return await self._call(lambda client: client.list_models())

    async def close(self) -> None:
        """Close both transports' channel and session."""
        for client in (self.grpc, self.rest):
            if client is not None:
                await client.close()
