"""The rich answers of the OpenAI-shaped fakes: tool calls, structured outputs, reasoning, logprobs, n choices.

A request that uses none of these is answered by each kind's own fast path; one that does (see :func:`is_rich`)
gets its answer built here, as OpenAI's JSON (a ``chat.completion``, or the list of ``chat.completion.chunk``
objects of a stream), from the request's JSON and the kind's deterministic :class:`Reply`. The gRPC fake
turns the same JSON into protobuf with the gateway's codec, so both kinds answer alike.

What the answers are (deterministic, so tests can predict them):

- tools: when the request has function tools, ``tool_choice`` is not ``"none"`` and the last message is not a
  tool result, the model calls the named function of ``tool_choice`` (else the first function) once, with
  arguments made from its parameters' JSON Schema (:func:`example`: strings are the last user message,
  integers 42, numbers 1.5, booleans true, enums their first value); finish reason ``tool_calls``. A stream
  sends the arguments in fragments of at most 8 characters. After a tool result the reply answers it.
- ``response_format``: ``json_object`` gives ``{"reply": <text>}``, ``json_schema`` an :func:`example` of
  the schema, as the content.
- ``reasoning_effort``: the message gets ``reasoning_content`` ("Thinking about: <prompt>"), counted in
  ``completion_tokens_details.reasoning_tokens``; a stream sends it word by word before the content.
- ``logprobs``: every content token gets ``logprob`` -0.5 and ``top_logprobs`` alternatives.
- ``n``: n identical choices, indexed 0 to n-1.
- usage: ``prompt_tokens_details.cached_tokens`` counts the words of every message but the last (the
  conversation's prefix, as a provider's prompt cache would).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import orjson

from llmgw_dev.fakes.faults import Reply, count_words

_RICH_KEYS = ("tools", "response_format", "reasoning_effort", "logprobs", "n")


def is_rich(body: Mapping[str, Any]) -> bool:
    """Whether the request needs an answer built here rather than the plain fast path."""
    if body.get("n") not in (None, 1):
        return True
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema"):
        return True
    return bool(body.get("tools") or body.get("reasoning_effort") or body.get("logprobs"))


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def prompt_of(messages: list[Any]) -> str:
    """What the reply answers: the last message's text if it is a tool result, else the last user message's."""
    if messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "tool":
        return _text(messages[-1].get("content"))
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return _text(message.get("content"))
    return ""


def example(schema: Any, text: str, defs: Mapping[str, Any] | None = None) -> Any:
    """A value that satisfies the JSON Schema ``schema`` (the subset structured outputs use)."""
    if not isinstance(schema, dict):
        return text
    defs = {**(defs or {}), **schema.get("$defs", {}), **schema.get("definitions", {})}
    if "$ref" in schema:
        return example(defs.get(str(schema["$ref"]).rsplit("/", 1)[-1], {}), text, defs)
    if "enum" in schema:
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    for key in ("anyOf", "oneOf", "allOf"):
        if schema.get(key):
            return example(schema[key][0], text, defs)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or "properties" in schema:
        return {name: example(sub, text, defs) for name, sub in schema.get("properties", {}).items()}
    if kind == "array":
        return [example(schema.get("items", {}), text, defs)]
    return {"integer": 42, "number": 1.5, "boolean": True, "null": None}.get(str(kind), text)


def _tool_to_call(body: Mapping[str, Any]) -> dict[str, Any] | None:
    tools = [t for t in body.get("tools") or () if isinstance(t, dict) and t.get("type") == "function"]
    choice = body.get("tool_choice")
    messages = body.get("messages") or []
    if not tools or choice == "none" or (messages and messages[-1].get("role") == "tool"):
        return None
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        tools = [t for t in tools if t["function"].get("name") == name] or tools
    return tools[0]["function"]


def _logprobs(token: str, top: int) -> dict[str, Any]:
    entry = {"token": token, "logprob": -0.5, "bytes": list(token.encode())}
    alternatives = [entry] + [
        {"token": f"alt{i}", "logprob": -2.0 - i, "bytes": list(f"alt{i}".encode())} for i in range(1, top)
    ]
    return {**entry, "top_logprobs": alternatives[:top]}


class Answer:
    """One rich answer: what the message holds, and the usage."""

    def __init__(self, body: Mapping[str, Any], reply: Reply, prompt_tokens: int) -> None:
        self.body = body
        self.reply = reply
        messages = body.get("messages") or []
        self.prompt = prompt_of(messages)
        self.n = body.get("n") or 1
        self.top_logprobs = int(body.get("top_logprobs") or 0)
        self.logprobs = body.get("logprobs") is True
        self.reasoning = f"Thinking about: {self.prompt}" if body.get("reasoning_effort") else None
        self.tool = _tool_to_call(body)
        self.call_id = "call_" + os.urandom(8).hex()
        self.arguments = ""
        self.content: str | None = reply.text
        self.tokens: list[str] = list(reply.tokens)
        if self.tool is not None:
            self.arguments = orjson.dumps(example(self.tool.get("parameters") or {}, self.prompt)).decode()
            self.content, self.tokens = None, []
        else:
            fmt = body.get("response_format")
            if isinstance(fmt, dict) and fmt.get("type") == "json_object":
                self.content = orjson.dumps({"reply": reply.text}).decode()
            elif isinstance(fmt, dict) and fmt.get("type") == "json_schema":
                schema = (fmt.get("json_schema") or {}).get("schema") or {}
                self.content = orjson.dumps(example(schema, reply.text)).decode()
            if self.content != reply.text:
                assert self.content is not None
                self.tokens = [self.content[i : i + 8] for i in range(0, len(self.content), 8)]
        self.finish = "tool_calls" if self.tool is not None else reply.finish
        reasoning_tokens = count_words(self.reasoning or "")
        completion = (len(self.tokens) if self.tool is None else count_words(self.arguments) + 1) * self.n
        completion += reasoning_tokens
        last = messages[-1] if messages and isinstance(messages[-1], dict) else {}
        cached = max(0, prompt_tokens - count_words(_text(last.get("content"))))
        self.usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": reasoning_tokens,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }

    def completion(self, completion_id: str, created: int, model: str) -> dict[str, Any]:
        """The ``chat.completion``."""
        message: dict[str, Any] = {"role": "assistant", "content": self.content, "refusal": None}
        if self.reasoning is not None:
            message["reasoning_content"] = self.reasoning
        if self.tool is not None:
            message["tool_calls"] = [
                {
                    "id": self.call_id,
                    "type": "function",
                    "function": {"name": self.tool["name"], "arguments": self.arguments},
                }
            ]
        message["annotations"] = []
        logprobs = None
        if self.logprobs:
            logprobs = {"content": [_logprobs(t, self.top_logprobs) for t in self.tokens], "refusal": None}
        choices = [
            {"index": i, "message": message, "logprobs": logprobs, "finish_reason": self.finish}
            for i in range(self.n)
        ]
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": choices,
            "usage": self.usage,
            "service_tier": "default",
            "system_fingerprint": "fp_fake",
        }

    def chunks(
        self, completion_id: str, created: int, model: str, include_usage: bool
    ) -> list[dict[str, Any]]:
        """The ``chat.completion.chunk`` objects of the stream, the usage chunk last when asked for."""
        head: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "service_tier": "default",
            "system_fingerprint": "fp_fake",
        }
        tail = {"usage": None} if include_usage else {}

        def chunk(
            index: int, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None
        ) -> dict[str, Any]:
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            return {**head, "choices": [choice], **tail}

        out: list[dict[str, Any]] = []
        for i in range(self.n):
            opening: dict[str, Any] = {"role": "assistant", "content": "" if self.tool is None else None}
            if self.tool is not None:
                opening["tool_calls"] = [
                    {
                        "index": 0,
                        "id": self.call_id,
                        "type": "function",
                        "function": {"name": self.tool["name"], "arguments": ""},
                    }
                ]
            opening["refusal"] = None
            out.append(chunk(i, opening))
        for word in (self.reasoning or "").split(" ") if self.reasoning else ():
            for i in range(self.n):
                out.append(chunk(i, {"reasoning_content": word + " "}))
        for j in range(0, len(self.arguments), 8):
            piece = self.arguments[j : j + 8]
            for i in range(self.n):
                out.append(chunk(i, {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}))
        for token in self.tokens:
            logprobs = (
                {"content": [_logprobs(token, self.top_logprobs)], "refusal": None} if self.logprobs else None
            )
            for i in range(self.n):
                out.append(chunk(i, {"content": token}, logprobs=logprobs))
        for i in range(self.n):
            out.append(chunk(i, {}, self.finish))
        if include_usage:
            out.append({**head, "choices": [], "usage": self.usage})
        return out
