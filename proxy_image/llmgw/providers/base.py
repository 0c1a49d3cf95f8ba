"""What every provider client is: the protocol the gateway calls, and the errors all of them share.

A client turns a ``ChatRequest`` into its provider's own protocol and back. Every failure is raised as
:class:`~llmgw.errors.GatewayError` with ``retryable`` set, so the gateway's retry and fallback logic never
looks at provider-specific errors. Messages name the provider and never contain credentials. Streams skip
chunks without content, so the first chunk a client yields is the first token, which is what "nothing was
sent to the client yet" means for fallback.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncGenerator, Callable
from typing import Protocol

from llmgateway.v1 import llm_service_pb2 as pb
from llmgw.errors import GatewayError, Kind
from llmgw_common.config import Provider

MAX_RELAYED_CHARS = 1000  # of an upstream's error message, kept after redaction
# Told the key of each limit a provider runs into ("restClient.maxSSEEventBytes", "grpcClient.maxMessageBytes").
OnLimit = Callable[[str], None]


@dataclasses.dataclass
class CallStats:
    """Filled in by a client during one call: payload bytes each way, for the metrics."""

    sent: int = 0
    received: int = 0


class ProviderClient(Protocol):
    """``timeout`` is what is left of the request's deadline: it bounds the whole call. The client bounds
    the wait for the answer's first byte by its provider's ``timeout_s`` and each gap within the answer by
    its ``idle_timeout_s`` itself (:func:`timed_out` names the bound that ran out)."""

    provider: Provider
    # Request fields outside the OpenAI API that the provider's own API has (never vendor extras to it).
    native_fields: frozenset[str]

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


def malformed_response(provider: Provider, exc: Exception) -> GatewayError:
    """The provider answered, but not in its protocol's shape."""
    return GatewayError(
        Kind.BAD_GATEWAY,
        f"provider {provider.name!r} sent a malformed response ({type(exc).__name__}: {exc})",
        retryable=True,
        upstream_status=502,
    )


def limit_exceeded(provider: Provider, limit: str, detail: str) -> GatewayError:
    """The provider's answer ran into one of the gateway's bounds (``limit``: its key under ``limits``).

    Retryable, as a malformed response is: each attempt is bounded, and the other path may serve.
    """
    return GatewayError(
        Kind.BAD_GATEWAY,
        f"provider {provider.name!r} sent a response over the gateway's limit: {detail} (limits.{limit})",
        retryable=True,
        upstream_status=502,
    )


def timed_out(provider: Provider, exc: BaseException) -> GatewayError:
    """A bound of time ran out: the answer's first byte (``timeoutSeconds``), a gap within it
    (``streamIdleTimeoutSeconds``) or the request's whole deadline. Retryable (before anything reached the
    client): another attempt, or the other path, may be faster."""
    name = provider.name
    which = getattr(exc, "llmgw_timeout", None) or type(exc).__name__
    if which in ("FirstByteTimeout", "first"):
        message = f"provider {name!r} sent no answer within its timeoutSeconds ({provider.timeout_s:g} s)"
    elif which in ("IdleTimeout", "idle"):
        message = (
            f"provider {name!r} stalled: nothing more of its answer for streamIdleTimeoutSeconds "
            f"({provider.idle_timeout_s:g} s)"
        )
    else:
        message = f"provider {name!r} did not answer in time"
        if "deadline" in str(exc):
            message += " (the request's deadline passed)"
    return GatewayError(Kind.DEADLINE_EXCEEDED, message, retryable=True, upstream_status=504)
