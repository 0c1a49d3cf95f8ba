#!/usr/bin/env python3
"""Per-operation cost of the OpenAI codec on the REST path, this tree's against a baseline's, side by side.

Each row is one thing the proxy does per message on the REST path, bytes in and bytes out, as
``fronts/openai.py`` and ``providers/openai.py`` do it:

* request in: a client's body (``orjson.loads`` + ``request_from_json``), and out to the provider
  (``request_to_json`` + ``orjson.dumps``);
* reply in: the provider's body (``orjson.loads`` + ``response_from_json``), and out to the client
  (``response_to_json`` + ``orjson.dumps``);
* chunk in: one SSE event's data (``orjson.loads`` + ``chunk_from_json``), and out (``chunk_to_json`` +
  ``orjson.dumps``); a text delta, a tool-call fragment, the finish chunk and the usage chunk.

The bodies are what OpenAI sends (an id, ``system_fingerprint``, ``logprobs: null``, ...). The baseline is
``llmgw/codecs/openai_chat.py`` at a git revision (``--baseline REV``, default ``HEAD``), loaded as a module
of its own next to this tree's, so both run in the same process, interleaved, against the same protobuf
classes; each operation's output is checked to be the same for both (so a faster path that loses a field
fails here, not only in tests/test_openai_api.py). Times are the median over repetitions of the time per
operation with the garbage collector paused.

Usage: ``python bench/codec.py`` (~20 s), ``--quick`` (a smoke run), ``--baseline 9073e64``, ``--no-baseline``.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

import orjson

from llmgw.codecs import openai_chat

ROOT = pathlib.Path(__file__).resolve().parent.parent
CODEC_PATH = "proxy_image/llmgw/codecs/openai_chat.py"

ID = "chatcmpl-AbC123xyz456DEF789ghi012JKL"
FP = "fp_44709d6fcb"
CREATED = 1_730_000_000
MODEL = "gpt-4o-mini-2024-07-18"

REQUEST = {
    "model": "gpt-4o-mini",
    "messages": [
        {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
        {"role": "user", "content": "What is the capital of France, and what is it known for?"},
    ],
    "temperature": 0.7,
    "max_tokens": 256,
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
                "required": ["city"],
            },
        },
    }
]
TOOL_REQUEST = {
    "model": "gpt-4o-mini",
    "messages": [
        {"role": "user", "content": "What is the weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_abc123",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_abc123", "content": '{"temp_c":18,"sky":"cloudy"}'},
    ],
    "tools": TOOLS,
    "tool_choice": "auto",
}
_USAGE = {
    "prompt_tokens": 25,
    "completion_tokens": 60,
    "total_tokens": 85,
    "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
    "completion_tokens_details": {
        "reasoning_tokens": 0,
        "audio_tokens": 0,
        "accepted_prediction_tokens": 0,
        "rejected_prediction_tokens": 0,
    },
}
REPLY = {
    "id": ID,
    "object": "chat.completion",
    "created": CREATED,
    "model": MODEL,
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Paris is the capital of France. It is known for the Eiffel Tower, the Louvre, its "
                "cafés and its cuisine, and as a centre of art, fashion and culture for centuries.",
                "refusal": None,
                "annotations": [],
            },
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": _USAGE,
    "service_tier": "default",
    "system_fingerprint": FP,
}
TOOL_REPLY = {
    **REPLY,
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_abc123",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Paris","unit":"c"}'},
                    }
                ],
                "refusal": None,
                "annotations": [],
            },
            "logprobs": None,
            "finish_reason": "tool_calls",
        }
    ],
}


def _chunk(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "id": ID,
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": MODEL,
        "service_tier": "default",
        "system_fingerprint": FP,
        "choices": choices,
        **extra,
    }


def _choice(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}


TEXT_CHUNK = _chunk([_choice({"content": " capital"})])
TOOL_CHUNK = _chunk([_choice({"tool_calls": [{"index": 0, "function": {"arguments": '{"city'}}]})])
FINISH_CHUNK = _chunk([_choice({}, "stop")])
USAGE_CHUNK = _chunk([], usage=_USAGE)

CASES: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("request", "request: short, two messages", REQUEST),
    ("request", "request: tools, a tool call and its result", TOOL_REQUEST),
    ("reply", "reply: one text choice, usage", REPLY),
    ("reply", "reply: a tool call", TOOL_REPLY),
    ("chunk", "chunk: text delta", TEXT_CHUNK),
    ("chunk", "chunk: tool-call fragment", TOOL_CHUNK),
    ("chunk", "chunk: finish", FINISH_CHUNK),
    ("chunk", "chunk: usage (no choices)", USAGE_CHUNK),
)


def operations(codec: Any, kind: str, body: dict[str, Any]) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """(decode, encode) of one case with ``codec``: bytes -> protobuf, protobuf -> bytes."""
    blob = orjson.dumps(body)
    loads, dumps = orjson.loads, orjson.dumps
    if kind == "request":
        req, _ = codec.request_from_json(loads(blob))
        return (
            lambda: codec.request_from_json(loads(blob)),
            lambda: dumps(codec.request_to_json(req, model="upstream-model")),
        )
    if kind == "reply":
        resp = codec.response_from_json(loads(blob))
        return lambda: codec.response_from_json(loads(blob)), lambda: dumps(codec.response_to_json(resp))
    chunk = codec.chunk_from_json(loads(blob))
    return lambda: codec.chunk_from_json(loads(blob)), lambda: dumps(codec.chunk_to_json(chunk))


def load_baseline(rev: str) -> ModuleType:
    """``openai_chat.py`` as it was at git revision ``rev``, as a module of its own."""
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:{CODEC_PATH}"], capture_output=True, check=True
    ).stdout
    with tempfile.NamedTemporaryFile("wb", suffix=".py", delete=False) as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("openai_chat_baseline", f.name)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    pathlib.Path(f.name).unlink()
    return module


def time_op(op: Callable[[], Any], n: int) -> float:
    """Nanoseconds per call over ``n`` calls, the garbage collector paused."""
    gc.disable()
    try:
        start = time.perf_counter_ns()
        for _ in range(n):
            op()
        return (time.perf_counter_ns() - start) / n
    finally:
        gc.enable()


def _same(a: Any, b: Any) -> bool:
    return bool(a == b)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions (a smoke run)")
    parser.add_argument(
        "--baseline", default="HEAD", metavar="REV", help="git revision of the baseline codec"
    )
    parser.add_argument("--no-baseline", action="store_true", help="this tree's codec only")
    args = parser.parse_args(argv)
    repeats, n = (3, 200) if args.quick else (15, 2000)

    codecs: dict[str, Any] = {"this tree": openai_chat}
    if not args.no_baseline:
        try:
            codecs = {f"baseline ({args.baseline})": load_baseline(args.baseline), **codecs}
        except (subprocess.CalledProcessError, OSError, SyntaxError, ImportError, AttributeError) as exc:
            print(f"baseline {args.baseline!r} not loaded ({exc}); this tree's codec only", file=sys.stderr)

    ops: dict[tuple[str, str, str], Callable[[], Any]] = {}
    for kind, label, body in CASES:
        outputs = []
        for name, codec in codecs.items():
            decode, encode = operations(codec, kind, body)
            ops[(label, "decode", name)] = decode
            ops[(label, "encode", name)] = encode
            outputs.append((decode(), encode()))
        for other in outputs[1:]:  # the same protobuf message and the same bytes out
            if not (
                _same(other[0], outputs[0][0]) and _same(orjson.loads(other[1]), orjson.loads(outputs[0][1]))
            ):
                print(f"warning: {label}: the codecs' outputs differ", file=sys.stderr)

    samples: dict[tuple[str, str, str], list[float]] = {key: [] for key in ops}
    for _ in range(repeats):  # interleaved: a burst of load elsewhere hits every operation alike
        for key, op in ops.items():
            samples[key].append(time_op(op, n))
    median = {key: statistics.median(values) for key, values in samples.items()}

    names = list(codecs)
    print(f"OpenAI codec, µs per operation (median of {repeats} x {n}; Python {platform.python_version()})")
    print()
    header = "| operation | " + " | ".join(f"{d}, {c}" for d in ("decode", "encode") for c in names)
    if len(names) == 2:
        header += " | decode change | encode change"
    print(header + " |")
    print("|---" * (header.count("|")) + "|")
    for _kind, label, _body in CASES:
        cells = [f"{median[(label, d, c)] / 1000:.1f}" for d in ("decode", "encode") for c in names]
        if len(names) == 2:
            for d in ("decode", "encode"):
                before, after = median[(label, d, names[0])], median[(label, d, names[1])]
                cells.append(f"{(after - before) / before:+.0%}")
        print(f"| {label} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
