"""Keeping secrets out of everything the proxy says: error messages to clients, and its logs.

The secrets are the keys of the configuration: every provider's ``apiKey`` and every client API key. The
gateway registers them when it loads a configuration (:func:`add_secrets`); they stay registered for the
life of the process, so a key rotated out is still hidden in what an old request says. :func:`redact`
replaces each of them, wherever it appears in a text, by ``[redacted]``; :class:`~llmgw.errors.GatewayError`
applies it to every message it carries, and the providers apply it to an upstream's text before they
shorten it (a key cut in two would escape a whole-key match).

:func:`install_log_filter` puts the same redaction on every handler of the root logger (a filter on the
``llmgw`` logger would not see records of other libraries), plus a rule for the value after a credential
header's name (``authorization``, ``x-api-key``), which hides keys the configuration does not know: those
of clients when client auth is off. It also keeps the ``hpack`` loggers at WARNING at any log level: their
DEBUG records print every decoded header, credentials included.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable

REDACTED = "[redacted]"

_lock = threading.Lock()
_secrets: set[str] = set()
_pattern: re.Pattern[str] | None = None

# The value after a credential header's name, as header tuples, "name: value" lines and reprs print it.
_CREDENTIAL_VALUE = re.compile(
    r"""(?i)((?:proxy-)?authorization|x-api-key|api-key)(['"]?\s*[:=,]\s*b?['"]?)((?:bearer|basic)\s+)?"""
    r"""[^\s'",)}\]]+"""
)


def add_secrets(secrets: Iterable[str]) -> None:
    """Register keys to hide from now on (empty strings are ignored)."""
    global _pattern
    with _lock:
        new = {s for s in secrets if s} - _secrets
        if not new:
            return
        _secrets.update(new)
        variants = set(_secrets)
        variants.update(s.replace("/", "\\/") for s in _secrets)  # as a JSON body may escape it
        # Longest first, so that a key containing another is hidden whole.
        _pattern = re.compile("|".join(re.escape(v) for v in sorted(variants, key=len, reverse=True)))


def redact(text: str) -> str:
    """``text`` with every registered secret replaced by ``[redacted]``."""
    pattern = _pattern
    if pattern is None or not text:
        return text
    return pattern.sub(REDACTED, text)


def redact_log_text(text: str) -> str:
    """:func:`redact`, and the value of any credential header written out in ``text``."""
    return _CREDENTIAL_VALUE.sub(lambda m: m.group(1) + m.group(2) + REDACTED, redact(text))


class RedactingFilter(logging.Filter):
    """Rewrites each record's message, exception and stack text through :func:`redact_log_text`."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: let the handler report it as it would
            return True
        cleaned = redact_log_text(message)
        if cleaned != message or record.args:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_log_text(record.exc_text)
        if record.stack_info:
            record.stack_info = redact_log_text(record.stack_info)
        return True


_FILTER = RedactingFilter()


def install_log_filter(logger: logging.Logger | None = None) -> None:
    """Redact every record the handlers of ``logger`` (the root logger by default) write."""
    target = logger or logging.getLogger()
    for handler in target.handlers:
        if _FILTER not in handler.filters:
            handler.addFilter(_FILTER)
    logging.getLogger("hpack").setLevel(logging.WARNING)
