"""Anthropic through the gateway, both ways: the OpenAI API to anthropic providers (tools, images, thinking,
JSON output, cache usage, streams) and the Messages front (``POST /v1/messages``) for the official
``anthropic`` SDK, routed to an anthropic provider (the body reaches it unchanged but for the model name) and
to an openai provider (through the translation). Translation tests are built from the request and response
examples of Anthropic's documentation; the end-to-end ones run a real proxy on 127.0.0.1 in front of the
recording fakes.
"""

from __future__ import annotations

import copy
import pathlib
from typing import Any

import aiohttp
import anthropic
import grpc
import openai
import orjson
import pytest

from conftest import Fakes, proxy_config
from llmgateway.v1 import llm_service_pb2 as pb
from llmgateway.v1 import llm_service_pb2_grpc as pb_grpc
from llmgw.codecs import anthropic_messages as am
from llmgw.codecs import openai_chat
from llmgw.errors import GatewayError
from llmgw.server import ProxyServer
from llmgw_dev.fakes.anthropic import signature

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a given location",
        "parameters": {
            "type": "object",
            "properties": {"location": {"type": "string", "description": "The city and state"}},
            "required": ["location"],
        },
    },
}
# The same tool as Anthropic documents it.
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Get the current weather in a given location",
    "input_schema": WEATHER["function"]["parameters"],  # type: ignore[index]
}
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="


def to_anthropic(body: dict[str, Any], stream: bool = False) -> dict[str, Any]:
    """The Messages API body the anthropic provider sends for an OpenAI request body."""
    req, _ = openai_chat.request_from_json(body)
    return am.request_to_json(req, model="claude", stream=stream, default_max_tokens=1024, provider="p")


def refused(body: dict[str, Any]) -> str:
    with pytest.raises(GatewayError) as info:
        to_anthropic(body)
    assert info.value.kind.http_status == 400
    return info.value.message


# -- translation: the OpenAI API -> the Messages API ------------------------------------------------------


def test_tools_parallel_calls_and_results_translate() -> None:
    body = to_anthropic(
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "developer", "content": "use tools"},
                {"role": "user", "content": "What's the weather in SF and NYC?"},
                {
                    "role": "assistant",
                    "content": "Let me check.",
                    "tool_calls": [
                        {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"location":"SF"}'}},
                        {"id": "toolu_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"location":"NYC"}'}},
                    ],
                },
                {"role": "tool", "tool_call_id": "toolu_1", "content": "15 degrees"},
                {"role": "tool", "tool_call_id": "toolu_2", "content": "error: no station", "is_error": True},
                {"role": "user", "content": "thanks"},
            ],
            "tools": [WEATHER],
            "tool_choice": "required",
            "parallel_tool_calls": False,
        }
    )  # fmt: skip
    assert body == {
        "model": "claude",
        "max_tokens": 1024,
        "system": "be brief\n\nuse tools",
        "messages": [
            {"role": "user", "content": "What's the weather in SF and NYC?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Let me check."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"location": "SF"}},
                    {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {"location": "NYC"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "15 degrees"},
                    {"type": "tool_result", "tool_use_id": "toolu_2", "content": "error: no station", "is_error": True},
                    {"type": "text", "text": "thanks"},
                ],
            },
        ],
        "tools": [WEATHER_TOOL],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
    }  # fmt: skip
    for choice, expected in (
        ("auto", {"type": "auto"}),
        ("none", {"type": "none"}),
        ({"type": "function", "function": {"name": "get_weather"}}, {"type": "tool", "name": "get_weather"}),
    ):
        sent = to_anthropic(
            {
                "model": "m",
                "messages": [{"role": "user", "content": "x"}],
                "tools": [WEATHER],
                "tool_choice": choice,
            }
        )
        assert sent["tool_choice"] == expected


def test_images_translate() -> None:
    body = to_anthropic(
        {
            "model": "m",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                        {"type": "image_url", "image_url": {"url": "https://upload.wikimedia.org/a.jpg"}},
                        {"type": "text", "text": "Describe these images."},
                    ],
                }
            ],
        }
    )
    assert body["messages"][0]["content"] == [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
        {"type": "image", "source": {"type": "url", "url": "https://upload.wikimedia.org/a.jpg"}},
        {"type": "text", "text": "Describe these images."},
    ]


def test_reasoning_and_signed_thinking_translate() -> None:
    body = to_anthropic(
        {
            "model": "m",
            "reasoning_effort": "low",
            "messages": [
                {"role": "user", "content": "2+2?"},
                {
                    "role": "assistant",
                    "content": "4",
                    "reasoning_content": "Simple sum.",
                    "reasoning_signature": "EqQBCgIYAhIM",
                    "redacted_reasoning": ["EmwKAhgBEgy"],
                },
                {"role": "user", "content": "and 3+3?"},
            ],
        }
    )
    assert body["thinking"] == {"type": "enabled", "budget_tokens": am.THINKING_BUDGET["low"]}
    assert body["max_tokens"] == 1024 + am.THINKING_BUDGET["low"]  # the budget comes on top of the default
    assert body["messages"][1]["content"] == [
        {"type": "thinking", "thinking": "Simple sum.", "signature": "EqQBCgIYAhIM"},
        {"type": "redacted_thinking", "data": "EmwKAhgBEgy"},
        {"type": "text", "text": "4"},
    ]
    # An explicit max_completion_tokens bounds the budget; too small a one is a clear 400.
    sent = to_anthropic(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "x"}],
            "reasoning_effort": "high",
            "max_completion_tokens": 5000,
        }
    )
    assert sent["max_tokens"] == 5000 and sent["thinking"]["budget_tokens"] == 4999
    assert "above 1024" in refused(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "x"}],
            "reasoning_effort": "low",
            "max_tokens": 100,
        }
    )


def test_json_schema_is_a_forced_tool() -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    request = {
        "model": "m",
        "messages": [{"role": "user", "content": "extract"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}},
    }
    body = to_anthropic(request)
    assert body["tools"] == [
        {
            "name": "person",
            "description": "Respond with JSON that follows this schema.",
            "input_schema": schema,
        }
    ]
    assert body["tool_choice"] == {"type": "tool", "name": "person"}
    req, _ = openai_chat.request_from_json(request)
    reply = {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude",
        "content": [{"type": "tool_use", "id": "toolu_1", "name": "person", "input": {"name": "Ada"}}],
        "stop_reason": "tool_use", "stop_sequence": None, "usage": {"input_tokens": 5, "output_tokens": 3},
    }  # fmt: skip
    resp = am.response_from_json(reply, "claude", am.format_tool_name(req))
    out = openai_chat.response_to_json(resp)
    assert out["choices"][0]["message"]["content"] == '{"name":"Ada"}'
    assert out["choices"][0]["finish_reason"] == "stop" and "tool_calls" not in out["choices"][0]["message"]


def test_what_cannot_be_carried_is_a_clear_400() -> None:
    user = [{"role": "user", "content": "x"}]
    assert refused({"model": "m", "messages": user, "temperature": 1.5}).startswith(
        "temperature: 1.5 is out of range [0, 1]"
    )
    assert refused({"model": "m", "messages": user, "n": 2}).startswith(
        "n: not supported with Anthropic provider 'p'"
    )
    assert refused({"model": "m", "messages": user, "logit_bias": {"1": 2}}).startswith("logit_bias:")
    assert refused({"model": "m", "messages": user, "logprobs": True}).startswith("logprobs:")
    audio = [
        {
            "role": "user",
            "content": [{"type": "input_audio", "input_audio": {"data": "AAA", "format": "wav"}}],
        }
    ]
    assert refused({"model": "m", "messages": audio}).startswith(
        "messages[0].content[0] of type 'input_audio'"
    )
    # Values that ask for nothing pass, and top_k (Anthropic's own) is carried.
    body = to_anthropic(
        {"model": "m", "messages": user, "n": 1, "logprobs": False, "temperature": 1, "top_k": 5}
    )
    assert body["temperature"] == 1 and body["top_k"] == 5


# -- translation: Messages API replies -> the OpenAI API -----------------------------------------------------


def test_documented_tool_use_reply_with_thinking_and_cache_usage() -> None:
    reply = {
        "id": "msg_01Aq9w938a90dw8q", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
        "content": [
            {"type": "thinking", "thinking": "The user wants the weather.", "signature": "EqQBCgIYAhIM1gbcDa9GJwZA"},
            {"type": "text", "text": "I'll check the weather."},
            {"type": "tool_use", "id": "toolu_01A09q90qw90lq917835lq9", "name": "get_weather", "input": {"location": "San Francisco, CA"}},
        ],
        "stop_reason": "tool_use", "stop_sequence": None,
        "usage": {"input_tokens": 50, "cache_creation_input_tokens": 20, "cache_read_input_tokens": 100, "output_tokens": 30, "service_tier": "standard"},
    }  # fmt: skip
    out = openai_chat.response_to_json(am.response_from_json(reply, "claude"))
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] == "I'll check the weather."
    assert message["reasoning_content"] == "The user wants the weather."
    assert message["reasoning_signature"] == "EqQBCgIYAhIM1gbcDa9GJwZA"
    assert message["tool_calls"] == [
        {"id": "toolu_01A09q90qw90lq917835lq9", "type": "function", "function": {"name": "get_weather", "arguments": '{"location":"San Francisco, CA"}'}}
    ]  # fmt: skip
    assert out["usage"]["prompt_tokens"] == 170 and out["usage"]["completion_tokens"] == 30
    assert out["usage"]["total_tokens"] == 200
    assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == 100
    # The assistant message replayed as the SDK user appends it gives Anthropic its signed thinking back.
    again = to_anthropic({"model": "m", "messages": [{"role": "user", "content": "hi"}, message]})
    assert again["messages"][1]["content"] == reply["content"]
    # And back to the Messages API (the front), the reply is the same message.
    assert am.response_to_json(am.response_from_json(reply, "claude")) == reply
    for reason, finish in (
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("refusal", "content_filter"),
    ):
        resp = am.response_from_json(
            {**reply, "content": [{"type": "text", "text": "x"}], "stop_reason": reason}, "c"
        )
        assert resp.choices[0].finish_reason == finish


async def _events(items: list[tuple[str, dict[str, Any]]]) -> Any:
    for name, data in items:
        yield name, orjson.dumps(data)


async def test_documented_stream_events_translate() -> None:
    events = [
        ("message_start", {"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude", "content": [], "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 25, "cache_read_input_tokens": 10, "output_tokens": 1}}}),
        ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": "", "signature": ""}}),
        ("ping", {"type": "ping"}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "Let me think"}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "EqQBCg"}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("content_block_start", {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "Okay"}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 1}),
        ("content_block_start", {"type": "content_block_start", "index": 2, "content_block": {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": '{"location":'}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": ' "SF"}'}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 2}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None}, "usage": {"output_tokens": 89}}),
        ("message_stop", {"type": "message_stop"}),
    ]  # fmt: skip

    def on_error(error: dict[str, Any]) -> Exception:
        return RuntimeError(error)

    chunks = [c async for c in am.read_stream(_events(events), "claude", on_error)]
    out = [openai_chat.chunk_to_json(c) for c in chunks]
    deltas = [c["choices"][0]["delta"] for c in out if c["choices"]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert {"reasoning_content": "Let me think"} in deltas and {"reasoning_signature": "EqQBCg"} in deltas
    assert {"content": "Okay"} in deltas
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert calls[0] == {
        "index": 0,
        "id": "toolu_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": ""},
    }
    assert "".join(c["function"]["arguments"] for c in calls) == '{"location": "SF"}'
    assert out[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert out[-1]["choices"] == [] and out[-1]["usage"]["prompt_tokens"] == 35
    assert out[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] == 10
    # The hub stream written back as Anthropic's events is the same sequence of blocks.
    writer = am.EventWriter("claude")
    sse = b"".join(writer.feed(c) for c in chunks) + writer.end()
    names = [line[7:].decode() for line in sse.split(b"\n") if line.startswith(b"event: ")]
    assert names == [name for name, _ in events]


async def test_server_tool_blocks_and_citations_in_a_stream_travel_whole() -> None:
    """Anthropic's documented web search stream: the blocks the hub has no field for reach an Anthropic
    client as they came, and a text block's citations_delta too."""
    result = {
        "type": "web_search_tool_result",
        "tool_use_id": "srvtoolu_01",
        "content": [
            {
                "type": "web_search_result",
                "title": "Weather in NYC",
                "url": "https://example.com/nyc",
                "encrypted_content": "Ev0DCioIAxgC",
                "page_age": None,
            }
        ],
    }
    citation = {
        "type": "web_search_result_location",
        "cited_text": "Sunny, 75F",
        "url": "https://example.com/nyc",
        "title": "Weather in NYC",
        "encrypted_index": "Eo8BCioIAhgB",
    }
    events = [
        ("message_start", {"type": "message_start", "message": {"id": "msg_2", "type": "message", "role": "assistant", "model": "claude", "content": [], "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 2679, "output_tokens": 3}}}),
        ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ("ping", {"type": "ping"}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "I'll check"}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("content_block_start", {"type": "content_block_start", "index": 1, "content_block": {"type": "server_tool_use", "id": "srvtoolu_01", "name": "web_search", "input": {}}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": '{"query": "weather NYC today"}'}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 1}),
        ("content_block_start", {"type": "content_block_start", "index": 2, "content_block": result}),
        ("content_block_stop", {"type": "content_block_stop", "index": 2}),
        ("content_block_start", {"type": "content_block_start", "index": 3, "content_block": {"type": "text", "text": ""}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 3, "delta": {"type": "citations_delta", "citation": citation}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 3, "delta": {"type": "text_delta", "text": "Sunny."}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 3}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None}, "usage": {"output_tokens": 510, "server_tool_use": {"web_search_requests": 1}}}),
        ("message_stop", {"type": "message_stop"}),
    ]  # fmt: skip

    def on_error(error: dict[str, Any]) -> Exception:
        return RuntimeError(error)

    chunks = [c async for c in am.read_stream(_events(events), "claude", on_error)]
    writer = am.EventWriter("claude")
    sse = b"".join(writer.feed(c) for c in chunks) + writer.end()
    written = [orjson.loads(line[6:]) for line in sse.split(b"\n") if line.startswith(b"data: ")]
    blocks = [e for e in written if e["type"].startswith("content_block")]
    assert blocks[2:] == [data for _, data in events if data["type"].startswith("content_block")][2:]
    # An OpenAI client sees the blocks in its deltas' extra keys, never nothing.
    deltas = [openai_chat.chunk_to_json(c)["choices"][0]["delta"] for c in chunks if c.choices]
    assert {"anthropic_block": {"start": result, "deltas": []}} in deltas
    assert {"citation": citation} in deltas
    # A delta no block of its kind has is a malformed stream, not a silent loss.
    bad = [*events[:3], ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "future_delta"}})]  # fmt: skip
    with pytest.raises(ValueError, match="future_delta"):
        [c async for c in am.read_stream(_events(bad), "claude", on_error)]


# -- translation: the Messages front ---------------------------------------------------------------------

DOCUMENTED_REQUEST: dict[str, Any] = {
    "model": "demo-claude",
    "max_tokens": 2048,
    "system": [{"type": "text", "text": "You are a weather bot.", "cache_control": {"type": "ephemeral"}}],
    "thinking": {"type": "enabled", "budget_tokens": 1024},
    "tools": [WEATHER_TOOL],
    "tool_choice": {"type": "auto", "disable_parallel_tool_use": True},
    "messages": [
        {
            "role": "user",
            "content": [
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
                {"type": "text", "text": "What's the weather where this photo was taken?"},
            ],
        },
        {
            "role": "assistant",
            "content": [
                {
                    "type": "thinking",
                    "thinking": "I need a location.",
                    "signature": signature("I need a location."),
                },
                {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"location": "Paris"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_01", "content": "15 degrees", "is_error": False}
            ],
        },
    ],
    "temperature": 1,
    "top_k": 40,
    "stop_sequences": ["END"],
    "metadata": {"user_id": "u-1"},
}


def test_a_messages_request_crosses_the_hub_unchanged() -> None:
    body = copy.deepcopy(DOCUMENTED_REQUEST)
    del body["messages"][2]["content"][0]["is_error"]  # false asks for nothing and is not carried
    req, stream = am.request_from_json(copy.deepcopy(body), native=True)
    assert not stream
    sent = am.request_to_json(req, model="demo-claude", stream=False, default_max_tokens=1, provider="p")
    assert orjson.dumps(sent, option=orjson.OPT_SORT_KEYS) == orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
    # To another provider type, thinking becomes reasoning_effort, cache_control (a hint) is left out and
    # what only Anthropic can do (server tools, documents by URL) is refused.
    req, _ = am.request_from_json(copy.deepcopy(body), native=False)
    assert req.messages[0].content == "" and req.messages[0].parts[0].text == "You are a weather bot."
    assert req.reasoning_effort == "minimal" and req.parallel_tool_calls is False
    as_openai = openai_chat.request_to_json(req)
    assert as_openai["messages"][1]["content"][0]["image_url"]["url"] == f"data:image/png;base64,{PNG}"
    assert as_openai["messages"][3] == {"role": "tool", "tool_call_id": "toolu_01", "content": "15 degrees"}
    # A server tool's turn (documented web search example) reaches an Anthropic provider as it was.
    searched = {
        "model": "demo-claude",
        "max_tokens": 1024,
        "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 5}],
        "messages": [
            {"role": "user", "content": "How do I update a web app to TypeScript 5.5?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "I'll search for that."},
                    {"type": "server_tool_use", "id": "srvtoolu_01", "name": "web_search", "input": {"query": "TypeScript 5.5"}},
                    {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_01", "content": [{"type": "web_search_result", "url": "https://devblogs.microsoft.com", "title": "TS 5.5", "encrypted_content": "EqgfCioIARgB"}]},
                    {"type": "text", "text": "TypeScript 5.5 adds inferred type predicates."},
                ],
            },
            {"role": "user", "content": "thanks"},
        ],
    }  # fmt: skip
    req, _ = am.request_from_json(copy.deepcopy(searched), native=True)
    sent = am.request_to_json(req, model="demo-claude", stream=False, default_max_tokens=1, provider="p")
    assert sent == searched
    server_tool = {**copy.deepcopy(body), "tools": [{"type": "web_search_20250305", "name": "web_search"}]}
    with pytest.raises(GatewayError, match=r"tools\.0: tools of type 'web_search_20250305'"):
        am.request_from_json(server_tool, native=False)


# -- end to end: the OpenAI SDK against an anthropic provider ---------------------------------------------


def openai_sdk(server: ProxyServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{server.rest_port}/v1", api_key="unused", max_retries=0
    )


def anthropic_sdk(server: ProxyServer, key: str = "unused") -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(
        base_url=f"http://127.0.0.1:{server.rest_port}", api_key=key, max_retries=0
    )


async def _openai_turn(
    client: openai.AsyncOpenAI, messages: list[Any], stream: bool, **extra: Any
) -> dict[str, Any]:
    if not stream:
        reply = await client.chat.completions.create(
            model="demo-claude", messages=messages, tools=[WEATHER], **extra
        )  # type: ignore[list-item]
        assert reply.usage is not None and reply.usage.prompt_tokens > 0
        return reply.choices[0].message.model_dump(exclude_unset=True, exclude_none=True)
    calls: dict[int, dict[str, Any]] = {}
    content, reasoning, signature_parts = [], [], []
    finish = None
    usage = None
    stream_ = await client.chat.completions.create(
        model="demo-claude", messages=messages, tools=[WEATHER], stream=True,  # type: ignore[list-item]
        stream_options={"include_usage": True}, **extra,
    )  # fmt: skip
    async for chunk in stream_:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            delta = choice.delta.model_dump()
            content.append(delta.get("content") or "")
            reasoning.append(delta.get("reasoning_content") or "")
            signature_parts.append(delta.get("reasoning_signature") or "")
            for d in choice.delta.tool_calls or ():
                call = calls.setdefault(
                    d.index, {"id": "", "type": "function", "function": {"name": "", "arguments": ""}}
                )
                call["id"] += d.id or ""
                if d.function is not None:
                    call["function"]["name"] += d.function.name or ""
                    call["function"]["arguments"] += d.function.arguments or ""
    assert usage is not None and usage.prompt_tokens > 0
    message: dict[str, Any] = {"role": "assistant", "content": "".join(content)}
    if any(reasoning):
        message["reasoning_content"] = "".join(reasoning)
        message["reasoning_signature"] = "".join(signature_parts)
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
        assert finish == "tool_calls"
    return message


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
async def test_openai_sdk_tool_loop_with_thinking_against_anthropic(
    fakes: Fakes, start_proxy: Any, stream: bool
) -> None:
    server = await start_proxy(proxy_config(fakes))
    client = openai_sdk(server)
    messages: list[Any] = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "weather in Paris"},
    ]
    first = await _openai_turn(client, messages, stream, reasoning_effort="low")
    assert first["tool_calls"][0]["function"] == {
        "name": "get_weather",
        "arguments": '{"location":"weather in Paris"}',
    }
    assert first["reasoning_content"] == "Thinking about: weather in Paris"
    assert first["reasoning_signature"] == signature("Thinking about: weather in Paris")
    messages.append(first)
    messages.append({"role": "tool", "tool_call_id": first["tool_calls"][0]["id"], "content": "sunny"})
    second = await _openai_turn(client, messages, stream, reasoning_effort="low")
    assert "sunny" in second["content"] and "tool_calls" not in second
    sent = fakes.anthropic.received[-1]
    assert sent["system"] == "be brief" and sent["thinking"]["type"] == "enabled"
    # The signed thinking went back (the fake refuses a wrong signature), then the tool call and its result.
    assert [b["type"] for b in sent["messages"][1]["content"]] == ["thinking", "tool_use"]
    assert sent["messages"][2]["content"][0] == {
        "type": "tool_result",
        "tool_use_id": first["tool_calls"][0]["id"],
        "content": "sunny",
    }


async def test_openai_sdk_json_schema_and_cache_usage_against_anthropic(
    fakes: Fakes, start_proxy: Any
) -> None:
    server = await start_proxy(proxy_config(fakes))
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    reply = await openai_sdk(server).chat.completions.create(
        model="demo-claude",
        messages=[{"role": "user", "content": "one two three"}, {"role": "assistant", "content": "four"}, {"role": "user", "content": "five"}],
        response_format={"type": "json_schema", "json_schema": {"name": "place", "schema": schema}},
        extra_body={"top_k": 3},
    )  # fmt: skip
    assert reply.choices[0].message.content == '{"city":"five"}' and reply.choices[0].finish_reason == "stop"
    assert fakes.anthropic.received[-1]["tool_choice"] == {"type": "tool", "name": "place"}
    # cache_control (Anthropic's own, here in a system block from the Messages front) brings cache usage.
    msg = await anthropic_sdk(server).messages.create(
        model="demo-claude", max_tokens=50,
        system=[{"type": "text", "text": "cached system prompt", "cache_control": {"type": "ephemeral"}}],
        messages=[{"role": "user", "content": "hi"}], tools=[WEATHER_TOOL], tool_choice={"type": "none"},  # type: ignore[list-item]
    )  # fmt: skip
    assert msg.usage.cache_read_input_tokens == 3 and msg.usage.input_tokens == 1


# -- end to end: the anthropic SDK on the Messages front ------------------------------------------------


@pytest.mark.parametrize(
    "model", ["demo-claude", "rest-only", "grpc-only"], ids=["to-anthropic", "to-openai", "to-llmgateway"]
)
async def test_anthropic_sdk_create_with_tools_and_thinking(
    fakes: Fakes, start_proxy: Any, model: str
) -> None:
    server = await start_proxy(proxy_config(fakes))
    client = anthropic_sdk(server)
    params: dict[str, Any] = {
        "max_tokens": 2048,
        "tools": [WEATHER_TOOL],
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "messages": [{"role": "user", "content": "weather in Paris"}],
    }
    msg = await client.messages.create(model=model, **params)
    assert msg.stop_reason == "tool_use"
    assert [b.type for b in msg.content] == ["thinking", "tool_use"]
    assert msg.content[0].thinking == "Thinking about: weather in Paris"  # type: ignore[union-attr]
    tool_use = msg.content[1]
    assert tool_use.name == "get_weather" and tool_use.input == {"location": "weather in Paris"}  # type: ignore[union-attr]
    if model == "demo-claude":  # the body reached the provider unchanged but for the model name
        assert fakes.anthropic.received[-1] == {**params, "model": "demo-claude"}
    elif model == "rest-only":
        assert fakes.openai.received[-1]["reasoning_effort"] == "minimal"
    else:
        assert fakes.grpc.received[-1].reasoning_effort == "minimal"
    params["messages"] += [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in msg.content]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": tool_use.id, "content": "sunny"}],
        },  # type: ignore[union-attr]
    ]
    final = await client.messages.create(model=model, **params)
    assert final.stop_reason == "end_turn" and "sunny" in final.content[-1].text  # type: ignore[union-attr]
    assert final.usage.input_tokens > 0 and final.usage.output_tokens > 0
    if model == "demo-claude":
        assert fakes.anthropic.received[-1] == {**params, "model": "demo-claude"}


@pytest.mark.parametrize(
    "model", ["demo-claude", "rest-only", "grpc-only"], ids=["to-anthropic", "to-openai", "to-llmgateway"]
)
async def test_anthropic_sdk_stream_with_tools_and_thinking(
    fakes: Fakes, start_proxy: Any, model: str
) -> None:
    server = await start_proxy(proxy_config(fakes))
    async with anthropic_sdk(server).messages.stream(
        model=model, max_tokens=2048, tools=[WEATHER_TOOL],  # type: ignore[list-item]
        thinking={"type": "enabled", "budget_tokens": 1024},
        messages=[{"role": "user", "content": "weather in Paris"}],
    ) as stream:  # fmt: skip
        kinds = [event.type async for event in stream]
        msg = await stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "thinking" in kinds and "input_json" in kinds
    assert msg.stop_reason == "tool_use" and [b.type for b in msg.content] == ["thinking", "tool_use"]
    assert msg.content[1].input == {"location": "weather in Paris"}  # type: ignore[union-attr]
    assert msg.usage.output_tokens > 0 and msg.usage.input_tokens > 0
    if model == "demo-claude":
        assert msg.content[0].signature == signature("Thinking about: weather in Paris")  # type: ignore[union-attr]
    # The raw sequence: message_start, a block's start, ping, deltas, its stop, ..., message_delta, message_stop.
    async with aiohttp.ClientSession() as session:
        body = {
            "model": model,
            "max_tokens": 50,
            "stream": True,
            "messages": [{"role": "user", "content": "hi"}],
        }
        async with session.post(f"http://127.0.0.1:{server.rest_port}/v1/messages", json=body) as resp:
            assert resp.status == 200 and resp.headers["content-type"].startswith("text/event-stream")
            names = [line[7:].strip().decode() async for line in resp.content if line.startswith(b"event: ")]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert set(names[3:-3]) == {"content_block_delta"}
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]


# -- errors in Anthropic's shape --------------------------------------------------------------------------


async def test_errors_in_anthropics_shape(fakes: Fakes, start_proxy: Any, tmp_path: pathlib.Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("client-key\n")
    server = await start_proxy(proxy_config(fakes, auth={"apiKeysFile": str(keys)}))
    good = anthropic_sdk(server, "client-key")
    with pytest.raises(anthropic.AuthenticationError) as auth:
        await anthropic_sdk(server, "wrong").messages.create(
            model="demo-claude", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
        )
    assert auth.value.body == {
        "type": "error",
        "error": {"type": "authentication_error", "message": "invalid API key"},
    }
    ok = await good.messages.create(
        model="demo-claude", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
    )
    assert ok.stop_reason == "max_tokens"
    with pytest.raises(anthropic.BadRequestError) as bad:
        await good.messages.create(model="nope", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert bad.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert "unknown model 'nope'" in bad.value.body["error"]["message"]  # type: ignore[index]
    with pytest.raises(
        anthropic.BadRequestError, match="temperature: Input should be a number between 0 and 1"
    ):
        await good.messages.create(
            model="rest-only",
            max_tokens=5,
            extra_body={"temperature": 1.5},
            messages=[{"role": "user", "content": "hi"}],
        )
    # The SDK insists on max_tokens: a raw request without.
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"http://127.0.0.1:{server.rest_port}/v1/messages",
            json={"model": "demo-claude", "messages": [{"role": "user", "content": "hi"}]},
            headers={"x-api-key": "client-key", "anthropic-version": "2023-06-01"},
        ) as resp,
    ):
        assert resp.status == 400
        assert (await resp.json())["error"]["message"].startswith("max_tokens: Field required")
    # An overloaded upstream is Anthropic's overloaded_error, HTTP 529.
    fakes.anthropic.faults.update({"fail_next": 3, "error_status": 529})  # every attempt
    with pytest.raises(anthropic.APIStatusError) as overloaded:
        await good.messages.create(
            model="demo-claude", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
        )
    assert (
        overloaded.value.status_code == 529 and overloaded.value.body["error"]["type"] == "overloaded_error"
    )  # type: ignore[index]
    # A stream that breaks midway ends with an error event, which the SDK raises.
    fakes.anthropic.faults.update({"stream_error_after_tokens": 2, "error_status": 529})
    with pytest.raises(anthropic.APIStatusError, match="overloaded"):
        async with good.messages.stream(
            model="demo-claude", max_tokens=50, messages=[{"role": "user", "content": "hi"}]
        ) as stream:
            async for _ in stream:
                pass
    fakes.anthropic.faults.update({"stream_error_after_tokens": -1})
    # count_tokens: passed to the anthropic provider; a model served by another type gets a clear 400.
    counted = await good.messages.count_tokens(
        model="demo-claude", messages=[{"role": "user", "content": "one two three"}]
    )
    assert counted.input_tokens == 3
    with pytest.raises(anthropic.BadRequestError, match="not served by an Anthropic provider"):
        await good.messages.count_tokens(model="rest-only", messages=[{"role": "user", "content": "hi"}])


def _masked(value: Any) -> Any:
    """``value`` without what differs between two answers of the fake: ids."""
    if isinstance(value, dict):
        return {k: ("*" if k in ("id", "tool_use_id") else _masked(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [_masked(v) for v in value]
    return value


async def _raw(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> Any:
    headers = {"x-api-key": "k", "anthropic-version": "2023-06-01"}
    async with session.post(url, json=body, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        if not body.get("stream"):
            return await resp.json()
        return [orjson.loads(line[6:]) async for line in resp.content if line.startswith(b"data: ")]


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
async def test_answers_reach_the_anthropic_client_unchanged(
    fakes: Fakes, start_proxy: Any, stream: bool
) -> None:
    """What an anthropic provider answers reaches a Messages API client as it was (ids aside); a stream's
    only difference is that input_tokens come with message_delta rather than message_start."""
    server = await start_proxy(proxy_config(fakes))
    body = {
        "model": "demo-claude",
        "max_tokens": 2048,
        "stream": stream,
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "tools": [WEATHER_TOOL],
        "system": [{"type": "text", "text": "a cached prompt", "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": "weather in Paris"}],
    }
    async with aiohttp.ClientSession() as session:
        direct = await _raw(session, f"{fakes.anthropic.base_url}/v1/messages", body)
        via = await _raw(session, f"http://127.0.0.1:{server.rest_port}/v1/messages", body)
    if not stream:
        assert _masked(via) == _masked(direct)
        return
    assert [e["type"] for e in via] == [e["type"] for e in direct]
    assert _masked(via[1:-2]) == _masked(direct[1:-2])  # every block's events
    assert via[-2]["delta"] == direct[-2]["delta"]
    assert via[-2]["usage"]["output_tokens"] == direct[-2]["usage"]["output_tokens"]
    assert via[-2]["usage"]["input_tokens"] == direct[0]["message"]["usage"]["input_tokens"]


async def test_grpc_front_tools_against_anthropic(fakes: Fakes, start_proxy: Any) -> None:
    """A gRPC client's tools reach an anthropic provider; its stream comes back in either chunk layout."""
    server = await start_proxy(proxy_config(fakes))
    request, _ = openai_chat.request_from_json(
        {
            "model": "demo-claude",
            "messages": [{"role": "user", "content": "weather in Paris"}],
            "tools": [WEATHER],
        }
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = pb_grpc.LLMServiceStub(channel)
        reply = await stub.ChatCompletion(request)
        assert reply.finish_reason == pb.FINISH_REASON_TOOL_CALLS
        assert reply.choices[0].message.tool_calls[0].arguments == '{"location":"weather in Paris"}'
        chunks = [c async for c in stub.StreamingChat(request)]  # the simple layout
        assert chunks[-1].finish_reason == pb.FINISH_REASON_TOOL_CALLS and chunks[-1].usage.prompt_tokens == 3
        fragments = [d.arguments for c in chunks for ch in c.choices for d in ch.delta.tool_calls]
        assert "".join(fragments) == '{"location":"weather in Paris"}'
        request.chunk_layout = pb.CHUNK_LAYOUT_OPENAI
        chunks = [c async for c in stub.StreamingChat(request)]
        assert chunks[-1].choices[0].finish_reason == "tool_calls" and not any(
            c.HasField("usage") for c in chunks
        )


def test_a_reply_with_server_tool_blocks_and_citations_is_kept_whole() -> None:
    reply = {
        "id": "msg_01", "type": "message", "role": "assistant", "model": "claude",
        "content": [
            {"type": "text", "text": "I'll search."},
            {"type": "server_tool_use", "id": "srvtoolu_01", "name": "web_search", "input": {"query": "claude shannon birth date"}},
            {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_01", "content": [{"type": "web_search_result", "url": "https://en.wikipedia.org/wiki/Claude_Shannon", "title": "Claude Shannon", "encrypted_content": "EqgfCioIARgB", "page_age": "April 30, 2025"}]},
            {"type": "text", "text": "Claude Shannon was born on April 30, 1916.", "citations": [{"type": "web_search_result_location", "url": "https://en.wikipedia.org/wiki/Claude_Shannon", "title": "Claude Shannon", "encrypted_index": "Eo8BCioIAhgB", "cited_text": "Claude Elwood Shannon (April 30, 1916"}]},
        ],
        "stop_reason": "end_turn", "stop_sequence": None,
        "usage": {"input_tokens": 6039, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0, "output_tokens": 931, "server_tool_use": {"web_search_requests": 1}},
    }  # fmt: skip
    resp = am.response_from_json(reply, "claude")
    assert am.response_to_json(resp) == reply
    message = openai_chat.response_to_json(resp)["choices"][0]["message"]
    assert message["content"] == "I'll search.Claude Shannon was born on April 30, 1916."
    again = to_anthropic({"model": "m", "messages": [{"role": "user", "content": "when?"}, message]})
    assert again["messages"][1]["content"] == reply["content"]


async def test_anthropic_beta_reaches_the_anthropic_provider(fakes: Fakes, start_proxy: Any) -> None:
    """The client's betas go on to an Anthropic provider (beside the provider's own); other providers never
    see the header; a malformed one is a clear 400."""
    config = proxy_config(fakes)
    config["providers"][1]["headers"] = {"anthropic-beta": "prompt-caching-2024-07-31"}
    server = await start_proxy(config)
    client = anthropic_sdk(server)
    betas = ["interleaved-thinking-2025-05-14", "context-1m-2025-08-07"]
    user = [{"role": "user", "content": "hi"}]
    await client.beta.messages.create(model="demo-claude", max_tokens=5, messages=user, betas=betas)  # type: ignore[arg-type]
    assert fakes.anthropic.received_betas[-1] == [",".join(betas), "prompt-caching-2024-07-31"]
    async with client.beta.messages.stream(
        model="demo-claude",
        max_tokens=5,
        messages=user,
        betas=betas,  # type: ignore[arg-type]
    ) as stream:
        async for _ in stream:
            pass
    assert fakes.anthropic.received_betas[-1] == [",".join(betas), "prompt-caching-2024-07-31"]
    await client.beta.messages.count_tokens(model="demo-claude", messages=user, betas=betas)  # type: ignore[arg-type]
    sent, configured = fakes.anthropic.received_betas[-1]  # the SDK adds token-counting's own beta
    assert set(betas) <= set(sent.split(",")) and configured == "prompt-caching-2024-07-31"
    # Without betas: only the provider's own.
    await client.messages.create(model="demo-claude", max_tokens=5, messages=user)  # type: ignore[arg-type]
    assert fakes.anthropic.received_betas[-1] == ["prompt-caching-2024-07-31"]
    # To an OpenAI-compatible provider the header is not sent (the body's fields are translated).
    await client.beta.messages.create(model="rest-only", max_tokens=5, messages=user, betas=betas)  # type: ignore[arg-type]
    assert "anthropic_beta" not in fakes.openai.received[-1]
    with pytest.raises(anthropic.BadRequestError, match="anthropic-beta: 'a b' is not a beta name"):
        await client.messages.create(
            model="demo-claude",
            max_tokens=5,
            messages=user,
            extra_headers={"anthropic-beta": "a b"},  # type: ignore[arg-type]
        )


async def test_paths_of_the_messages_api_not_served_answer_in_anthropics_shape(
    fakes: Fakes, start_proxy: Any
) -> None:
    server = await start_proxy(proxy_config(fakes))
    client = anthropic_sdk(server)
    with pytest.raises(anthropic.NotFoundError) as missing:
        await client.messages.batches.list()
    error = missing.value.body["error"]  # type: ignore[index]
    assert error["type"] == "not_found_error" and "no route for GET /v1/messages/batches" in error["message"]
    base = f"http://127.0.0.1:{server.rest_port}"
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/v1/messages") as resp:
            body = await resp.json()
            assert resp.status == 405 and resp.headers["Allow"] == "POST"
            assert body == {
                "type": "error",
                "error": {"type": "invalid_request_error", "message": "/v1/messages accepts POST, not GET"},
            }
        async with session.get(f"{base}/v1/nothing") as resp:  # elsewhere: OpenAI's shape
            assert resp.status == 404 and (await resp.json())["error"]["code"] == "not_found"
