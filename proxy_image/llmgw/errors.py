"""One error type for everything the gateway refuses or fails at, and its mapping to both wire protocols.

Handlers raise :class:`GatewayError`; the gRPC front turns it into a status code, the REST front into an
HTTP status and an OpenAI-style error body. Keeping the mapping in one table means a refusal reads the
same on both fronts.
"""

from __future__ import annotations

import enum

import grpc

from llmgw.redact import redact


class Kind(enum.Enum):
    """What went wrong, independent of the protocol that reports it."""

    INVALID_ARGUMENT = (grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error")
    UNAUTHENTICATED = (grpc.StatusCode.UNAUTHENTICATED, 401, "authentication_error")
    PERMISSION_DENIED = (grpc.StatusCode.PERMISSION_DENIED, 403, "permission_error")
    NOT_FOUND = (grpc.StatusCode.NOT_FOUND, 404, "not_found_error")
    PAYLOAD_TOO_LARGE = (grpc.StatusCode.RESOURCE_EXHAUSTED, 413, "request_too_large")
    RESOURCE_EXHAUSTED = (grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error")
    CANCELLED = (grpc.StatusCode.CANCELLED, 499, "cancelled")
    INTERNAL = (grpc.StatusCode.INTERNAL, 500, "api_error")
    BAD_GATEWAY = (grpc.StatusCode.UNAVAILABLE, 502, "upstream_error")
    UNAVAILABLE = (grpc.StatusCode.UNAVAILABLE, 503, "overloaded_error")
    DEADLINE_EXCEEDED = (grpc.StatusCode.DEADLINE_EXCEEDED, 504, "timeout_error")

    @property
    def grpc_code(self) -> grpc.StatusCode:
        return self.value[0]

    @property
    def http_status(self) -> int:
        return self.value[1]

    @property
    def error_type(self) -> str:
        return self.value[2]


class GatewayError(Exception):
    """A failure with a message a person can act on.

    ``retryable`` says whether another attempt (a retry, or the other path) may succeed;
    ``retry_after`` carries an upstream's Retry-After hint in seconds. The message never holds a
    configured key: each is replaced by ``[redacted]`` (:mod:`llmgw.redact`), since messages reach clients
    and logs and may quote an upstream's text.
    """

    def __init__(
        self,
        kind: Kind,
        message: str,
        *,
        retryable: bool = False,
        retry_after: float | None = None,
        upstream_status: int | None = None,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        message = redact(message)
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.retryable = retryable
        self.retry_after = retry_after
        self.upstream_status = upstream_status
        self.param = (
            redact(param) if param else None
        )  # OpenAI's error param and code, as an upstream gave them
        self.code = redact(code) if code else None

    @property
    def status_label(self) -> str:
        """The HTTP-style status used as the ``code`` metric label."""
        return str(self.upstream_status or self.kind.http_status)


_HTTP_TO_KIND = {
    400: Kind.INVALID_ARGUMENT,
    401: Kind.UNAUTHENTICATED,
    403: Kind.PERMISSION_DENIED,
    404: Kind.NOT_FOUND,
    408: Kind.DEADLINE_EXCEEDED,
    413: Kind.PAYLOAD_TOO_LARGE,
    422: Kind.INVALID_ARGUMENT,
    429: Kind.RESOURCE_EXHAUSTED,
    499: Kind.CANCELLED,
    504: Kind.DEADLINE_EXCEEDED,
}

_GRPC_TO_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
}

# Upstream answers worth another attempt: rate limits, overload and server-side failures.
RETRYABLE_HTTP = frozenset({408, 409, 429, 500, 502, 503, 504, 529})


def from_upstream_http(
    status: int,
    message: str,
    retry_after: float | None = None,
    param: str | None = None,
    code: str | None = None,
) -> GatewayError:
    """The error for an upstream REST provider that answered ``status`` (``param`` and ``code``: its error
    envelope's, relayed to clients for a request error)."""
    kind = _HTTP_TO_KIND.get(status, Kind.BAD_GATEWAY if status >= 500 else Kind.INVALID_ARGUMENT)
    if status in (401, 403):
        # The client did nothing wrong: our provider credentials are bad. Say so without echoing them.
        kind = Kind.BAD_GATEWAY
    relayed = 400 <= status < 500 and status not in (401, 403)
    return GatewayError(
        kind,
        message,
        retryable=status in RETRYABLE_HTTP,
        retry_after=retry_after,
        upstream_status=status,
        param=param if relayed else None,
        code=code if relayed else None,
    )


def from_upstream_grpc(code: grpc.StatusCode, message: str, retry_after: float | None = None) -> GatewayError:
    """The error for an upstream gRPC provider that ended a call with ``code``."""
    return from_upstream_http(_GRPC_TO_HTTP.get(code, 502), message, retry_after)
