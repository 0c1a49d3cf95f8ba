"""Tool calls in a model's text output, found by the format the model was trained to write them in.

A model that calls a tool writes the call as text in its own format; the OpenAI-compatible API gives
calls apart, as ``tool_calls`` with a name and the arguments' JSON. The parsers here read the formats of
vLLM's ``--tool-call-parser`` under the same names (:data:`TOOL_PARSERS`):

* ``hermes`` (Hermes 2/3, Qwen 2.5 and 3): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``,
  one block per call;
* ``llama3_json`` (Llama 3.1-3.3): the output starts with ``<|python_tag|>`` or ``{`` and is
  ``{"name": ..., "parameters": {...}}`` objects separated by ``;``;
* ``mistral``: ``[TOOL_CALLS]`` then a JSON array of ``{"name", "arguments"}`` objects, or (tokenizer
  v11 and later) ``[TOOL_CALLS]name[ARGS]{...}`` per call.

A parser is fed text deltas and returns events: :class:`ContentDelta` for ordinary text,
:class:`ToolCallStart` once a call's name is known, then :class:`ArgumentsDelta` fragments of its
arguments as they arrive. The arguments are the model's JSON verbatim, so the fragments of a call join to
exactly its final arguments, and each is sent as soon as it is read. Text that may be the beginning of a
marker is held until the next delta says; a call is announced only once its object is seen to be one
(a name, then the arguments key), so ordinary JSON in an answer stays content. Text that turns out not
to be a well-formed call (broken JSON, a missing name) is given back as content, never dropped; a call
already announced when its JSON breaks cannot be withdrawn, so its following text goes out as content.
:meth:`ToolParser.parse` reads a whole output, announcing a call only once its JSON is known valid.

``tool_names``, when given, restricts calls to the tools the request declared: a call to another name is
content (vLLM accepts any name). All buffers grow at most with the text of one call, and each character
is scanned a fixed number of times, so a long output costs linear time.
"""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
import string
from collections.abc import Callable, Collection
from typing import ClassVar

from llmgw.engine._text import partial_marker


@dataclasses.dataclass(frozen=True)
class ContentDelta:
    """Ordinary text of the answer."""

    text: str


@dataclasses.dataclass(frozen=True)
class ToolCallStart:
    """A tool call begins: its position among the choice's calls (from 0), its id, the function's name."""

    index: int
    id: str
    name: str


@dataclasses.dataclass(frozen=True)
class ArgumentsDelta:
    """The next fragment of call ``index``'s arguments JSON."""

    index: int
    text: str


Event = ContentDelta | ToolCallStart | ArgumentsDelta


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """One whole call: ``arguments`` is a JSON text (an object)."""

    id: str
    name: str
    arguments: str


def openai_call_id() -> str:
    """A tool call id in OpenAI's shape (``call_`` and 24 random characters)."""
    return "call_" + secrets.token_hex(12)


def mistral_call_id() -> str:
    """Nine letters and digits: Mistral's chat templates refuse any other tool call id when the
    conversation comes back with the call's result."""
    return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))


_WHITESPACE = " \t\r\n"
_MAX_GAP = 256  # whitespace held between a format's parts (a marker and what it opens) before giving up
_STRING_SPECIAL = re.compile(r'["\\]')
_NESTED_SPECIAL = re.compile(r'[{}\[\]"]')
_PRIMITIVE_END = re.compile(r"[,}\]\s]")


class _CallScanner:
    """One call object, ``{"name": "...", "arguments": {...}}``, scanned as its characters arrive.

    It follows the object's structure (keys, strings, nesting) without building values, keeps the text
    of the name and of the arguments, and stops at the closing brace (``done``) or at the first character
    that cannot belong to the object (``error``). Full JSON validity is checked at the end, on the whole
    object. With ``name`` given it scans only an arguments value (Mistral's ``name[ARGS]{...}``).
    """

    def __init__(
        self, argument_keys: Collection[str], name: str | None = None, *, arguments_required: bool = False
    ) -> None:
        self._argument_keys = argument_keys
        self._arguments_required = arguments_required
        self._arguments_only = name is not None
        self.name: str | None = name
        self.raw: list[str] = []  # every character consumed
        self.arguments_open = False
        self.arguments_kind = ""  # the arguments value's first character: "{" is streamed as it comes
        self.arguments: str | None = None  # once the arguments value is complete
        self.arguments_end: int | None = None  # where the arguments value ends in the raw text
        self._consumed = 0
        self._unsent: list[str] = []  # "{" arguments text not yet taken by take_arguments
        self.done = False
        self.error: str | None = None
        self._state = "value" if self._arguments_only else "start"
        self._key = ""
        self._target = ""  # what the current value is: "name", "arguments" or "" (ignored)
        self._capture: list[str] | None = None
        self._capture_from = 0
        self._nesting = 0
        self._in_string = False
        self._escaped = False

    def take_arguments(self) -> str:
        """The streamable arguments text read since the last call."""
        text = "".join(self._unsent)
        self._unsent.clear()
        return text

    def feed(self, text: str) -> int:
        """Consume ``text`` up to the object's end or a wrong character; the count consumed."""
        i = self._scan(text)
        if self._capture is not None:
            self._keep(text[self._capture_from : i])
            self._capture_from = 0
        self.raw.append(text[:i])
        self._consumed += i
        return i

    def _keep(self, piece: str) -> None:
        assert self._capture is not None
        self._capture.append(piece)
        if self._target == "arguments" and self.arguments_kind == "{":
            self._unsent.append(piece)

    def _scan(self, text: str) -> int:
        i, n = 0, len(text)
        while i < n and not self.done and self.error is None:
            state, c = self._state, text[i]
            if state in ("start", "key_or_end", "colon", "value", "after") and c in _WHITESPACE:
                i += 1
            elif state == "start":
                if c != "{":
                    self.error = "a tool call is not a JSON object"
                    break
                self._state = "key_or_end"
                i += 1
            elif state == "key_or_end":
                if c == '"':
                    self._state, self._key, self._escaped = "key", "", False
                    self._start_capture(i + 1)
                    i += 1
                elif c == "}":
                    self._close()
                    i += 1
                else:
                    self.error = f"unexpected {c!r} where a key was expected"
            elif state in ("key", "string"):
                i = self._scan_string(text, i)
            elif state == "colon":
                if c != ":":
                    self.error = f"unexpected {c!r} where ':' was expected"
                    break
                self._state = "value"
                i += 1
            elif state == "value":
                self._start_value(c, i)
                i += 1 if self._state != "primitive" else 0
            elif state == "nested":
                i = self._scan_nested(text, i)
            elif state == "primitive":
                found = _PRIMITIVE_END.search(text, i)
                if found is None:
                    i = n
                else:
                    i = found.start()
                    self._end_value(text, i)
            elif state == "after":
                if c == ",":
                    self._state = "key_or_end"
                elif c == "}":
                    self._close()
                else:
                    self.error = f"unexpected {c!r} after a value"
                    break
                i += 1
        return i

    def _scan_string(self, text: str, i: int) -> int:
        """In a key or a string value: up to and past its closing quote."""
        n = len(text)
        while i < n:
            if self._escaped:
                self._escaped = False
                i += 1
                continue
            found = _STRING_SPECIAL.search(text, i)
            if found is None:
                return n
            i = found.start()
            if text[i] == "\\":
                self._escaped = True
                i += 1
                continue
            if self._state == "key":
                self._key = self._end_capture(text, i)
                self._state = "colon"
            else:
                self._end_value(text, i + 1)
            return i + 1
        return n

    def _scan_nested(self, text: str, i: int) -> int:
        """In an object or array value: up to and past its closing bracket."""
        n = len(text)
        while i < n:
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                    i += 1
                    continue
                found = _STRING_SPECIAL.search(text, i)
                if found is None:
                    return n
                i = found.start()
                if text[i] == "\\":
                    self._escaped = True
                else:
                    self._in_string = False
                i += 1
                continue
            found = _NESTED_SPECIAL.search(text, i)
            if found is None:
                return n
            i = found.start()
            c = text[i]
            if c == '"':
                self._in_string = True
            elif c in "{[":
                self._nesting += 1
            else:
                self._nesting -= 1
                if self._nesting == 0:
                    self._end_value(text, i + 1)
                    return i + 1
            i += 1
        return n

    def _start_value(self, c: str, i: int) -> None:
        if self._arguments_only:
            self._target = "arguments"
        elif self._key == "name":
            self._target = "name"
        elif self._key in self._argument_keys and self.arguments is None and not self.arguments_open:
            self._target = "arguments"
        else:
            self._target = ""
        if self._target == "arguments":
            self.arguments_open, self.arguments_kind = True, c
        self._start_capture(i)
        if c == '"':
            self._state, self._escaped = "string", False
        elif c in "{[":
            self._state, self._nesting, self._in_string, self._escaped = "nested", 1, False, False
        else:
            self._state = "primitive"

    def _end_value(self, text: str, end: int) -> None:
        value = self._end_capture(text, end)
        self._state = "after"
        if self._target == "name":
            try:
                name = json.loads(value)
            except ValueError:
                name = None
            if not isinstance(name, str) or not name:
                self.error = "the tool call's name is not a string"
            elif self.name is None:
                self.name = name
        elif self._target == "arguments":
            self._end_arguments(value)
            self.arguments_end = self._consumed + end
        self._target = ""
        if self._arguments_only and self.error is None:
            self._close()

    def _end_arguments(self, value: str) -> None:
        if self.arguments_kind == "{":
            self.arguments = value
        elif self.arguments_kind == '"':  # arguments written as a JSON string holding the JSON
            try:
                self.arguments = str(json.loads(value))
            except ValueError:
                self.error = "the tool call's arguments are a broken string"
        else:
            self.error = "the tool call's arguments are not a JSON object"

    def _close(self) -> None:
        self.done = True
        self._state = "done"
        if self.name is None:
            self.error = "the object has no tool name"
        elif self.arguments is None and self._arguments_required:
            self.error = "the object has no arguments"
        elif self.arguments is None:
            self.arguments = "{}"  # a call without arguments, as vLLM reads it

    def _start_capture(self, at: int) -> None:
        self._capture, self._capture_from = [], at

    def _end_capture(self, text: str, end: int) -> str:
        self._keep(text[self._capture_from : end])
        value = "".join(self._capture or ())
        self._capture = None
        return value


class ToolParser:
    """Reads one choice's tool calls from its text: :meth:`feed` each delta, :meth:`finish` at the end.

    ``stream_arguments=False`` announces each call only once it is complete and valid (what
    :meth:`parse` uses). ``new_id`` makes the calls' ids.
    """

    name: ClassVar[str]
    argument_keys: ClassVar[tuple[str, ...]] = ("arguments",)
    # A call object must have its arguments key: where a call is bare JSON, {"name": ...} alone may be
    # an answer.
    arguments_required: ClassVar[bool] = False
    # The format's markers are special tokens: the detokenizer must keep them (skip_special_tokens=False).
    needs_special_tokens: ClassVar[bool] = False
    default_id: ClassVar[Callable[[], str]] = staticmethod(openai_call_id)

    def __init__(
        self,
        *,
        tool_names: Collection[str] | None = None,
        stream_arguments: bool = True,
        new_id: Callable[[], str] | None = None,
    ) -> None:
        self._tool_names = None if tool_names is None else frozenset(tool_names)
        self._stream_arguments = stream_arguments
        self._new_id = new_id or type(self).default_id
        self._buffer = ""  # text received and not yet consumed: a held marker prefix, at most one delta
        self._events: list[Event] = []
        self._calls = 0
        self._call: _CallScanner | None = None
        self._call_prefix = ""  # the marker text before the call, given back with it if it is no call
        self._call_started = False
        self._call_id: str | None = None
        self._after_call = False  # whitespace after a call is not content

    @classmethod
    def parse(
        cls, text: str, *, tool_names: Collection[str] | None = None, new_id: Callable[[], str] | None = None
    ) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of a whole output: content is None when empty (or only whitespace around
        calls)."""
        parser = cls(tool_names=tool_names, stream_arguments=False, new_id=new_id)
        events = parser.feed(text) + parser.finish()
        content = "".join(e.text for e in events if isinstance(e, ContentDelta))
        starts = [e for e in events if isinstance(e, ToolCallStart)]
        arguments = [
            "".join(e.text for e in events if isinstance(e, ArgumentsDelta) and e.index == s.index)
            for s in starts
        ]
        calls = [ToolCall(s.id, s.name, a) for s, a in zip(starts, arguments, strict=True)]
        if not content or (calls and not content.strip()):
            return None, calls
        return content, calls

    def feed(self, delta: str) -> list[Event]:
        """The events ``delta`` makes certain."""
        self._buffer += delta
        self._step(final=False)
        return self._take_events()

    def finish(self) -> list[Event]:
        """The events of what is still held, at the end of the output."""
        self._step(final=True)
        if self._buffer:
            self._content(self._buffer)
            self._buffer = ""
        return self._take_events()

    def _step(self, *, final: bool) -> None:
        raise NotImplementedError

    def _take_events(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    def _content(self, text: str) -> None:
        if self._after_call:
            text = text.lstrip()
            if not text:
                return
            self._after_call = False
        if text:
            if self._events and isinstance(self._events[-1], ContentDelta):
                self._events[-1] = ContentDelta(self._events[-1].text + text)
            else:
                self._events.append(ContentDelta(text))

    def _content_until(self, marker: str, *, final: bool) -> bool:
        """Send the buffer as content up to ``marker`` and consume the marker: whether it was found. Without
        it, all is sent but an end that may begin the marker."""
        at = self._buffer.find(marker)
        if at >= 0:
            self._content(self._buffer[:at])
            self._buffer = self._buffer[at + len(marker) :]
            return True
        keep = 0 if final else partial_marker(self._buffer, marker)
        self._content(self._buffer[: len(self._buffer) - keep])
        self._buffer = self._buffer[len(self._buffer) - keep :]
        return False

    def _begin_call(self, prefix: str, name: str | None = None, call_id: str | None = None) -> None:
        self._call = _CallScanner(self.argument_keys, name, arguments_required=self.arguments_required)
        self._call_prefix = prefix
        self._call_id = call_id  # an id the model wrote itself
        self._call_started = False

    def _continue_call(self, *, final: bool) -> str:
        """Feed the buffer to the current call: ``"open"`` (it needs more), ``"done"``, or ``"no call"``
        (its text was given back as content; the buffer holds what follows)."""
        call = self._call
        assert call is not None
        consumed = call.feed(self._buffer)
        self._buffer = self._buffer[consumed:]
        if call.error is not None or (final and not call.done):
            return self._end_broken_call(call)
        if self._call_started:
            self._send_arguments(call.take_arguments())
        elif call.name is not None and (call.done or (self._stream_arguments and call.arguments_kind == "{")):
            if self._tool_names is not None and call.name not in self._tool_names:
                return self._end_broken_call(call) if call.done else "open"
            if call.done and not _valid_call(call):  # whole before it was announced: checked first
                return self._end_broken_call(call)
            self._events.append(ToolCallStart(self._calls, self._call_id or self._new_id(), call.name))
            self._call_started = True
            self._send_arguments(call.take_arguments())
        if not call.done:
            return "open"
        if call.arguments_kind != "{":  # a string or absent: the arguments are known only now
            self._send_arguments(call.arguments or "")
        self._call = None
        self._calls += 1
        self._after_call = True
        return "done"

    def _end_broken_call(self, call: _CallScanner) -> str:
        self._call = None
        raw = "".join(call.raw)
        if self._call_started:
            # Announced already, its arguments sent: the call stands as it is, and the object's text after
            # its arguments (up to the break) is ordinary text.
            self._send_arguments(call.take_arguments())
            self._calls += 1
            if call.arguments_end is not None:
                self._content(raw[call.arguments_end :])
            return "no call"
        self._content(self._call_prefix + raw)
        return "no call"

    def _send_arguments(self, text: str) -> None:
        if text:
            self._events.append(ArgumentsDelta(self._calls, text))


def _valid_call(call: _CallScanner) -> bool:
    try:
        json.loads("".join(call.raw))
        json.loads(call.arguments or "{}")
    except ValueError:
        return False
    return True


class HermesToolParser(ToolParser):
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks, text around them content."""

    name = "hermes"
    open_tag = "<tool_call>"
    close_tag = "</tool_call>"

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._state = "content"

    def _step(self, *, final: bool) -> None:
        while True:
            if self._state == "content":
                if not self._content_until(self.open_tag, final=final):
                    return
                self._begin_call(self.open_tag)
                self._state = "call"
            elif self._state == "call":
                outcome = self._continue_call(final=final)
                if outcome == "open":
                    return
                self._state = "close" if outcome == "done" else "content"
            else:  # after a call's object: its closing tag, which a model sometimes leaves out
                rest = self._buffer.lstrip()
                if rest.startswith(self.close_tag):
                    self._buffer = rest[len(self.close_tag) :]
                elif not final and self.close_tag.startswith(rest):
                    self._buffer = rest
                    return
                else:
                    self._buffer = rest
                self._state = "content"


class Llama3JsonToolParser(ToolParser):
    """Llama 3's JSON calls: an output that starts with ``<|python_tag|>`` or ``{`` holds call objects
    separated by ``;``; any other output is content."""

    name = "llama3_json"
    argument_keys = ("parameters", "arguments")
    arguments_required = True
    needs_special_tokens = True  # <|python_tag|>
    python_tag = "<|python_tag|>"

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._state = "start"

    def _step(self, *, final: bool) -> None:
        while True:
            if self._state == "start":
                rest = self._buffer.lstrip()
                lead = self._buffer[: len(self._buffer) - len(rest)]
                if rest.startswith(self.python_tag):
                    self._buffer = rest[len(self.python_tag) :]
                    self._begin_call(lead + self.python_tag)
                    self._state = "call"
                elif rest.startswith("{"):
                    self._buffer = rest
                    self._begin_call(lead)
                    self._state = "call"
                elif not final and self.python_tag.startswith(rest) and len(lead) < 256:
                    return
                else:
                    self._state = "text"
            elif self._state == "text":
                self._content(self._buffer)
                self._buffer = ""
                return
            elif self._state == "call":
                outcome = self._continue_call(final=final)
                if outcome == "open":
                    return
                self._state = "between" if outcome == "done" else "text"
            else:  # between calls: "; {" goes on, anything else is content
                rest = self._buffer.lstrip()
                if rest.startswith(";"):
                    after = rest[1:].lstrip()
                    if after.startswith("{"):
                        self._buffer = after
                        self._begin_call(rest[: len(rest) - len(after)])
                        self._state = "call"
                        continue
                    if not after and not final and len(rest) <= _MAX_GAP:
                        self._buffer = rest
                        return
                elif not rest and not final:
                    self._buffer = ""
                    return
                self._buffer = rest
                self._state = "text"


class MistralToolParser(ToolParser):
    """``[TOOL_CALLS]`` then a JSON array of calls, or ``[TOOL_CALLS]name[ARGS]{...}`` per call (with
    ``[CALL_ID]id`` before ``[ARGS]`` in newer tokenizers)."""

    name = "mistral"
    needs_special_tokens = True  # [TOOL_CALLS], [ARGS]
    default_id = staticmethod(mistral_call_id)
    calls_tag = "[TOOL_CALLS]"
    args_tag = "[ARGS]"
    call_id_tag = "[CALL_ID]"  # tokenizer v13: name[CALL_ID]id[ARGS]{...}, the id written by the model
    max_name_chars = 256
    _NAME = re.compile(r"[A-Za-z0-9_.\-]+")
    _ID = re.compile(r"[A-Za-z0-9_\-]{1,64}")

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._state = "content"
        self._opening = ""
        self._first_element = True

    def _step(self, *, final: bool) -> None:
        while True:
            if self._state == "content":
                if not self._content_until(self.calls_tag, final=final):
                    return
                self._state = "after_tag"
            elif self._state == "after_tag":
                rest = self._buffer.lstrip()
                if not rest and not final and len(self._buffer) <= _MAX_GAP:
                    return
                # What the marker opened, given back with a call that turns out broken.
                self._opening = self.calls_tag + self._buffer[: len(self._buffer) - len(rest)]
                if rest.startswith("["):
                    self._buffer = rest[1:]
                    self._opening += "["
                    self._first_element = True
                    self._state = "array"
                elif rest.startswith("{"):
                    self._buffer = rest
                    self._begin_call(self._opening)
                    self._state = "single"
                else:
                    self._state = "name"
            elif self._state == "array":  # before an element, or the end of the array
                rest = self._buffer.lstrip()
                if not rest and not final:
                    self._buffer = ""  # whitespace between elements is nobody's text
                    return
                self._buffer = rest
                if rest.startswith("{"):
                    self._begin_call(self._opening if self._first_element else "")
                    self._first_element = False
                    self._state = "element"
                else:
                    if rest.startswith("]"):
                        self._buffer = rest[1:]
                    elif self._first_element:
                        self._content(self._opening)
                    self._state = "content"
            elif self._state in ("element", "single", "arguments"):
                outcome = self._continue_call(final=final)
                if outcome == "open":
                    return
                if outcome == "done" and self._state == "element":
                    self._state = "array_next"
                else:
                    self._state = "content"
            elif self._state == "array_next":
                rest = self._buffer.lstrip()
                if not rest and not final:
                    self._buffer = ""
                    return
                if rest.startswith(","):
                    self._buffer = rest[1:]
                    self._state = "array"
                else:
                    self._buffer = rest[1:] if rest.startswith("]") else rest
                    self._state = "content"
            else:  # the function's name, up to [ARGS]
                at = self._buffer.find(self.args_tag)
                if at < 0 and not final and len(self._buffer) <= self.max_name_chars:
                    return
                name, has_id, call_id = self._buffer[: max(at, 0)].partition(self.call_id_tag)
                name, call_id = name.strip(), call_id.strip()
                if not self._NAME.fullmatch(name) or (has_id and not self._ID.fullmatch(call_id)):
                    self._content(self.calls_tag)  # not a call: the rest is read again as content
                    self._state = "content"
                    continue
                prefix = self.calls_tag + self._buffer[: at + len(self.args_tag)]
                self._buffer = self._buffer[at + len(self.args_tag) :]
                self._begin_call(prefix, name, call_id or None)
                self._state = "arguments"


# Parsers by the names of vLLM's --tool-call-parser (Llama 4's JSON calls are Llama 3's).
TOOL_PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesToolParser,
    "llama3_json": Llama3JsonToolParser,
    "llama4_json": Llama3JsonToolParser,
    "mistral": MistralToolParser,
}


def tool_parser(
    name: str, *, tool_names: Collection[str] | None = None, stream_arguments: bool = True
) -> ToolParser:
    """A new parser of the format ``name`` for one choice."""
    try:
        parser = TOOL_PARSERS[name]
    except KeyError:
        raise ValueError(f"unknown tool parser {name!r}; known: {', '.join(sorted(TOOL_PARSERS))}") from None
    return parser(tool_names=tool_names, stream_arguments=stream_arguments)
