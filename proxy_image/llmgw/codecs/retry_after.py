"""How long an upstream asks us to wait: ``Retry-After`` (seconds or an HTTP date), OpenAI's finer
``retry-after-ms``, and the ``retry-after`` trailer of a gRPC status."""

from __future__ import annotations

import email.utils
import math
import time
from collections.abc import Iterable, Mapping
from typing import Any


def seconds(value: str | bytes | None) -> float | None:
    """One Retry-After value as seconds from now (never negative), or None when absent or unreadable."""
    if value is None:
        return None
    text = (value.decode("latin-1") if isinstance(value, bytes) else value).strip()
    if not text:
        return None
    try:
        result = float(text)
    except ValueError:
        try:
            result = email.utils.parsedate_to_datetime(text).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    if not math.isfinite(result):
        return None
    return max(0.0, result)


def from_headers(headers: Mapping[str, Any]) -> float | None:
    """Seconds from ``retry-after-ms`` when it is readable, else from ``retry-after``."""
    millis = seconds(headers.get("retry-after-ms"))
    if millis is not None:
        return millis / 1000.0
    return seconds(headers.get("retry-after"))


def from_trailers(metadata: Iterable[tuple[str, Any]] | None) -> float | None:
    """Seconds from a gRPC status's ``retry-after`` trailer."""
    for key, value in metadata or ():
        if key == "retry-after":
            return seconds(value)
    return None
