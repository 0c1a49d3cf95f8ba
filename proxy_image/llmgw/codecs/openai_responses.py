"""OpenAI's Responses API (``POST /v1/responses``) over the Chat Completions API, as vLLM's OpenAI server and
the SMG router serve it on top of their chat logic: a Responses request becomes the chat request the gateway's
chat path serves, and that path's answer (its chunks, as they come) a Response object or the API's events.

* **request** (:func:`chat_request`): ``input`` (a string: one user message; or a list of items) becomes
  ``messages``, ``instructions`` a system message first. Message items keep their role; their parts
  (``input_text``, ``input_image`` by URL, an assistant's ``output_text`` and ``refusal``) become chat parts.
  An assistant turn is the items of one answer, in the order the API gives them: a ``reasoning`` item (its
  ``reasoning_content``, which the model's template renders or not), an assistant ``message`` (its
  ``content``), ``function_call`` items (its ``tool_calls``); a ``function_call_output`` is a tool message.
  Function tools, flattened in the Responses API, are nested as chat's; ``tool_choice``, ``text.format``
  (``response_format``), ``max_output_tokens``, ``top_logprobs`` with ``include``
  ``message.output_text.logprobs``, ``reasoning.effort`` and the bookkeeping fields (``metadata``, ``user``,
  ...) are carried under their chat names, and so are the ``native`` fields of the server behind (vLLM's
  ``top_k``, ``chat_template_kwargs``, ...). The gateway keeps no state, so what needs some is refused (400,
  naming the field, as is any field the API does not have): ``previous_response_id``, ``conversation``,
  ``background``, a stored ``prompt``, ``item_reference`` items; so is what the server cannot do: OpenAI's
  built-in tools, file inputs, encrypted reasoning, ``truncation: "auto"``, any other ``include``. ``store``
  is accepted, and the Response says ``"store": false``.
* **answer** (:class:`ResponseWriter`): the chat chunks in order become output items: reasoning a
  ``reasoning`` item (its text as ``reasoning_text`` content, no summary), text a ``message`` with one
  ``output_text`` part (when asked, the logprobs of the chunks that carry its text), each tool call a
  ``function_call`` item; a new item opens when the kind changes. Text that is only whitespace waits for
  more: the chat path drops it when the answer calls tools, and so does the writer. A choice cut by its
  token limit makes the Response (and its last item) ``incomplete``, reason ``max_output_tokens``. Events,
  each with its ``sequence_number``: ``response.created``, ``response.in_progress``; per item
  ``response.output_item.added``, then its deltas (``response.reasoning_text.delta``; a message's
  ``response.content_part.added`` and ``response.output_text.delta``; ``response.function_call_arguments.delta``),
  their ``.done``, ``response.output_item.done``; last ``response.completed`` (or ``response.incomplete``)
  with the whole Response and its usage. A unary answer is the same writer's Response, so the two agree.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping
from typing import Any

import orjson

from llmgateway.v1 import llm_service_pb2 as pb
from llmgw.chat import clip, invalid

LOGPROBS_INCLUDE = "message.output_text.logprobs"
# Fields carried to the chat request under the same name (the chat path checks their values).
_SAME_NAME = (
    "temperature", "top_p", "parallel_tool_calls", "metadata", "user", "safety_identifier", "prompt_cache_key",
    "prompt_cache_retention", "prompt_cache_options", "service_tier",
)  # fmt: skip
# Fields read below.
_READ = frozenset(
    {
        "model", "input", "instructions", "max_output_tokens", "tools", "tool_choice", "text", "top_logprobs",
        "include", "stream", "stream_options", "reasoning", "store", "truncation", "background",
    }
)  # fmt: skip
# Fields of the API that ask for what the gateway does not keep or the server does not do: why, by field.
_REFUSED = {
    "previous_response_id": "the gateway keeps no responses: send the whole conversation as input",
    "conversation": "the gateway keeps no conversations: send the whole conversation as input",
    "prompt": "stored prompts are kept by OpenAI, not by the gateway: send instructions and input",
    "max_tool_calls": "the inference engine cannot bound the number of tool calls",
}
_BUILT_IN_TOOLS = (
    "OpenAI's built-in tools run on OpenAI's side; the inference engine calls function tools only"
)
_TOOL_KEYS = frozenset({"type", "name", "description", "parameters", "strict"})
_REASONING_KEYS = frozenset({"effort", "summary", "generate_summary"})
_ASSISTANT = "assistant"


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise invalid(message)


# -- the request ------------------------------------------------------------------------------------------


def chat_request(body: Mapping[str, Any], *, provider: str, native: frozenset[str]) -> dict[str, Any]:
    """The chat request (OpenAI's JSON) that serves the Responses request ``body``; a GatewayError (400)
    naming the field that cannot be served by ``provider``."""
    for key, value in body.items():
        if value is None or key in _READ or key in _SAME_NAME or key in native:
            continue
        reason = _REFUSED.get(key)
        if reason is not None:
            raise invalid(f"{key}: {reason}")
        raise invalid(f"{clip(key)}: not a field provider {provider!r} can serve in the Responses API")
    if body.get("background") not in (None, False):
        raise invalid(
            "background: the gateway answers on the request's own connection and keeps no response to poll"
        )
    if body.get("truncation") not in (None, "disabled"):
        raise invalid(
            f"truncation: provider {provider!r} does not cut a conversation to fit the model's context: send "
            '"disabled" and a shorter input'
        )
    _check(body.get("store") is None or isinstance(body["store"], bool), "store: must be true or false")
    chat: dict[str, Any] = {"model": body.get("model"), "messages": _messages(body, provider)}
    chat.update((key, body[key]) for key in _SAME_NAME if body.get(key) is not None)
    chat.update((key, value) for key, value in body.items() if key in native and value is not None)
    max_tokens = body.get("max_output_tokens")
    if max_tokens is not None:
        _check(type(max_tokens) is int and max_tokens >= 1, "max_output_tokens: must be a positive integer")
        chat["max_completion_tokens"] = max_tokens
    tools = [_tool(tool, f"tools[{i}]") for i, tool in enumerate(_list(body.get("tools"), "tools"))]
    if tools:
        chat["tools"] = tools
    choice = body.get("tool_choice")
    if choice is not None and (tools or choice not in ("auto", "none")):
        chat["tool_choice"] = _tool_choice(choice)
    response_format = _response_format(body.get("text"))
    if response_format is not None:
        chat["response_format"] = response_format
    verbosity = (body.get("text") or {}).get("verbosity")
    if verbosity is not None:
        chat["verbosity"] = verbosity
    effort = _reasoning(body.get("reasoning"))
    if effort is not None:
        chat["reasoning_effort"] = effort
    top_logprobs = body.get("top_logprobs")
    if top_logprobs is not None and not (type(top_logprobs) is int and 0 <= top_logprobs <= 20):
        raise invalid("top_logprobs: must be an integer from 0 to 20")
    if wants_logprobs(body, provider):
        chat["logprobs"] = True
        chat["top_logprobs"] = top_logprobs or 0
    options = body.get("stream_options")
    if options is not None and not (isinstance(options, dict) and set(options) <= {"include_obfuscation"}):
        raise invalid("stream_options: only include_obfuscation (the gateway adds no obfuscation)")
    return chat


def wants_logprobs(body: Mapping[str, Any], provider: str) -> bool:
    """Whether ``include`` asks for the text's logprobs (the only value served)."""
    include = _list(body.get("include"), "include")
    for value in include:
        _check(
            value == LOGPROBS_INCLUDE,
            f"include: {clip(value)} cannot be served by provider {provider!r}: only {LOGPROBS_INCLUDE} "
            "(the gateway keeps no encrypted reasoning, and runs no built-in tools)",
        )
    return bool(include)


def _list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    _check(isinstance(value, list), f"{where}: must be a list")
    return list(value)


def _object(value: Any, where: str) -> dict[str, Any]:
    _check(isinstance(value, dict), f"{where}: must be an object")
    return dict(value)


def _string(value: Any, where: str) -> str:
    _check(isinstance(value, str), f"{where}: must be a string")
    return str(value)


def _tool(tool: Any, where: str) -> dict[str, Any]:
    tool = _object(tool, where)
    kind = tool.get("type")
    _check(kind == "function", f"{where}: a tool of type {clip(kind)} cannot be served: {_BUILT_IN_TOOLS}")
    for key, value in tool.items():
        _check(value is None or key in _TOOL_KEYS, f"{where}.{clip(key)}: not served for function tools")
    function = {"name": _string(tool.get("name"), f"{where}.name")}
    function.update(
        (key, tool[key]) for key in ("description", "parameters", "strict") if tool.get(key) is not None
    )
    return {"type": "function", "function": function}


def _tool_choice(choice: Any) -> Any:
    if choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": _string(choice.get("name"), "tool_choice.name")}}
    kind = choice.get("type") if isinstance(choice, dict) else choice
    raise invalid(f"tool_choice: {clip(kind)} cannot be served: auto, none, required or a function only")


def _response_format(text: Any) -> dict[str, Any] | None:
    if text is None:
        return None
    text = _object(text, "text")
    for key in text:
        _check(key in ("format", "verbosity"), f"text.{clip(key)}: not a field of the Responses API's text")
    fmt = text.get("format")
    if fmt is None:
        return None
    fmt = _object(fmt, "text.format")
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    _check(
        kind == "json_schema", f"text.format.type: {clip(kind)} is not one of text, json_object, json_schema"
    )
    schema = {"name": _string(fmt.get("name"), "text.format.name")}
    _check(isinstance(fmt.get("schema"), dict), "text.format.schema: must be a JSON schema (an object)")
    schema.update((key, fmt[key]) for key in ("description", "schema", "strict") if fmt.get(key) is not None)
    return {"type": "json_schema", "json_schema": schema}


def _reasoning(reasoning: Any) -> str | None:
    """The effort asked for; a summary may be asked for, but the reasoning comes as text, never summed up."""
    if reasoning is None:
        return None
    reasoning = _object(reasoning, "reasoning")
    for key, value in reasoning.items():
        _check(value is None or key in _REASONING_KEYS, f"reasoning.{clip(key)}: not served")
    effort = reasoning.get("effort")
    return None if effort is None else _string(effort, "reasoning.effort")


def _messages(body: Mapping[str, Any], provider: str) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions is not None:
        messages.append({"role": "system", "content": _string(instructions, "instructions")})
    items = body.get("input")
    if isinstance(items, str):
        return [*messages, {"role": "user", "content": items}]
    if not isinstance(items, list):
        raise invalid("input: required, a string or a list of items")
    turn: dict[str, Any] | None = None  # the assistant turn consecutive items add to
    for i, item in enumerate(items):
        where = f"input[{i}]"
        item = _object(item, where)
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message" and item.get("role") == _ASSISTANT:
            content = _content(item.get("content"), f"{where}.content", provider, _ASSISTANT)
            if turn is None or turn.get("content") is not None or "tool_calls" in turn:
                turn = {"role": _ASSISTANT}
                messages.append(turn)
            turn["content"] = content
        elif kind == "reasoning":  # what the model thought before its turn's text and calls
            turn = {
                "role": _ASSISTANT,
                "content": None,
                "reasoning_content": _reasoning_text(item, where, provider),
            }
            messages.append(turn)
        elif kind == "function_call":
            if turn is None:
                turn = {"role": _ASSISTANT, "content": None}
                messages.append(turn)
            call = {
                "id": _string(item.get("call_id"), f"{where}.call_id"),
                "type": "function",
                "function": {
                    "name": _string(item.get("name"), f"{where}.name"),
                    "arguments": _string(item.get("arguments"), f"{where}.arguments"),
                },
            }
            turn.setdefault("tool_calls", []).append(call)
        elif kind == "function_call_output":
            turn = None
            output = item.get("output")
            content = (
                output if isinstance(output, str) else _content(output, f"{where}.output", provider, "tool")
            )
            messages.append(
                {
                    "role": "tool",
                    "tool_call_id": _string(item.get("call_id"), f"{where}.call_id"),
                    "content": content,
                }
            )
        elif kind == "message":
            turn = None
            role = item.get("role")
            if role not in ("user", "system", "developer"):
                raise invalid(f"{where}.role: {clip(role)} is not one of user, assistant, system, developer")
            content = _content(item.get("content"), f"{where}.content", provider, str(role))
            messages.append({"role": role, "content": content})
        elif kind == "item_reference":
            raise invalid(
                f"{where}: an item_reference names an item the gateway does not keep: send the item"
            )
        else:
            raise invalid(
                f"{where}: an item of type {clip(kind)} cannot be served by provider {provider!r}: it takes "
                "messages, reasoning, function calls and their outputs"
            )
    return messages


def _reasoning_text(item: dict[str, Any], where: str, provider: str) -> str:
    if item.get("encrypted_content") is not None:
        raise invalid(
            f"{where}.encrypted_content: provider {provider!r} takes reasoning as text, not OpenAI's "
            "encrypted reasoning"
        )
    field = "content" if item.get("content") else "summary"
    parts = [
        _object(p, f"{where}.{field}[{j}]") for j, p in enumerate(_list(item.get(field), f"{where}.{field}"))
    ]
    return "\n".join(_string(p.get("text"), f"{where}.{field}[{j}].text") for j, p in enumerate(parts))


def _content(content: Any, where: str, provider: str, role: str) -> str | list[dict[str, Any]]:
    """A message's (or a function call output's) content as chat's: a string, or chat parts."""
    if isinstance(content, str):
        return content
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(_list(content, where)):
        at = f"{where}[{j}]"
        part = _object(part, at)
        kind = part.get("type")
        if kind in ("input_text", "output_text") and (kind == "input_text" or role == _ASSISTANT):
            parts.append({"type": "text", "text": _string(part.get("text"), f"{at}.text")})
        elif kind == "refusal" and role == _ASSISTANT:
            parts.append({"type": "refusal", "refusal": _string(part.get("refusal"), f"{at}.refusal")})
        elif kind == "input_image" and role not in (_ASSISTANT, "tool"):
            if part.get("file_id") is not None:
                raise invalid(
                    f"{at}.file_id: files are kept by OpenAI, not by the gateway: send the image's URL (or a "
                    "data: URL)"
                )
            image = {"url": _string(part.get("image_url"), f"{at}.image_url")}
            if part.get("detail") in ("low", "high", "auto"):
                image["detail"] = part["detail"]
            parts.append({"type": "image_url", "image_url": image})
        else:
            raise invalid(
                f"{at}: a part of type {clip(kind)} cannot be served by provider {provider!r} in a {role} "
                "message: it takes text, images (by URL) in user and system messages, an assistant's output "
                "text and refusals"
            )
    return parts


# -- the answer -------------------------------------------------------------------------------------------


def _usage(usage: pb.Usage | None) -> dict[str, Any]:
    prompt = usage.prompt_tokens if usage is not None else 0
    completion = usage.completion_tokens if usage is not None else 0
    cached = usage.prompt_tokens_details.cached_tokens if usage is not None else 0
    reasoning = usage.completion_tokens_details.reasoning_tokens if usage is not None else 0
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": prompt + completion,
    }


def _id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(24)}"


def _output_text(text: str, logprobs: list[Any]) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs}


def _head(body: Mapping[str, Any]) -> dict[str, Any]:
    """A Response in progress: the request's parameters echoed as OpenAI does, no output yet."""
    text = body.get("text") or {}
    reasoning = body.get("reasoning") or {}
    echoed_text: dict[str, Any] = {"format": text.get("format") or {"type": "text"}}
    if text.get("verbosity") is not None:
        echoed_text["verbosity"] = text["verbosity"]
    return {
        "id": _id("resp"),
        "object": "response",
        "created_at": int(time.time()),
        "status": "in_progress",
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "max_tool_calls": None,
        "model": body.get("model"),
        "output": [],
        "parallel_tool_calls": body.get("parallel_tool_calls") is not False,
        "previous_response_id": None,
        "prompt_cache_key": body.get("prompt_cache_key"),
        "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")},
        "safety_identifier": body.get("safety_identifier"),
        "service_tier": body.get("service_tier"),
        "store": False,
        "temperature": body.get("temperature"),
        "text": echoed_text,
        "tool_choice": body.get("tool_choice") or "auto",
        "tools": body.get("tools") or [],
        "top_logprobs": body.get("top_logprobs") or 0,
        "top_p": body.get("top_p"),
        "truncation": "disabled",
        "usage": None,
        "user": body.get("user"),
        "metadata": body.get("metadata") or {},
    }


class ResponseWriter:
    """A chat answer's chunks (OpenAI's layout, one choice) as a Response and the Responses API's events:
    :meth:`start` (before the first chunk), :meth:`feed` per chunk, :meth:`end`; each returns the events it
    makes, dicts with their ``type`` and ``sequence_number``. :attr:`response` is the whole Response once
    ended."""

    def __init__(self, body: Mapping[str, Any], *, logprobs: bool) -> None:
        self.response = _head(body)
        self._logprobs = logprobs
        self._sequence = 0
        self._kind = ""  # the open item's type, "" for none
        self._item: dict[str, Any] = {}  # the open item, as its output_item.done will say it
        self._text: list[str] = []  # the open item's text or arguments so far
        self._text_logprobs: list[Any] = []
        self._call_index = -1  # the chat tool call the open function_call item is
        self._held = ""  # whitespace-only text not yet in a message
        self._held_logprobs: list[Any] = []
        self._finish = ""
        self._usage: pb.Usage | None = None

    def _event(self, out: list[dict[str, Any]], kind: str, **fields: Any) -> None:
        out.append({"type": kind, "sequence_number": self._sequence, **fields})
        self._sequence += 1

    def _at(self) -> dict[str, Any]:
        """Where the open item's events point."""
        return {"item_id": self._item["id"], "output_index": len(self.response["output"])}

    def start(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        self._event(out, "response.created", response={**self.response, "output": []})
        self._event(out, "response.in_progress", response={**self.response, "output": []})
        return out

    def _open(self, out: list[dict[str, Any]], kind: str, item: dict[str, Any]) -> None:
        self._close(out, "completed")
        self._kind, self._item = kind, item
        self._text, self._text_logprobs = [], []
        index = len(self.response["output"])
        added = {**item, "status": "in_progress"}
        if kind != "function_call":
            added["content"] = []
        self._event(out, "response.output_item.added", output_index=index, item=added)
        if kind == "message":
            part = _output_text("", [])
            self._event(out, "response.content_part.added", **self._at(), content_index=0, part=part)

    def _close(self, out: list[dict[str, Any]], status: str) -> None:
        if not self._kind:
            return
        at, text, item = self._at(), "".join(self._text), self._item
        if self._kind == "reasoning":
            self._event(out, "response.reasoning_text.done", **at, content_index=0, text=text)
            item["content"] = [{"type": "reasoning_text", "text": text}]
        elif self._kind == "message":
            logprobs = self._text_logprobs
            self._event(out, "response.output_text.done", **at, content_index=0, text=text, logprobs=logprobs)
            part = _output_text(text, logprobs)
            self._event(out, "response.content_part.done", **at, content_index=0, part=part)
            item["content"] = [part]
        else:
            self._event(out, "response.function_call_arguments.done", **at, name=item["name"], arguments=text)
            item["arguments"] = text
        item["status"] = status
        self._event(out, "response.output_item.done", output_index=at["output_index"], item=item)
        self.response["output"].append(item)
        self._kind = ""

    def _add_reasoning(self, out: list[dict[str, Any]], text: str) -> None:
        if self._kind != "reasoning":
            item: dict[str, Any] = {
                "id": _id("rs"),
                "type": "reasoning",
                "summary": [],
                "encrypted_content": None,
            }
            self._open(out, "reasoning", item)
        self._text.append(text)
        self._event(out, "response.reasoning_text.delta", **self._at(), content_index=0, delta=text)

    def _add_text(
        self, out: list[dict[str, Any]], text: str, logprobs: list[Any], *, last: bool = False
    ) -> None:
        if self._kind != "message":
            text, logprobs = self._held + text, self._held_logprobs + logprobs
            self._held, self._held_logprobs = "", []
            if not (text.strip() or last):  # it may only separate tool calls: wait for more
                self._held, self._held_logprobs = text, logprobs
                return
            item = {"id": _id("msg"), "type": "message", "role": "assistant"}
            self._open(out, "message", item)
        self._text.append(text)
        self._text_logprobs.extend(logprobs)
        at = self._at()
        self._event(out, "response.output_text.delta", **at, content_index=0, delta=text, logprobs=logprobs)

    def _add_call(self, out: list[dict[str, Any]], call: pb.ToolCallDelta) -> None:
        if self._kind != "function_call" or call.index != self._call_index:
            self._held, self._held_logprobs = "", []
            item = {
                "id": _id("fc"),
                "type": "function_call",
                "call_id": call.id or _id("call"),
                "name": call.name,
                "arguments": "",
            }
            self._open(out, "function_call", item)
            self._call_index = call.index
        if call.arguments:
            self._text.append(call.arguments)
            self._event(out, "response.function_call_arguments.delta", **self._at(), delta=call.arguments)

    def feed(self, chunk: pb.ChatChunk) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if chunk.HasField("usage"):
            self._usage = chunk.usage
        for choice in chunk.choices:
            delta = choice.delta
            if delta.reasoning_content:
                self._add_reasoning(out, delta.reasoning_content)
            if delta.content:
                logprobs: list[Any] = []
                if self._logprobs and choice.HasField("logprobs_json"):
                    logprobs = orjson.loads(choice.logprobs_json).get("content") or []
                self._add_text(out, delta.content, logprobs)
            for call in delta.tool_calls:
                self._add_call(out, call)
            if choice.HasField("finish_reason"):
                self._finish = choice.finish_reason
        return out

    def end(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        calls = self._kind == "function_call" or any(
            i["type"] == "function_call" for i in self.response["output"]
        )
        if self._held and not calls:
            self._add_text(out, "", [], last=True)
        incomplete = self._finish == "length"
        self._close(out, "incomplete" if incomplete else "completed")
        response = self.response
        response["status"] = "incomplete" if incomplete else "completed"
        if incomplete:
            response["incomplete_details"] = {"reason": "max_output_tokens"}
        else:
            response["completed_at"] = int(time.time())
        response["usage"] = _usage(self._usage)
        self._event(out, "response.incomplete" if incomplete else "response.completed", response=response)
        return out
