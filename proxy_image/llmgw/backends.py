"""Upstream clients, one per provider type, all speaking the gateway's protobuf messages.

A backend turns a ``ChatRequest`` into the provider's own protocol and back:

- ``openai``: any OpenAI-compatible Chat Completions API (OpenAI, vLLM, LiteLLM, ...), over a pool of
  HTTP/1.1 keep-alive connections (:mod:`llmgw._net.http_client`; see README for why not aiohttp or HTTP/2).
- ``anthropic``: Anthropic's Messages API, converted both ways, including its streaming events.
- ``grpc``: an upstream ``llmgateway.v1.LLMService`` over one HTTP/2 connection, multiplexed
  (:mod:`llmgw._net.grpc_channel`).

Every failure is raised as :class:`~llmgw.errors.GatewayError` with ``retryable`` set, so the gateway's
retry and fallback logic never looks at provider-specific errors. Messages name the provider and never
contain credentials. Streams skip chunks without content, so the first chunk a backend yields is the
first token, which is what "nothing was sent to the client yet" means for fallback.
"""

from __future__ import annotations

import dataclasses
import email.utils
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Any, Protocol

import grpc
import orjson
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]

from llmgateway.v1 import llm_service_pb2 as pb
from llmgw._net import grpc_channel, http_client
from llmgw._net.grpc_wire import RpcError
from llmgw.codecs import openai_chat
from llmgw.errors import GatewayError, Kind, from_upstream_grpc, from_upstream_http
from llmgw_common.config import Provider


@dataclasses.dataclass
class CallStats:
    """Filled in by a backend during one call: payload bytes each way, for the metrics."""

    sent: int = 0
    received: int = 0


class Backend(Protocol):
    provider: Provider

    async def complete(
        self, req: pb.ChatRequest, model: str, timeout: float, stats: CallStats
    ) -> pb.ChatResponse:
        """The whole reply; ``model`` is the name to send upstream."""
        ...

    def stream(
        self, req: pb.ChatRequest, model: str, timeout: float, stats: CallStats
    ) -> AsyncGenerator[pb.ChatChunk, None]:
        """Content chunks, then a final chunk with finish_reason (and usage when the provider gives it)."""
        ...

    async def close(self) -> None: ...


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds from ``retry-after-ms``, ``retry-after`` (seconds or an HTTP date), or None."""
    value = headers.get("retry-after-ms")
    if value:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def _upstream_message(data: bytes) -> str:
    """The human message inside an OpenAI or Anthropic error body, else a short excerpt."""
    try:
        body = orjson.loads(data)
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
        if isinstance(error, str):
            return error
    except orjson.JSONDecodeError:
        pass
    return data[:200].decode("utf-8", "replace").strip() or "(empty body)"


# What a REST exchange can fail with: a timeout, the connection (refused, reset, closed early), or a
# response that is not HTTP.
_TRANSPORT_ERRORS = (TimeoutError, OSError, http_client.ProtocolError)
_MAX_ERROR_BODY = 64 * 1024  # an error body is read for its message only
_MAX_RESPONSE_BODY = 64 * 1024 * 1024


def _bad_body(provider: Provider, exc: Exception) -> GatewayError:
    return GatewayError(
        Kind.BAD_GATEWAY,
        f"provider {provider.name!r} sent a malformed response ({type(exc).__name__}: {exc})",
        retryable=True,
        upstream_status=502,
    )


class _RestBackend:
    """Shared plumbing of the two REST provider types: the pooled client and error mapping."""

    path_suffix = ""

    def __init__(self, provider: Provider, api_key: str | None) -> None:
        self.provider = provider
        self.url = provider.base_url + self.path_suffix
        self.headers = {
            "content-type": "application/json",
            **dict(provider.headers),
            **self.auth_headers(api_key),
        }
        self.client = http_client.HTTPClient(
            self.url,
            self.headers,
            max_connections=provider.max_connections,
            connect_timeout=provider.connect_timeout_s,
        )

    def auth_headers(self, api_key: str | None) -> dict[str, str]:
        return {"authorization": f"Bearer {api_key}"} if api_key else {}

    def error(self, status: int, data: bytes, headers: Mapping[str, str]) -> GatewayError:
        name = self.provider.name
        if status in (401, 403):
            message = (
                f"provider {name!r} rejected the gateway's credentials (HTTP {status}); "
                f"check the API key configured for it"
            )
        else:
            message = f"provider {name!r} answered HTTP {status}: {_upstream_message(data)}"
        return from_upstream_http(status, message, parse_retry_after(headers))

    def unreachable(self, exc: BaseException) -> GatewayError:
        if isinstance(exc, TimeoutError):
            return GatewayError(
                Kind.DEADLINE_EXCEEDED,
                f"provider {self.provider.name!r} did not answer in time",
                retryable=True,
                upstream_status=504,
            )
        if isinstance(exc, http_client.ProtocolError):
            return _bad_body(self.provider, exc)
        return GatewayError(
            Kind.UNAVAILABLE,
            f"provider {self.provider.name!r} at {self.provider.base_url} is unreachable: {exc}",
            retryable=True,
            upstream_status=503,
        )

    async def post(self, body: dict[str, Any], timeout: float, stats: CallStats) -> http_client.Response:
        """Send the request; returns a response with status 200, else raises GatewayError."""
        data = orjson.dumps(body)
        stats.sent += len(data)
        try:
            resp = await self.client.post(data, timeout)
        except _TRANSPORT_ERRORS as exc:
            raise self.unreachable(exc) from None
        if resp.status != 200:
            try:
                payload = await resp.read(_MAX_ERROR_BODY)
            except _TRANSPORT_ERRORS:
                payload = b""
            finally:
                resp.close()
            stats.received += len(payload)
            raise self.error(resp.status, payload, resp.headers)
        return resp

    async def read_json(self, resp: http_client.Response, stats: CallStats) -> Any:
        try:
            data = await resp.read(_MAX_RESPONSE_BODY)
        except _TRANSPORT_ERRORS as exc:
            raise self.unreachable(exc) from None
        finally:
            resp.close()
        stats.received += len(data)
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise _bad_body(self.provider, exc) from None

    async def sse_events(
        self, resp: http_client.Response, stats: CallStats
    ) -> AsyncIterator[tuple[str, bytes]]:
        """(event name, data) pairs of a Server-Sent Events body."""
        event = ""
        try:
            async for line in resp.lines():
                stats.received += len(line)
                line = line.rstrip(b"\r\n")
                if not line:
                    event = ""
                elif line.startswith(b"data:"):
                    yield event, line[5:].lstrip()
                elif line.startswith(b"event:"):
                    event = line[6:].strip().decode()
        except _TRANSPORT_ERRORS as exc:
            raise self.unreachable(exc) from None
        finally:
            resp.close()  # a stream left early (client gone, error event) must not reuse the connection

    async def close(self) -> None:
        await self.client.close()


class OpenAIBackend(_RestBackend):
    path_suffix = "/chat/completions"

    async def complete(
        self, req: pb.ChatRequest, model: str, timeout: float, stats: CallStats
    ) -> pb.ChatResponse:
        resp = await self.post(openai_chat.request_to_json(req, model=model), timeout, stats)
        body = await self.read_json(resp, stats)
        try:
            return openai_chat.response_from_json(body)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            raise _bad_body(self.provider, exc) from None

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
            raise _bad_body(self.provider, exc) from None


_ANTHROPIC_FINISH = {
    "end_turn": pb.FINISH_REASON_STOP,
    "stop_sequence": pb.FINISH_REASON_STOP,
    "pause_turn": pb.FINISH_REASON_STOP,
    "max_tokens": pb.FINISH_REASON_LENGTH,
    "tool_use": pb.FINISH_REASON_TOOL_CALLS,
    "refusal": pb.FINISH_REASON_CONTENT_FILTER,
}


class AnthropicBackend(_RestBackend):
    path_suffix = "/v1/messages"

    def auth_headers(self, api_key: str | None) -> dict[str, str]:
        headers = {"anthropic-version": self.provider.anthropic_version}
        if api_key:
            headers["x-api-key"] = api_key
        return headers

    def request_body(self, req: pb.ChatRequest, model: str, stream: bool) -> dict[str, Any]:
        system: list[str] = []
        messages: list[dict[str, Any]] = []
        for m in req.messages:
            if m.role in (pb.ROLE_SYSTEM, pb.ROLE_DEVELOPER):
                system.append(m.content)
                continue
            role = "assistant" if m.role == pb.ROLE_ASSISTANT else "user"
            messages.append({"role": role, "content": m.content})
        if req.HasField("temperature") and req.temperature > 1.0:
            raise GatewayError(
                Kind.INVALID_ARGUMENT,
                f"temperature: {req.temperature:g} is out of range [0, 1] for Anthropic provider "
                f"{self.provider.name!r}",
            )
        body: dict[str, Any] = {
            "model": model,
            "messages": messages,
            "max_tokens": req.max_tokens if req.HasField("max_tokens") else self.provider.default_max_tokens,
        }
        if system:
            body["system"] = "\n\n".join(system)
        if req.HasField("temperature"):
            body["temperature"] = round(req.temperature, 6)
        if req.HasField("top_p"):
            body["top_p"] = round(req.top_p, 6)
        if req.stop:
            body["stop_sequences"] = list(req.stop)
        if req.HasField("user"):
            body["metadata"] = {"user_id": req.user}
        if stream:
            body["stream"] = True
        return body

    async def complete(
        self, req: pb.ChatRequest, model: str, timeout: float, stats: CallStats
    ) -> pb.ChatResponse:
        resp = await self.post(self.request_body(req, model, False), timeout, stats)
        body = await self.read_json(resp, stats)
        try:
            text = "".join(b.get("text", "") for b in body["content"] if b.get("type") == "text")
            usage = body.get("usage") or {}
            prompt, completion = int(usage.get("input_tokens", 0)), int(usage.get("output_tokens", 0))
            return pb.ChatResponse(
                id=str(body["id"]),
                model=str(body.get("model", model)),
                content=text,
                finish_reason=_ANTHROPIC_FINISH.get(
                    body.get("stop_reason") or "end_turn", pb.FINISH_REASON_STOP
                ),
                usage=pb.Usage(
                    prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
                ),
                created=int(time.time()),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise _bad_body(self.provider, exc) from None

    async def stream(
        self, req: pb.ChatRequest, model: str, timeout: float, stats: CallStats
    ) -> AsyncGenerator[pb.ChatChunk, None]:
        resp = await self.post(self.request_body(req, model, True), timeout, stats)
        msg_id, msg_model, created = "", model, int(time.time())
        prompt = completion = 0
        finish = pb.FINISH_REASON_UNSPECIFIED
        async for event, data in self.sse_events(resp, stats):
            try:
                body = orjson.loads(data)
                kind = body.get("type") or event
                if kind == "content_block_delta":
                    delta = body["delta"]
                    if delta.get("type") == "text_delta" and delta.get("text"):
                        yield pb.ChatChunk(id=msg_id, model=msg_model, created=created, delta=delta["text"])
                elif kind == "message_start":
                    message = body["message"]
                    msg_id, msg_model = str(message["id"]), str(message.get("model", model))
                    usage = message.get("usage") or {}
                    prompt = int(usage.get("input_tokens", 0))
                    completion = int(usage.get("output_tokens", 0))
                elif kind == "message_delta":
                    reason = (body.get("delta") or {}).get("stop_reason")
                    finish = _ANTHROPIC_FINISH.get(reason or "end_turn", pb.FINISH_REASON_STOP)
                    completion = int((body.get("usage") or {}).get("output_tokens", completion))
                elif kind == "message_stop":
                    break
                elif kind == "error":
                    error = body.get("error") or {}
                    status = 529 if error.get("type") == "overloaded_error" else 502
                    raise from_upstream_http(
                        status,
                        f"provider {self.provider.name!r} failed mid-stream: {error.get('message', '')}",
                    )
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
                raise _bad_body(self.provider, exc) from None
        if finish == pb.FINISH_REASON_UNSPECIFIED:
            raise _bad_body(self.provider, ValueError("stream ended without message_delta"))
        yield pb.ChatChunk(
            id=msg_id,
            model=msg_model,
            created=created,
            finish_reason=finish,
            usage=pb.Usage(
                prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
            ),
        )


def _retry_after_from_trailers(metadata: Any) -> float | None:
    for key, value in metadata or ():
        if key == "retry-after":
            try:
                return float(value)
            except ValueError:
                return None
    return None


_SERVICE = pb.DESCRIPTOR.services_by_name["LLMService"].full_name


class GrpcBackend:
    """An upstream LLMService: one channel, HTTP/2 multiplexing many calls over one connection."""

    def __init__(self, provider: Provider, api_key: str | None) -> None:
        self.provider = provider
        metadata = ((("authorization", f"Bearer {api_key}"),) if api_key else ()) + tuple(provider.headers)
        self.channel = grpc_channel.Channel(provider.target, tls=provider.tls, metadata=metadata)

    def error(self, exc: RpcError) -> GatewayError:
        code = exc.code
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            message = f"provider {self.provider.name!r} rejected the gateway's credentials ({code.name})"
        else:
            message = f"provider {self.provider.name!r} failed with {code.name}: {exc.details}".rstrip(": ")
        return from_upstream_grpc(code, message, _retry_after_from_trailers(exc.trailers))

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
            raise _bad_body(self.provider, exc) from None
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
            raise _bad_body(self.provider, exc) from None
        finally:
            await chunks.aclose()  # no-op when the call completed; stops the upstream when we were cancelled
        if not finished:
            raise _bad_body(self.provider, ValueError("stream ended without a finish_reason"))

    async def close(self) -> None:
        await self.channel.close()


def build_backend(provider: Provider, api_key: str | None) -> Backend:
    if provider.type == "openai":
        return OpenAIBackend(provider, api_key)
    if provider.type == "anthropic":
        return AnthropicBackend(provider, api_key)
    return GrpcBackend(provider, api_key)
