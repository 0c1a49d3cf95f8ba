"""What every kind of fake provider shares: the faults it injects, the reply it generates, a parsed request.

:class:`Faults` says what goes wrong and how slowly things go right; it is validated field by field, so that
``PUT /_fake/faults`` and the command line refuse a bad value with a message naming the field.

:func:`make_reply` is the deterministic answer ("This is a fake reply to: <words of the last user message>"
then filler words) of ``response_tokens`` tokens, where a token is a word plus its following space. It honours
``max_tokens`` (finish "length") and stop sequences (generation stops before the earliest one, which is not
part of the text). Usage counts whitespace-separated words (:func:`count_words`). All kinds answer the same
request with the same text and usage, so tests can compare paths.

This module imports neither grpc nor aiohttp: the command line's options are built from it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any, Final

import orjson

MODEL_CREATED: Final = 1_700_000_000  # a fixed creation time for the model lists
_REPLY_PREFIX: Final = ("This", "is", "a", "fake", "reply", "to:")
_FILLER: Final = (
    *("lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit", "sed", "do", "eiusmod"),
    *("tempor", "incididunt", "ut", "labore", "et", "dolore", "magna", "aliqua"),
)
_TOKEN_RE: Final = re.compile(r"\S+\s?")


# ----------------------------------------------------------------------------------------------- faults


@dataclasses.dataclass
class Faults:
    """What goes wrong, and how slowly things go right. Mutable: changes apply to the next request."""

    latency_ms: float = 0.0  # delay before answering (before headers / first token)
    token_delay_ms: float = 0.0  # delay between streamed tokens
    error_rate: float = 0.0  # probability in [0, 1] that a request fails with error_status
    error_status: int = 500  # HTTP status of injected errors (mapped to a gRPC code for kind grpc)
    fail_next: int = 0  # the next N requests fail with error_status (deterministic; decremented)
    rate_limit_every: int = 0  # every Nth request is answered 429 / RESOURCE_EXHAUSTED with Retry-After
    retry_after_s: float = 1.0  # the Retry-After value sent with rate limiting
    stream_error_after_tokens: int = -1  # >= 0: break a stream after this many tokens (provider-native error)
    stream_stall_after_tokens: int = (
        -1
    )  # >= 0: a stream sends nothing more after this many tokens (held open)

    def update(self, changes: Mapping[str, Any]) -> None:
        """Apply a partial update (all or nothing); raises ValueError naming the first bad field."""
        checked = {name: _check_fault(name, value) for name, value in changes.items()}
        for name, value in checked.items():
            setattr(self, name, value)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_INT_FAULTS: Final[dict[str, tuple[float, float | None]]] = {
    "error_status": (100, 599),
    "fail_next": (0, None),
    "rate_limit_every": (0, None),
    "stream_error_after_tokens": (-1, None),
    "stream_stall_after_tokens": (-1, None),
}
_FLOAT_FAULTS: Final[dict[str, tuple[float, float | None]]] = {
    "latency_ms": (0.0, None),
    "token_delay_ms": (0.0, None),
    "error_rate": (0.0, 1.0),
    "retry_after_s": (0.0, None),
}


def _check_fault(name: str, value: Any) -> int | float:
    if name in _INT_FAULTS:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name}: must be an integer, got {value!r}")
        low, high = _INT_FAULTS[name]
        checked: int | float = value
    elif name in _FLOAT_FAULTS:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"{name}: must be a finite number, got {value!r}")
        low, high = _FLOAT_FAULTS[name]
        checked = float(value)
    else:
        known = ", ".join(f.name for f in dataclasses.fields(Faults))
        raise ValueError(f"{name}: unknown fault (known: {known})")
    if checked < low or (high is not None and checked > high):
        bounds = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name}: {value!r} is out of range {bounds}")
    return checked


def seconds(value: float) -> str:
    """A Retry-After value: "1" for 1.0, "0.25" for 0.25."""
    return f"{value:.3f}".rstrip("0").rstrip(".") or "0"


# ------------------------------------------------------------------------------------------------ reply


@dataclasses.dataclass(frozen=True, slots=True)
class Reply:
    """The generated answer: its text, split into streamed tokens, and why generation stopped."""

    text: str
    tokens: tuple[str, ...]
    finish: str  # "stop" (natural end or stop sequence) or "length" (max_tokens reached)
    stop_sequence: str | None  # the stop sequence that ended generation, if one did
    json_tokens: tuple[bytes, ...]  # each token as a JSON string, for the SSE templates

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)


def make_reply(
    prompt: str, response_tokens: int = 20, max_tokens: int | None = None, stop: Sequence[str] = ()
) -> Reply:
    """The deterministic answer to a last user message ``prompt``; the same for all kinds."""
    words = [*_REPLY_PREFIX, *prompt.split()][:response_tokens]
    while len(words) < response_tokens:
        words.extend(_FILLER[: response_tokens - len(words)])
    finish = "stop"
    if max_tokens is not None and max_tokens < len(words):
        words = words[:max_tokens]
        finish = "length"
    text = " ".join(words)
    tokens = [w + " " for w in words]
    if tokens:
        tokens[-1] = words[-1]
    stop_sequence = None
    cut = -1
    for sequence in stop:
        at = text.find(sequence) if sequence else -1
        if at >= 0 and (cut < 0 or at < cut):
            cut, stop_sequence = at, sequence
    if stop_sequence is not None:
        text = text[:cut]
        tokens = _TOKEN_RE.findall(text)
        finish = "stop"
    return Reply(text, tuple(tokens), finish, stop_sequence, tuple(orjson.dumps(t) for t in tokens))


def count_words(text: str) -> int:
    """Tokens, as the fakes count them for usage: whitespace-separated words."""
    return len(text.split())


def new_id(prefix: str) -> str:
    """A random id with a provider's prefix (``chatcmpl-``, ``req_``)."""
    return prefix + os.urandom(12).hex()


@dataclasses.dataclass(frozen=True, slots=True)
class Chat:
    """What a valid chat request asks for, whatever its wire format."""

    model: str
    prompt: str  # the text of the last user message
    prompt_tokens: int  # the words of all input messages, system prompt included
    max_tokens: int | None
    stop: tuple[str, ...]
    stream: bool = False
    include_usage: bool = False  # OpenAI's stream_options.include_usage
    body: Any = None  # the request's JSON, for the answers that depend on more than the above
