"""The answers of the OpenAI-shaped fakes beyond chat: embeddings, the Responses API and the Completions API.

- Embeddings: each input (a string, or token ids) gets a deterministic unit vector of ``dimensions``
  (default :data:`EMBEDDING_DIMENSIONS`) float32 values made from its SHA-256, the same from every kind;
  ``encoding_format: "base64"`` gives the vector's little-endian float32 bytes in base64, as OpenAI does.
  ``usage.prompt_tokens`` counts words (or token ids).
- Responses (``POST /v1/responses``): a ``response`` object with one ``message`` output item holding one
  ``output_text`` part, the fake's reply to the ``input`` (a string, or the last user message's text);
  streamed, OpenAI's event sequence (``response.created``, ``response.in_progress``,
  ``response.output_item.added``, ``response.content_part.added``, one ``response.output_text.delta`` a
  token, ``response.output_text.done``, ``response.content_part.done``, ``response.output_item.done``,
  ``response.completed``), each with its ``sequence_number``.
- Completions (``POST /v1/completions``): a ``text_completion`` with one choice answering the ``prompt``;
  streamed, one chunk a token, the last with ``finish_reason``, a usage chunk with
  ``stream_options.include_usage``, then ``data: [DONE]``.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from collections.abc import Iterator
from typing import Any, Final

from llmgw_dev.fakes.faults import Reply, count_words

EMBEDDING_DIMENSIONS: Final = 16


def embedding(item: str | list[int], dimensions: int = EMBEDDING_DIMENSIONS) -> list[float]:
    """The fake's unit vector for one input: float32 values, deterministic."""
    seed = (item if isinstance(item, str) else ",".join(map(str, item))).encode()
    raw = b""
    counter = 0
    while len(raw) < 4 * dimensions:
        raw += hashlib.sha256(seed + counter.to_bytes(4, "little")).digest()
        counter += 1
    values = [(b - 127.5) / 127.5 for b in raw[: 4 * dimensions : 4]]
    norm = sum(v * v for v in values) ** 0.5 or 1.0
    packed = struct.pack(f"<{dimensions}f", *(v / norm for v in values))
    return list(struct.unpack(f"<{dimensions}f", packed))


def encode_base64(vector: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


def embedding_inputs(value: Any) -> list[str | list[int]] | None:
    """The inputs of an embeddings request's ``input``, or None when it has none of the API's shapes."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return list(value)
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return [list(value)]
        if all(isinstance(v, list) and all(isinstance(t, int) for t in v) for v in value):
            return [list(v) for v in value]
    return None


def embeddings_answer(
    model: str, inputs: list[str | list[int]], fmt: str, dimensions: int | None
) -> dict[str, Any]:
    data = []
    tokens = 0
    for i, item in enumerate(inputs):
        vector = embedding(item, dimensions or EMBEDDING_DIMENSIONS)
        tokens += count_words(item) if isinstance(item, str) else len(item)
        value: Any = encode_base64(vector) if fmt == "base64" else vector
        data.append({"object": "embedding", "index": i, "embedding": value})
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def input_text(value: Any) -> str:
    """What a Responses request's ``input`` asks: the string, or the last user message's text."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        for item in reversed(value):
            if isinstance(item, dict) and item.get("role") == "user":
                content = item.get("content")
                if isinstance(content, str):
                    return content
                if isinstance(content, list):
                    return "".join(
                        p.get("text", "")
                        for p in content
                        if isinstance(p, dict) and isinstance(p.get("text"), str)
                    )
    return ""


def response_object(
    response_id: str, created: int, body: dict[str, Any], reply: Reply | None, prompt_tokens: int
) -> dict[str, Any]:
    """A Responses API ``response``: completed with ``reply``, or in progress (``reply`` None)."""
    done = reply is not None
    output = []
    if reply is not None:
        output.append(
            {
                "id": "msg_" + response_id[5:],
                "type": "message",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": reply.text, "annotations": [], "logprobs": []}],
            }
        )
    completion = reply.completion_tokens if reply is not None else 0
    return {
        "id": response_id,
        "object": "response",
        "created_at": created,
        "status": "completed" if done else "in_progress",
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "model": body.get("model"),
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": body.get("previous_response_id"),
        "reasoning": {"effort": None, "summary": None},
        "store": body.get("store", True),
        "temperature": body.get("temperature", 1.0),
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": body.get("top_p", 1.0),
        "truncation": "disabled",
        "usage": {
            "input_tokens": prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt_tokens + completion,
        }
        if done
        else None,
        "user": body.get("user"),
        "metadata": body.get("metadata") or {},
    }


def response_events(
    response_id: str, created: int, body: dict[str, Any], reply: Reply, prompt_tokens: int
) -> Iterator[tuple[str, dict[str, Any]]]:
    """The streamed Responses API's events, (type, event), ``sequence_number`` from 0."""
    item_id = "msg_" + response_id[5:]
    seq = 0

    def event(kind: str, **fields: Any) -> tuple[str, dict[str, Any]]:
        nonlocal seq
        seq += 1
        return kind, {"type": kind, "sequence_number": seq - 1, **fields}

    pending = response_object(response_id, created, body, None, prompt_tokens)
    yield event("response.created", response=pending)
    yield event("response.in_progress", response=pending)
    item = {"id": item_id, "type": "message", "status": "in_progress", "role": "assistant", "content": []}
    yield event("response.output_item.added", output_index=0, item=item)
    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    yield event("response.content_part.added", item_id=item_id, output_index=0, content_index=0, part=part)
    for token in reply.tokens:
        yield event(
            "response.output_text.delta",
            item_id=item_id,
            output_index=0,
            content_index=0,
            delta=token,
            logprobs=[],
        )
    yield event(
        "response.output_text.done",
        item_id=item_id,
        output_index=0,
        content_index=0,
        text=reply.text,
        logprobs=[],
    )
    done_part = {**part, "text": reply.text}
    yield event(
        "response.content_part.done", item_id=item_id, output_index=0, content_index=0, part=done_part
    )
    complete = response_object(response_id, created, body, reply, prompt_tokens)
    yield event("response.output_item.done", output_index=0, item=complete["output"][0])
    yield event("response.completed", response=complete)


def completion_object(
    completion_id: str, created: int, model: str, reply: Reply, prompt_tokens: int
) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"text": reply.text, "index": 0, "logprobs": None, "finish_reason": reply.finish}],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": reply.completion_tokens,
            "total_tokens": prompt_tokens + reply.completion_tokens,
        },
        "system_fingerprint": "fp_fake",
    }


def completion_chunks(
    completion_id: str, created: int, model: str, reply: Reply, prompt_tokens: int, include_usage: bool
) -> Iterator[dict[str, Any]]:
    """The streamed Completions API's chunks (``[DONE]`` not included)."""

    def chunk(text: str, finish: str | None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
            "system_fingerprint": "fp_fake",
        }
        if include_usage:
            out["usage"] = None
        return out

    for token in reply.tokens:
        yield chunk(token, None)
    yield chunk("", reply.finish)
    if include_usage:
        usage = completion_object(completion_id, created, model, reply, prompt_tokens)["usage"]
        last = chunk("", None)
        last["choices"] = []
        last["usage"] = usage
        yield last
