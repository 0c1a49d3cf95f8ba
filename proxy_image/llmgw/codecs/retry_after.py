"""How long an upstream asks us to wait: ``Retry-After`` (seconds or an HTTP date), OpenAI's finer
``retry-after-ms``, and the ``retry-after`` trailer of a gRPC status."""

from __future__ import annotations

import email.utils
import math
import re
import time
from collections.abc import Iterable, Mapping
from typing import Any

# delay-seconds (RFC 9110: 1*DIGIT), and the decimal fractions OpenAI's retry-after-ms may carry; ASCII only
# (float() would also take "1e400", "inf", "-5", "1_000" and other scripts' digits)
_NUMBER = re.compile(r"[0-9]{1,15}(?:\.[0-9]{1,9})?")
MAX_SECONDS = 7 * 86400.0  # a longer wait is no hint a client can use: treated as unreadable


def seconds(value: str | bytes | None, *, unit: float = 1.0) -> float | None:
    """One Retry-After value (``unit`` seconds each, or an HTTP date) as seconds from now, or None when
    absent or unreadable: not a non-negative number or a date, not finite, or more than a week. A date in
    the past is 0."""
    if value is None:
        return None
    text = (value.decode("latin-1") if isinstance(value, bytes) else value).strip()
    if not text:
        return None
    if _NUMBER.fullmatch(text):
        result = float(text) * unit
    else:
        try:
            result = max(0.0, email.utils.parsedate_to_datetime(text).timestamp() - time.time())
        except (TypeError, ValueError, OverflowError, OSError, IndexError):
            return None
    if not math.isfinite(result) or result > MAX_SECONDS:
        return None
    return result


def from_headers(headers: Mapping[str, Any]) -> float | None:
    """Seconds from ``retry-after-ms`` when it is readable, else from ``retry-after``."""
    millis = seconds(headers.get("retry-after-ms"), unit=0.001)
    if millis is not None:
        return millis
    return seconds(headers.get("retry-after"))


def from_trailers(metadata: Iterable[tuple[str, Any]] | None) -> float | None:
    """Seconds from a gRPC status's ``retry-after`` trailer."""
    for key, value in metadata or ():
        if key == "retry-after":
            return seconds(value)
    return None
