"""The human message inside an upstream's error body: OpenAI's and Anthropic's envelopes
(``{"error": {"message": ...}}``), a bare ``{"error": "..."}`` or ``{"message": ...}``; and OpenAI's
``param`` and ``code``, which clients act on (``context_length_exceeded``)."""

from __future__ import annotations

import orjson

_MAX_FIELD_CHARS = 128  # of a param or code relayed


def _error(body: bytes) -> object:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(parsed, dict):
        return None
    return parsed.get("error", parsed)


def message(body: bytes) -> str | None:
    """The envelope's message, or None when ``body`` is not such an envelope."""
    error = _error(body)
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    if isinstance(error, str):
        return error
    return None


def param_and_code(body: bytes) -> tuple[str | None, str | None]:
    """OpenAI's ``param`` and ``code`` of the envelope (a number code as text), each None when absent."""
    error = _error(body)
    if not isinstance(error, dict):
        return None, None
    found: list[str | None] = []
    for key in ("param", "code"):
        value = error.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        found.append(value[:_MAX_FIELD_CHARS] if isinstance(value, str) and value else None)
    return found[0], found[1]
