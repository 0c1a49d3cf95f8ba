"""What the REST provider types share: a pooled HTTP/1.1 keep-alive client (:mod:`llmgw._net.http_client`;
see the README for why not aiohttp or HTTP/2), JSON bodies, Server-Sent Events and error mapping.

What a client is told of a failure names the provider, never its address (the log has it), and an
upstream's own text is passed on only through :func:`llmgw.redact.redact`, before it is shortened.
"""

from __future__ import annotations

import logging
import os
import ssl
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import urlsplit

import orjson

from llmgw._net import http_client
from llmgw.codecs import error_envelopes, retry_after, sse
from llmgw.errors import GatewayError, Kind, from_upstream_http
from llmgw.providers.base import (
    MAX_RELAYED_CHARS,
    CallStats,
    OnLimit,
    limit_exceeded,
    malformed_response,
    timed_out,
)
from llmgw.redact import redact
from llmgw_common.config import Provider
from llmgw_common.limits import HTTPClientLimits

log = logging.getLogger("llmgw.providers")

_UNREACHABLE_LOG_INTERVAL = 10.0  # seconds between two log lines about one provider being unreachable

# What a REST exchange can fail with: a timeout, the connection (refused, reset, closed early), or a
# response that is not HTTP.
_TRANSPORT_ERRORS = (TimeoutError, OSError, http_client.MalformedResponse)


class RestClient:
    """One REST provider: ``base_url + path_suffix`` over a pool of keep-alive connections."""

    path_suffix = ""
    native_fields: frozenset[str] = frozenset()

    def __init__(
        self,
        provider: Provider,
        api_key: str | None,
        limits: HTTPClientLimits,
        base_url: str,
        max_connections: int,
        on_limit: OnLimit | None = None,
    ) -> None:
        self.provider = provider
        self.limits = limits
        self.base_url = base_url
        self._base_path = urlsplit(base_url).path.rstrip("/")  # what a path of post() is appended to
        self.on_limit = on_limit
        self._logged_unreachable = float("-inf")
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
            on_limit=None if on_limit is None else lambda key: on_limit(f"restClient.{key}"),
        )

    def auth_headers(self, api_key: str | None) -> dict[str, str]:
        return {"authorization": f"Bearer {api_key}"} if api_key else {}

    def error(self, status: int, data: bytes, headers: Mapping[str, str]) -> GatewayError:
        name = self.provider.name
        param, code = error_envelopes.param_and_code(data)
        if status in (401, 403):
            message = (
                f"provider {name!r} rejected the gateway's credentials (HTTP {status}); "
                f"check the API key configured for it"
            )
        else:
            found = error_envelopes.message(data)
            if found is None:
                found = redact(data.decode("utf-8", "replace")).strip()[:200] or "(empty body)"
            else:
                found = redact(found)[:MAX_RELAYED_CHARS]
            message = f"provider {name!r} answered HTTP {status}: {found}"
        hint = retry_after.from_headers(headers)
        if hint is None:
            raw = " ".join(
                f"{k}={v[:60]!r}" for k in ("retry-after-ms", "retry-after") if (v := headers.get(k))
            )
            if raw:
                log.info("provider %r sent an unreadable Retry-After (%s); ignored", name, raw)
        return from_upstream_http(status, message, hint, param, code)

    def unreachable(self, exc: BaseException) -> GatewayError:
        name = self.provider.name
        if isinstance(exc, TimeoutError):
            return timed_out(self.provider, exc)
        if isinstance(exc, http_client.LimitExceeded):
            return limit_exceeded(self.provider, f"restClient.{exc.limit}", str(exc))
        if isinstance(exc, http_client.MalformedResponse):
            return malformed_response(self.provider, exc)
        now = time.monotonic()
        if now - self._logged_unreachable >= _UNREACHABLE_LOG_INTERVAL:
            self._logged_unreachable = now
            log.warning("provider %r at %s is unreachable: %r", name, self.base_url, exc)
        return GatewayError(
            Kind.UNAVAILABLE,
            f"provider {name!r} is unreachable: {_reason(exc)}",
            retryable=True,
            upstream_status=503,
        )

    async def post(
        self,
        body: dict[str, Any] | bytes,
        timeout: float,
        stats: CallStats,
        path: str | None = None,
        extra_headers: bytes = b"",
    ) -> http_client.Response:
        """Send the request (to ``path`` below the base URL, else to the type's own path); returns a
        response with status 200, else raises GatewayError.

        ``timeout`` bounds the whole exchange (the request's deadline); the provider's ``timeoutSeconds``
        the wait for the answer's head and its ``streamIdleTimeoutSeconds`` each wait for more of the body.
        """
        data = body if isinstance(body, bytes) else orjson.dumps(body)
        stats.sent += len(data)
        provider = self.provider
        try:
            resp = await self.client.post(
                data,
                timeout,
                path=None if path is None else self._base_path + path,
                first_byte_timeout=provider.timeout_s,
                idle_timeout=provider.idle_timeout_s,
                extra_headers=extra_headers,
            )
        except _TRANSPORT_ERRORS as exc:
            raise self.unreachable(exc) from None
        if resp.status != 200:
            try:
                payload = await resp.read(self.limits.max_error_body_bytes, "maxErrorBodyBytes")
            except http_client.LimitExceeded:
                payload = b"(an error body larger than limits.restClient.maxErrorBodyBytes)"
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
        """(event name, data) pairs of a Server-Sent Events body; a line or an event's data larger than
        ``limits.max_sse_event_bytes`` ends the stream with a 502 naming the limit."""

        async def lines() -> AsyncIterator[bytes]:
            async for line in resp.lines():
                stats.received += len(line)
                yield line

        try:
            async for event in sse.sse_events(lines(), self.limits.max_sse_event_bytes):
                yield event
        except _TRANSPORT_ERRORS as exc:
            raise self.unreachable(exc) from None
        except sse.EventTooLarge as exc:
            if self.on_limit is not None:
                self.on_limit("restClient.maxSSEEventBytes")
            raise limit_exceeded(self.provider, "restClient.maxSSEEventBytes", str(exc)) from None
        finally:
            resp.close()  # a stream left early (client gone, error event) must not reuse the connection

    async def close(self) -> None:
        await self.client.close()


def _reason(exc: BaseException) -> str:
    """Why a connection failed, without the address (asyncio's messages name it: "Connect call failed
    ('10.0.0.5', 8000)")."""
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed ({exc.reason or type(exc).__name__})"
    if isinstance(exc, http_client.ConnectionLost):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno is not None and exc.errno > 0:
        return os.strerror(exc.errno)
    if isinstance(exc, OSError) and exc.errno is not None and exc.strerror:  # getaddrinfo's EAI_* codes
        return str(exc.strerror)
    return "the connection failed"
