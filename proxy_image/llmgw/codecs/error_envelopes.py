"""The human message inside an upstream's error body: OpenAI's and Anthropic's envelopes
(``{"error": {"message": ...}}``), a bare ``{"error": "..."}`` or ``{"message": ...}``."""

from __future__ import annotations

import orjson


def message(body: bytes) -> str | None:
    """The envelope's message, or None when ``body`` is not such an envelope."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(parsed, dict):
        return None
    error = parsed.get("error", parsed)
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    if isinstance(error, str):
        return error
    return None
