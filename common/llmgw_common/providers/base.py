"""What every provider type declares, and the checks the REST types share."""

from __future__ import annotations

import dataclasses
import urllib.parse
from collections.abc import Callable
from typing import Any

from llmgw_common.reader import ConfigError, Reader, check_listen_address


@dataclasses.dataclass(frozen=True)
class ProviderType:
    """One provider type: the member that selects it in a provider entry, the side of the REST/gRPC split
    it serves (``rest`` or ``grpc``), and the parser of its member's settings."""

    name: str
    path: str
    parse: Callable[[Reader], Any]
    summary: str


def base_url(r: Reader) -> str:
    """The REST API's base URL, without a trailing slash."""
    value: str = r.get("baseURL", str, required=True)
    if not value.startswith(("http://", "https://")):
        raise ConfigError(f"{r.path('baseURL')}: must start with http:// or https://, got {value!r}")
    try:
        parts = urllib.parse.urlsplit(value)
        parts.port  # noqa: B018  (raises for a port that is not a number from 0 to 65535)
    except (
        ValueError
    ) as exc:  # "Invalid IPv6 URL", "Port out of range", ...: not echoed (may hold a password)
        raise ConfigError(f"{r.path('baseURL')}: not a valid URL ({exc})") from None
    if not parts.hostname:
        raise ConfigError(f"{r.path('baseURL')}: names no host")
    if "@" in parts.netloc:
        # Not echoed: the part before '@' is a password.
        raise ConfigError(
            f"{r.path('baseURL')}: credentials belong in apiKey (apiKeySecretRef in an LLMGateway), "
            "not in the URL (no user:password@)"
        )
    return value.rstrip("/")


def target(r: Reader) -> str:
    """A gRPC server's HOST:PORT."""
    value: str = r.get("target", str, required=True)
    host, _ = check_listen_address(value, r.path("target"))
    if any(c in host for c in "/@ \t"):  # a URL (grpc://, http://) or credentials: not a HOST:PORT
        # Not echoed: the part before '@' would be a password.
        raise ConfigError(f"{r.path('target')}: must be HOST:PORT, without a scheme, a path or credentials")
    return value


def max_connections(r: Reader) -> int:
    return r.integer("maxConnections", 256)
