"""Retry timing shared by the proxy and the client library: exponential backoff with full jitter."""

from __future__ import annotations

import math
import random


def backoff_delay(
    attempt: int, *, base: float, cap: float, retry_after: float | None, rng: random.Random
) -> float:
    """Seconds to wait before attempt ``attempt + 1`` (``attempt`` counts from 1).

    Full jitter (a uniform draw up to ``base * 2**(attempt-1)``, capped at ``cap``) spreads the retries of
    many clients; an upstream's Retry-After is a floor, since retrying earlier would be refused again.
    """
    exponent = min(max(attempt, 1) - 1, 60)  # 2**60 * base is past any cap; avoids float overflow
    delay = rng.uniform(0.0, min(cap, base * 2.0**exponent))
    if retry_after is not None and math.isfinite(retry_after):
        delay = max(delay, retry_after)
    return delay
