"""What the REST provider types share: a pooled HTTP/1.1 keep-alive client (:mod:`llmgw._net.http_client`;
see the README for why not aiohttp or HTTP/2), JSON bodies, Server-Sent Events and error mapping."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

import orjson

from llmgw._net import http_client
from llmgw.codecs import error_envelopes, retry_after
from llmgw.errors import GatewayError, Kind, from_upstream_http
from llmgw.providers.base import CallStats, malformed_response
from llmgw_common.config import Provider
from llmgw_common.limits import HTTPClientLimits

# What a REST exchange can fail with: a timeout, the connection (refused, reset, closed early), or a
# response that is not HTTP.
_TRANSPORT_ERRORS = (TimeoutError, OSError, http_client.MalformedResponse)


class RestClient:
    """One REST provider: ``base_url + path_suffix`` over a pool of keep-alive connections."""

    path_suffix = ""

    def __init__(
        self,
        provider: Provider,
        api_key: str | None,
        limits: HTTPClientLimits,
        base_url: str,
        max_connections: int,
    ) -> None:
        self.provider = provider
        self.limits = limits
        self.base_url = base_url
        self.headers = {
            "content-type": "application/json",
            **dict(provider.headers),
            **self.auth_headers(api_key),
        }
        self.client = http_client.HTTPClient(
            base_url + self.path_suffix,
            self.headers,
            max_connections=max_connections,
            connect_timeout=provider.connect_timeout_s,
            limits=limits,
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
            found = error_envelopes.message(data)
            if found is None:
                found = data[:200].decode("utf-8", "replace").strip() or "(empty body)"
            message = f"provider {name!r} answered HTTP {status}: {found}"
        return from_upstream_http(status, message, retry_after.from_headers(headers))

    def unreachable(self, exc: BaseException) -> GatewayError:
        if isinstance(exc, TimeoutError):
            return GatewayError(
                Kind.DEADLINE_EXCEEDED,
                f"provider {self.provider.name!r} did not answer in time",
                retryable=True,
                upstream_status=504,
            )
        if isinstance(exc, http_client.MalformedResponse):
            return malformed_response(self.provider, exc)
        return GatewayError(
            Kind.UNAVAILABLE,
            f"provider {self.provider.name!r} at {self.base_url} is unreachable: {exc}",
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
                payload = await resp.read(self.limits.max_error_body_bytes)
            except _TRANSPORT_ERRORS:
                payload = b""
            finally:
                resp.close()
            stats.received += len(payload)
            raise self.error(resp.status, payload, resp.headers)
        return resp

    async def read_json(self, resp: http_client.Response, stats: CallStats) -> Any:
        try:
            data = await resp.read(self.limits.max_response_bytes)
        except _TRANSPORT_ERRORS as exc:
            raise self.unreachable(exc) from None
        finally:
            resp.close()
        stats.received += len(data)
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise malformed_response(self.provider, exc) from None

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
