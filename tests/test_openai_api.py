"""The whole OpenAI Chat Completions API through the gateway: the official ``openai`` SDK on the REST front,
grpcio on the gRPC front, recording fake providers behind openai and llmgateway (gRPC) providers.

What the client sends reaches an OpenAI-compatible upstream unchanged but for the model name (compared as
JSON text with sorted keys, so 1 and 1.0 differ), through the protobuf messages in between; what the upstream
answers reaches the client unchanged but for the model name (ids and timestamps aside, which differ between
two calls of the fake).
"""

from __future__ import annotations

import copy
from typing import Any

import aiohttp
import grpc
import hypothesis
import openai
import orjson
import pydantic
import pytest
from hypothesis import strategies as st

from conftest import Fakes, proxy_config
from llmgateway.v1 import llm_service_pb2 as pb
from llmgateway.v1 import llm_service_pb2_grpc as pb_grpc
from llmgw.client import LLMGrpcClient, LLMHttpClient
from llmgw.codecs import openai_chat
from llmgw.errors import GatewayError
from llmgw.server import ProxyServer

USER = [{"role": "user", "content": "hello there"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather of a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer", "minimum": 1, "maximum": 10.0},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}
IMAGE = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="

# One request field (or message shape) each: it must reach the upstream exactly.
FIELDS: dict[str, dict[str, Any]] = {
    "tools": {"tools": [WEATHER]},
    "tool_choice_required": {"tools": [WEATHER], "tool_choice": "required"},
    "tool_choice_function": {
        "tools": [WEATHER],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    },
    "parallel_tool_calls": {"tools": [WEATHER], "parallel_tool_calls": False},
    "custom_tool": {"tools": [{"type": "custom", "custom": {"name": "grep", "description": "search"}}]},
    "response_format_json_object": {"response_format": {"type": "json_object"}},
    "response_format_json_schema": {
        "response_format": {
            "type": "json_schema",
            "json_schema": {
                "name": "answer",
                "schema": {"type": "object", "properties": {"n": {"type": "number", "minimum": 0.0}}},
                "strict": True,
            },
        }
    },
    "n": {"n": 2},
    "seed": {"seed": 12345678901},
    "logprobs": {"logprobs": True, "top_logprobs": 3},
    "presence_penalty": {"presence_penalty": 0.5},
    "frequency_penalty": {"frequency_penalty": -0.25},
    "logit_bias": {"logit_bias": {"50256": -100, "1234": 5}},
    "max_tokens": {"max_tokens": 7},
    "max_completion_tokens": {"max_completion_tokens": 9},
    "reasoning_effort": {"reasoning_effort": "low"},
    "stop_string": {"stop": "zzz"},
    "stop_list": {"stop": ["zzz", "yyy"]},
    "temperature_float64": {"temperature": 0.123456789},
    "temperature_int": {"temperature": 1},
    "top_p": {"top_p": 0.9},
    "service_tier": {"service_tier": "flex"},
    "store": {"store": True},
    "metadata": {"metadata": {"team": "a", "run": "7"}},
    "user": {"user": "user-1"},
    "prediction": {"prediction": {"type": "content", "content": "hello there"}},
    "modalities": {"modalities": ["text"]},
    "vendor_extras": {
        "extra_body": {
            "top_k": 20,
            "min_p": 0.05,
            "repetition_penalty": 1.1,
            "chat_template_kwargs": {"enable_thinking": False},
        }
    },
    "null_fields": {"extra_body": {"seed": None, "tools": None, "temperature": None}},
    "unknown_openai_fields": {
        "extra_body": {"verbosity": "low", "web_search_options": {}, "prompt_cache_key": "k"}
    },
    "stream_false": {"stream": False},
    "image": {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is this"},
                    {"type": "image_url", "image_url": {"url": IMAGE, "detail": "high"}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
                ],
            }
        ]
    },
    "input_audio_and_file": {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
                    {
                        "type": "file",
                        "file": {"file_data": "data:application/pdf;base64,JVBERi0=", "filename": "a.pdf"},
                    },
                    {"type": "file", "file": {"file_id": "file-abc"}},
                ],
            }
        ]
    },
    "roles_and_names": {
        "messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "system", "content": [{"type": "text", "text": "really brief"}]},
            {"role": "user", "content": "hi", "name": "alice"},
        ]
    },
    "tool_turn": {
        "tools": [WEATHER],
        "messages": [
            {"role": "user", "content": "weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "refusal": None,
                "annotations": [],
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Paris","days":1}'},
                    },
                    {"id": "call_2", "type": "custom", "custom": {"name": "grep", "input": "x"}},
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "found"}]},
        ],
    },
    "assistant_refusal_and_reasoning": {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "", "refusal": "no", "reasoning_content": "hmm"},
            {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]},
            {"role": "user", "content": "please"},
        ]
    },
}


def sdk(server: ProxyServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{server.rest_port}/v1", api_key="unused", max_retries=0
    )


def canonical(value: Any) -> bytes:
    """JSON text with sorted keys: equal only if the values are the same JSON, 1 and 1.0 apart."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def sent_body(params: dict[str, Any], model: str = "demo-model") -> dict[str, Any]:
    """The JSON the SDK sends for ``params``, with ``model`` for the name."""
    body = {"messages": USER, **copy.deepcopy(params)}
    body.update(body.pop("extra_body", {}))
    body["model"] = model
    return body


def upstream_json(fakes: Fakes, route: str) -> dict[str, Any]:
    """The JSON the route's fake received last (the gRPC fake's request through the gateway's codec)."""
    if route == "rest-only":
        return fakes.openai.received[-1]  # type: ignore[no-any-return]
    request = fakes.grpc.received[-1]
    body = openai_chat.request_to_json(request)
    if request.chunk_layout == pb.CHUNK_LAYOUT_OPENAI:
        body["stream"] = True
    return body


@pytest.mark.parametrize("route", ["rest-only", "grpc-only"])
@pytest.mark.parametrize("field", list(FIELDS))
async def test_each_field_reaches_the_upstream_exactly(
    fakes: Fakes, start_proxy: Any, route: str, field: str
) -> None:
    server = await start_proxy(proxy_config(fakes))
    params = {"messages": USER, **copy.deepcopy(FIELDS[field])}
    await sdk(server).chat.completions.create(model=route, **params)
    assert canonical(upstream_json(fakes, route)) == canonical(sent_body(FIELDS[field]))


async def test_each_field_reaches_the_upstream_exactly_from_the_grpc_front(
    fakes: Fakes, start_proxy: Any
) -> None:
    """The same requests, built as protobuf by a gRPC client, reach the OpenAI upstream as the same JSON."""
    server = await start_proxy(proxy_config(fakes))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = pb_grpc.LLMServiceStub(channel)
        for field, params in FIELDS.items():
            request, _ = openai_chat.request_from_json(sent_body(params, model="rest-only"))
            await stub.ChatCompletion(request)
            assert canonical(fakes.openai.received[-1]) == canonical(sent_body(params)), field


STREAMED = ("tools", "logprobs", "seed", "vendor_extras", "image", "metadata", "stop_string")


@pytest.mark.parametrize("route", ["rest-only", "grpc-only"])
async def test_a_streamed_request_reaches_the_upstream_exactly(
    fakes: Fakes, start_proxy: Any, route: str
) -> None:
    server = await start_proxy(proxy_config(fakes))
    params: dict[str, Any] = {
        "stream": True,
        "stream_options": {"include_usage": False},
        "extra_body": {"user": None},
    }
    for name in STREAMED:
        extra = copy.deepcopy(FIELDS[name])
        params["extra_body"] = {**params.get("extra_body", {}), **extra.pop("extra_body", {})}
        params.update(extra)
    stream = await sdk(server).chat.completions.create(model=route, **params)
    chunks = [c async for c in stream]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert canonical(upstream_json(fakes, route)) == canonical(sent_body(params))


# -- answers unchanged ----------------------------------------------------------------------------------


def _masked(value: Any) -> Any:
    """``value`` without what differs between two answers of the fake: ids and creation times."""
    if isinstance(value, dict):
        return {k: ("*" if k in ("id", "created") else _masked(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [_masked(v) for v in value]
    return value


async def _post(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> Any:
    async with session.post(url, json=body) as resp:
        assert resp.status == 200, await resp.text()
        if not body.get("stream"):
            return await resp.json()
        events = []
        async for line in resp.content:
            if line.startswith(b"data: "):
                data = line[6:].strip()
                events.append(data.decode() if data == b"[DONE]" else orjson.loads(data))
        return events


RICH = {
    "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what now"}],
    "reasoning_effort": "high",
    "logprobs": True,
    "top_logprobs": 2,
    "n": 2,
}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    "extra",
    [{}, {"tools": [WEATHER]}, {"response_format": {"type": "json_object"}}],
    ids=["text", "tools", "json"],
)
async def test_answers_reach_the_client_unchanged(
    fakes: Fakes, start_proxy: Any, stream: bool, extra: dict[str, Any]
) -> None:
    server = await start_proxy(proxy_config(fakes))
    body: dict[str, Any] = {"model": "demo-model", **RICH, **extra}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    async with aiohttp.ClientSession() as session:
        direct = await _post(session, f"{fakes.openai.base_url}/chat/completions", body)
        for route in ("rest-only", "grpc-only"):
            via = await _post(
                session, f"http://127.0.0.1:{server.rest_port}/v1/chat/completions", {**body, "model": route}
            )
            assert _masked(via) == _masked(direct), route
    if stream:
        assert direct[-1] == "[DONE]" and direct[-2]["choices"] == [] and direct[-2]["usage"]["total_tokens"]
    else:
        assert direct["usage"]["completion_tokens_details"]["reasoning_tokens"] > 0


# -- the agent loop ---------------------------------------------------------------------------------------


async def _sdk_turn(
    client: openai.AsyncOpenAI, route: str, messages: list[Any], stream: bool
) -> dict[str, Any]:
    """One turn through the SDK; the assistant message as the SDK user would append it."""
    if not stream:
        reply = await client.chat.completions.create(model=route, messages=messages, tools=[WEATHER])  # type: ignore[list-item]
        return reply.choices[0].message.model_dump(exclude_unset=True)
    calls: dict[int, dict[str, Any]] = {}
    content: list[str] = []
    finish = None
    async with await client.chat.completions.create(
        model=route,
        messages=messages,
        tools=[WEATHER],
        stream=True,  # type: ignore[list-item]
    ) as chunks:
        async for chunk in chunks:
            for choice in chunk.choices:
                finish = choice.finish_reason or finish
                content.append(choice.delta.content or "")
                for d in choice.delta.tool_calls or ():
                    call = calls.setdefault(
                        d.index, {"id": "", "type": "function", "function": {"name": "", "arguments": ""}}
                    )
                    call["id"] += d.id or ""
                    if d.function is not None:
                        call["function"]["name"] += d.function.name or ""
                        call["function"]["arguments"] += d.function.arguments or ""
    message: dict[str, Any] = {"role": "assistant", "content": "".join(content) or None}
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
        assert finish == "tool_calls"
    return message


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("route", ["rest-only", "grpc-only"])
async def test_tool_agent_loop_through_the_rest_front(
    fakes: Fakes, start_proxy: Any, route: str, stream: bool
) -> None:
    server = await start_proxy(proxy_config(fakes))
    client = sdk(server)
    messages: list[Any] = [{"role": "user", "content": "weather in Paris"}]
    for turn in range(2):
        message = await _sdk_turn(client, route, messages, stream)
        messages.append(message)
        if not message.get("tool_calls"):
            break
        call = message["tool_calls"][0]
        assert call["function"]["name"] == "get_weather"
        assert orjson.loads(call["function"]["arguments"]) == {"city": "weather in Paris", "days": 42}
        messages.append({"role": "tool", "tool_call_id": call["id"], "content": f"sunny {turn}"})
        # What the upstream received is the conversation as the client sent it, tool turns included.
        await client.chat.completions.create(model=route, messages=messages, tools=[WEATHER], max_tokens=6)
        expected = {"model": "demo-model", "messages": messages, "tools": [WEATHER], "max_tokens": 6}
        assert canonical(upstream_json(fakes, route)) == canonical(expected)
    assert len(messages) == 4
    assert messages[-1]["content"].startswith("This is a fake reply to: sunny 0")


async def test_tools_through_the_grpc_front(fakes: Fakes, start_proxy: Any) -> None:
    server = await start_proxy(proxy_config(fakes))
    tool = pb.Tool(
        type="function",
        function=pb.FunctionDefinition(
            name="get_weather", parameters_json=orjson.dumps(WEATHER["function"]["parameters"]).decode()
        ),
    )
    request = pb.ChatRequest(
        model="rest-only",
        messages=[pb.ChatMessage(role=pb.ROLE_USER, content="weather in Rome")],
        tools=[tool],
        tool_choice=pb.ToolChoice(mode="auto"),
        extra_json='{"top_k": 5}',
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = pb_grpc.LLMServiceStub(channel)
        for model in ("rest-only", "grpc-only"):
            request.model = model
            reply = await stub.ChatCompletion(request)
            assert reply.finish_reason == pb.FINISH_REASON_TOOL_CALLS
            (call,) = reply.choices[0].message.tool_calls
            assert (call.name, orjson.loads(call.arguments)) == (
                "get_weather",
                {"city": "weather in Rome", "days": 42},
            )
            assert reply.usage.prompt_tokens_details.HasField("cached_tokens")
            received = upstream_json(fakes, model)
            assert (
                received["top_k"] == 5
                and received["tools"][0]["function"]["parameters"] == WEATHER["function"]["parameters"]
            )

            streamed = pb.ChatRequest()
            streamed.CopyFrom(request)
            streamed.chunk_layout = pb.CHUNK_LAYOUT_OPENAI
            streamed.stream_options.include_usage = True
            chunks = [c async for c in stub.StreamingChat(streamed)]
            deltas = [d for c in chunks for ch in c.choices for d in ch.delta.tool_calls]
            assert deltas[0].id == call.id or deltas[0].id.startswith("call_")
            assert deltas[0].name == "get_weather" and len(deltas) > 2, "arguments come in fragments"
            assert orjson.loads("".join(d.arguments for d in deltas)) == orjson.loads(call.arguments)
            assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
            assert not chunks[-1].choices and chunks[-1].usage.total_tokens > 0, "the usage chunk comes last"

            # The simple layout keeps what its delta cannot say in the chunks' choices.
            legacy = [c async for c in stub.StreamingChat(request)]
            fragments = [d.arguments for c in legacy for ch in c.choices for d in ch.delta.tool_calls]
            assert orjson.loads("".join(fragments)) == orjson.loads(call.arguments)
            assert legacy[-1].finish_reason == pb.FINISH_REASON_TOOL_CALLS and legacy[-1].usage.total_tokens

            # A gRPC client of the simple layout still gets text chunks and one final chunk with the usage.
            plain = pb.ChatRequest(model=model, messages=[pb.ChatMessage(role=pb.ROLE_USER, content="hi")])
            simple = [c async for c in stub.StreamingChat(plain)]
            assert all(not c.choices for c in simple) and simple[-1].finish_reason == pb.FINISH_REASON_STOP
            assert simple[-1].usage.completion_tokens == 20 and "".join(c.delta for c in simple).startswith(
                "This is"
            )


def _grpc_tool() -> pb.Tool:
    parameters = orjson.dumps(WEATHER["function"]["parameters"]).decode()
    return pb.Tool(
        type="function", function=pb.FunctionDefinition(name="get_weather", parameters_json=parameters)
    )


async def _grpc_turn(stub: Any, request: pb.ChatRequest, stream: bool) -> pb.ChatMessage:
    """One turn on the gRPC front; the assistant message to append to the conversation."""
    if not stream:
        reply = await stub.ChatCompletion(request)
        return reply.choices[0].message  # type: ignore[no-any-return]
    streamed = pb.ChatRequest()
    streamed.CopyFrom(request)
    streamed.chunk_layout = pb.CHUNK_LAYOUT_OPENAI
    message = pb.ChatMessage(role=pb.ROLE_ASSISTANT)
    calls: dict[int, pb.ToolCall] = {}
    text = []
    async for chunk in stub.StreamingChat(streamed):
        for choice in chunk.choices:
            text.append(choice.delta.content)
            for d in choice.delta.tool_calls:
                call = calls.setdefault(d.index, pb.ToolCall(type="function"))
                call.id += d.id
                call.name += d.name
                call.arguments += d.arguments
    if calls:
        message.tool_calls.extend(calls[i] for i in sorted(calls))
    else:
        message.content = "".join(text)
    return message


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("route", ["rest-only", "grpc-only"])
async def test_tool_agent_loop_through_the_grpc_front(
    fakes: Fakes, start_proxy: Any, route: str, stream: bool
) -> None:
    server = await start_proxy(proxy_config(fakes))
    request = pb.ChatRequest(
        model=route,
        messages=[pb.ChatMessage(role=pb.ROLE_USER, content="weather in Rome")],
        tools=[_grpc_tool()],
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = pb_grpc.LLMServiceStub(channel)
        first = await _grpc_turn(stub, request, stream)
        (call,) = first.tool_calls
        assert call.name == "get_weather" and call.id.startswith("call_")
        assert orjson.loads(call.arguments) == {"city": "weather in Rome", "days": 42}
        request.messages.append(first)
        request.messages.append(pb.ChatMessage(role=pb.ROLE_TOOL, tool_call_id=call.id, content="rainy"))
        second = await _grpc_turn(stub, request, stream)
        assert second.content.startswith("This is a fake reply to: rainy") and not second.tool_calls
    received = upstream_json(fakes, route)
    assert received["messages"][1]["tool_calls"] == [
        {"id": call.id, "type": "function", "function": {"name": "get_weather", "arguments": call.arguments}}
    ]
    assert received["messages"][2] == {"role": "tool", "tool_call_id": call.id, "content": "rainy"}


@pytest.mark.parametrize("transport", ["grpc", "rest"])
async def test_the_client_library_carries_tools(fakes: Fakes, start_proxy: Any, transport: str) -> None:
    server = await start_proxy(proxy_config(fakes))
    client: LLMGrpcClient | LLMHttpClient
    if transport == "grpc":
        client = LLMGrpcClient(f"127.0.0.1:{server.grpc_port}")
    else:
        client = LLMHttpClient(f"http://127.0.0.1:{server.rest_port}/v1")
    async with client:
        reply = await client.chat_completion(
            model="rest-only",
            messages=[{"role": "user", "content": "weather in Oslo"}],
            tools=[WEATHER],
            seed=3,
        )
    (call,) = reply.choices[0].message.tool_calls
    assert reply.finish_reason == pb.FINISH_REASON_TOOL_CALLS and call.name == "get_weather"
    assert fakes.openai.received[-1]["tools"] == [WEATHER] and fakes.openai.received[-1]["seed"] == 3


async def test_content_parts_travel_typed(fakes: Fakes, start_proxy: Any) -> None:
    """Images, audio and files cross the gRPC hop as typed parts, not as opaque JSON."""
    server = await start_proxy(proxy_config(fakes))
    client = sdk(server)
    await client.chat.completions.create(model="grpc-only", **FIELDS["image"])
    parts = fakes.grpc.received[-1].messages[0].parts
    assert [p.type for p in parts] == ["text", "image_url", "image_url"] and not any(p.json for p in parts)
    assert (parts[1].image_url.url, parts[1].image_url.detail) == (IMAGE, "high")
    assert not parts[2].image_url.HasField("detail")
    await client.chat.completions.create(model="grpc-only", **FIELDS["input_audio_and_file"])
    audio, pdf, by_id = fakes.grpc.received[-1].messages[0].parts
    assert (audio.input_audio.format, pdf.file.filename, by_id.file.file_id) == ("wav", "a.pdf", "file-abc")


async def test_a_chain_of_gateways_is_lossless(fakes: Fakes, start_proxy: Any) -> None:
    """REST front -> llmgateway provider -> another gateway's gRPC front -> openai provider -> upstream."""
    inner = await start_proxy(proxy_config(fakes))
    outer_config = proxy_config(fakes)
    outer_config["providers"].append(
        {"name": "inner", "llmgateway": {"target": f"127.0.0.1:{inner.grpc_port}"}}
    )
    outer_config["routes"].append({"model": "chained", "grpc": "inner", "upstreamModel": "rest-only"})
    outer = await start_proxy(outer_config)
    params: dict[str, Any] = {}
    for name in (
        "tool_turn",
        "logprobs",
        "vendor_extras",
        "null_fields",
        "temperature_float64",
        "stop_string",
        "seed",
    ):
        params.update(copy.deepcopy(FIELDS[name]))
    params["extra_body"] = {**FIELDS["vendor_extras"]["extra_body"], **FIELDS["null_fields"]["extra_body"]}
    params["messages"] = [*FIELDS["image"]["messages"], *FIELDS["tool_turn"]["messages"][1:]]
    client = sdk(outer)
    await client.chat.completions.create(model="chained", **params)
    assert canonical(fakes.openai.received[-1]) == canonical(sent_body(params))
    stream = await client.chat.completions.create(
        model="chained", **params, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert canonical(fakes.openai.received[-1]) == canonical(
        sent_body({**params, "stream": True, "stream_options": {"include_usage": True}})
    )
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].logprobs is not None for c in chunks[1:-2]), "each content chunk has its logprobs"


# -- structured outputs, reasoning, usage ------------------------------------------------------------------


class Weather(pydantic.BaseModel):
    city: str
    degrees: float
    days: int
    sunny: bool


@pytest.mark.parametrize("route", ["rest-only", "grpc-only"])
async def test_parse_with_a_pydantic_model(fakes: Fakes, start_proxy: Any, route: str) -> None:
    server = await start_proxy(proxy_config(fakes))
    reply = await sdk(server).chat.completions.parse(model=route, messages=USER, response_format=Weather)  # type: ignore[arg-type]
    parsed = reply.choices[0].message.parsed
    assert parsed == Weather(city=parsed.city, degrees=1.5, days=42, sunny=True)  # type: ignore[union-attr]
    received = upstream_json(fakes, route)["response_format"]
    assert received["type"] == "json_schema" and received["json_schema"]["name"] == "Weather"
    assert received["json_schema"]["strict"] is True


@pytest.mark.parametrize("route", ["rest-only", "grpc-only"])
async def test_reasoning_logprobs_and_usage_details_reach_the_client(
    fakes: Fakes, start_proxy: Any, route: str
) -> None:
    server = await start_proxy(proxy_config(fakes))
    messages = [{"role": "system", "content": "be brief"}, *USER]
    reply = await sdk(server).chat.completions.create(
        model=route,
        messages=messages,
        reasoning_effort="low",
        logprobs=True,
        top_logprobs=2,
        n=2,  # type: ignore[arg-type]
    )
    assert [c.index for c in reply.choices] == [0, 1]
    message = reply.choices[1].message
    assert (
        message.model_extra is not None
        and message.model_extra["reasoning_content"] == "Thinking about: hello there"
    )
    logprobs = reply.choices[0].logprobs
    assert (
        logprobs is not None and logprobs.content is not None and len(logprobs.content[0].top_logprobs) == 2
    )
    assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
    assert reply.usage.prompt_tokens_details.cached_tokens == 2  # "be brief"
    assert reply.usage.completion_tokens_details is not None
    assert reply.usage.completion_tokens_details.reasoning_tokens == 4
    assert reply.system_fingerprint == "fp_fake" and reply.service_tier == "default"


# -- streaming usage ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["rest-only", "grpc-only", "demo-claude"])
async def test_usage_chunk_only_with_include_usage(fakes: Fakes, start_proxy: Any, route: str) -> None:
    server = await start_proxy(proxy_config(fakes))
    client = sdk(server)
    stream = await client.chat.completions.create(
        model=route, messages=USER, stream=True, stream_options={"include_usage": True}
    )  # type: ignore[arg-type]
    chunks = [c async for c in stream]
    assert (
        chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 20
    )
    assert chunks[-2].choices[0].finish_reason == "stop" and chunks[-2].usage is None
    assert all(c.usage is None for c in chunks[:-1])
    stream = await client.chat.completions.create(model=route, messages=USER, stream=True)  # type: ignore[arg-type]
    chunks = [c async for c in stream]
    assert all(c.usage is None and c.choices for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"
    if route == "rest-only":
        assert "stream_options" not in fakes.openai.received[-1], "nothing the client did not send"


# -- errors ------------------------------------------------------------------------------------------------


async def test_an_unknown_model_name_is_not_echoed_whole(fakes: Fakes, start_proxy: Any) -> None:
    server = await start_proxy(proxy_config(fakes))
    with pytest.raises(openai.BadRequestError) as info:
        await sdk(server).chat.completions.create(model="m" * 100_000, messages=USER)  # type: ignore[arg-type]
    message = info.value.body["message"]  # type: ignore[index]
    assert len(message) < 600 and "unknown model 'mmmm" in message and "100002 characters" in message
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        request = pb.ChatRequest(
            model="m" * 100_000, messages=[pb.ChatMessage(role=pb.ROLE_USER, content="hi")]
        )
        with pytest.raises(grpc.aio.AioRpcError) as rpc_info:
            await pb_grpc.LLMServiceStub(channel).ChatCompletion(request)
    assert len(rpc_info.value.details() or "") < 600 and "100002 characters" in (
        rpc_info.value.details() or ""
    )
    async with aiohttp.ClientSession() as session:
        resp = await session.post(f"http://127.0.0.1:{server.rest_port}/v1/{'p' * 10_000}", json={})
        error = (await resp.json())["error"]["message"]
    assert resp.status == 404 and len(error) < 600 and "characters)" in error


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"tools": [{"type": "custom", "custom": {"name": "grep"}}]}, "tools[0] of type 'custom'"),
        ({"n": 2}, "n"),
        ({"extra_body": {"min_p": 0.1}}, "min_p"),
        (FIELDS["tool_turn"], "messages[1].tool_calls[1] of type 'custom'"),
        ({"logprobs": True}, "logprobs"),
        ({"seed": 1}, "seed"),
        ({"messages": [{"role": "user", "content": "hi", "name": "bob"}]}, "messages[0].name"),
    ],
    ids=["custom_tool", "n", "vendor_extra", "custom_tool_call", "logprobs", "seed", "name"],
)
async def test_anthropic_refuses_what_it_cannot_carry_yet(
    fakes: Fakes, start_proxy: Any, params: dict[str, Any], field: str
) -> None:
    server = await start_proxy(proxy_config(fakes))
    with pytest.raises(openai.BadRequestError) as info:
        await sdk(server).chat.completions.create(
            model="demo-claude", **{"messages": USER, **copy.deepcopy(params)}
        )
    assert f"{field}: not supported with Anthropic provider 'anthropic-fake'" in info.value.body["message"]  # type: ignore[index]
    assert fakes.anthropic.stats["requests"] == 0
    # Values that ask for nothing pass (null is the same as absent, logprobs false, n 1, a zero penalty, an
    # empty list), and max_completion_tokens is Anthropic's max_tokens.
    reply = await sdk(server).chat.completions.create(
        model="demo-claude",
        messages=[
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello", "refusal": None, "annotations": []},
            *USER,
        ],
        max_completion_tokens=3,
        temperature=0.123456789,
        logprobs=False,
        n=1,
        presence_penalty=0,
        stream=False,
        extra_body={"seed": None, "tools": []},
    )
    assert reply.choices[0].finish_reason == "length"


# -- vendor extras: each provider passes them on, drops them or refuses them ---------------------------------


def test_the_openai_request_keys_are_the_sdks() -> None:
    """What counts as a vendor extra is what the official SDK does not know as a chat request field."""
    import typing

    from openai.types.chat import completion_create_params

    sdk_keys = set(typing.get_type_hints(completion_create_params.CompletionCreateParamsBase)) | {"stream"}
    assert set(openai_chat.OPENAI_REQUEST_KEYS) == sdk_keys


def _with_policy(fakes: Fakes, policy: str) -> dict[str, Any]:
    config = proxy_config(fakes)
    for provider in config["providers"]:
        provider["vendorExtras"] = policy
    return config


VENDOR = {"top_k": 20, "min_p": 0.05, "chat_template_kwargs": {"enable_thinking": False}}


@pytest.mark.parametrize("stream", [False, True])
async def test_vendor_extras_pass_through_by_default(fakes: Fakes, start_proxy: Any, stream: bool) -> None:
    server = await start_proxy(proxy_config(fakes))
    params = {"model": "rest-only", "messages": USER, "extra_body": {**VENDOR, "verbosity": "low"}}
    if stream:
        async for _ in await sdk(server).chat.completions.create(stream=True, **params):
            pass
    else:
        await sdk(server).chat.completions.create(**params)
    received = fakes.openai.received[-1]
    assert {k: received[k] for k in (*VENDOR, "verbosity")} == {**VENDOR, "verbosity": "low"}


@pytest.mark.parametrize("route", ["rest-only", "grpc-only", "demo-claude"])
async def test_vendor_extras_dropped_are_logged_once_and_counted(
    fakes: Fakes, start_proxy: Any, route: str, caplog: pytest.LogCaptureFixture
) -> None:
    server = await start_proxy(_with_policy(fakes, "drop"))
    client = sdk(server)
    native = {"top_k": 3} if route == "demo-claude" else {}  # Anthropic's own field: never an extra to it
    for stream in (False, True, False):
        params = {
            "model": route,
            "messages": USER,
            "max_completion_tokens": 5,
            "extra_body": {"min_p": 0.05, "chat_template_kwargs": {"x": 1}, "verbosity": "low", **native},
        }
        if route == "demo-claude":
            params["extra_body"].pop("verbosity")  # an OpenAI field Anthropic cannot carry
        if stream:
            async for _ in await client.chat.completions.create(stream=True, **params):
                pass
        else:
            await client.chat.completions.create(**params)
        if route == "rest-only":
            received = fakes.openai.received[-1]
            assert "min_p" not in received and "chat_template_kwargs" not in received
            assert received["verbosity"] == "low"  # part of the OpenAI API: never a vendor extra
        elif route == "grpc-only":
            extra = orjson.loads(fakes.grpc.received[-1].extra_json or "{}")
            assert extra == {"verbosity": "low"}
        else:
            received = fakes.anthropic.received[-1]
            assert received["top_k"] == 3 and "min_p" not in received
    dropped = [r.getMessage() for r in caplog.records if "vendorExtras: drop" in r.getMessage()]
    assert len(dropped) == 2 and any("'min_p'" in m for m in dropped), dropped
    provider = {"rest-only": "openai-fake", "grpc-only": "grpc-fake", "demo-claude": "anthropic-fake"}[route]
    counted = server.metrics.dropped_fields.labels(provider)._value.get()
    assert counted == 6


@pytest.mark.parametrize("route", ["rest-only", "grpc-only"])
async def test_vendor_extras_refused_name_the_field_and_the_policy(
    fakes: Fakes, start_proxy: Any, route: str
) -> None:
    server = await start_proxy(_with_policy(fakes, "reject"))
    requests_before = fakes.openai.stats["requests"]
    with pytest.raises(openai.BadRequestError) as info:
        await sdk(server).chat.completions.create(model=route, messages=USER, extra_body={"top_k": 5})
    message = info.value.body["message"]  # type: ignore[index]
    provider = "openai-fake" if route == "rest-only" else "grpc-fake"
    assert message == (
        f"'top_k': not a field of the OpenAI chat API, and provider '{provider}' takes none "
        "(its vendorExtras is reject)"
    )
    assert fakes.openai.stats["requests"] == requests_before
    # OpenAI's own fields, even those the gateway has no typed field for, are not vendor extras.
    await sdk(server).chat.completions.create(model=route, messages=USER, extra_body={"verbosity": "low"})


# -- the codec, property-tested: any JSON the typed fields do not hold survives the round trip -------------

_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
_JSON = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
_NUMBER = st.floats(min_value=-2, max_value=2) | st.integers(min_value=-2, max_value=2)
_TEXT = st.text(max_size=6)
_OBJECT = st.dictionaries(_TEXT, _JSON, max_size=3)
# Every request field the gateway knows, with values mostly valid (or null), beside unknown keys.
_KNOWN = {
    "temperature": st.floats(min_value=0, max_value=2) | st.integers(min_value=0, max_value=2),
    "top_p": st.floats(min_value=0, max_value=1) | st.just(1),
    "max_tokens": st.integers(min_value=1, max_value=2**31 - 1),
    "max_completion_tokens": st.integers(min_value=1, max_value=2**31 - 1),
    "stop": _TEXT | st.lists(_TEXT, max_size=4),
    "user": _TEXT,
    "metadata": st.dictionaries(_TEXT, _TEXT, max_size=2),
    "tools": st.lists(st.just(WEATHER) | _OBJECT.map(lambda o: {**o, "type": "custom"}), max_size=2),
    "tool_choice": _TEXT | _OBJECT | st.just({"type": "function", "function": {"name": "f"}}),
    "parallel_tool_calls": st.booleans(),
    "response_format": _OBJECT.map(lambda o: {**o, "type": "json_schema"})
    | st.just(FIELDS["response_format_json_schema"]["response_format"]),
    "n": st.integers(min_value=1, max_value=128),
    "seed": st.integers(min_value=-(2**63), max_value=2**63 - 1),
    "logprobs": st.booleans(),
    "top_logprobs": st.integers(min_value=0, max_value=20),
    "presence_penalty": _NUMBER,
    "frequency_penalty": _NUMBER,
    "logit_bias": st.dictionaries(_TEXT, _NUMBER, max_size=2),
    "reasoning_effort": _TEXT,
    "stream_options": _OBJECT | st.booleans().map(lambda b: {"include_usage": b}),
    "service_tier": _TEXT,
    "store": st.booleans(),
    "prediction": _OBJECT,
    "modalities": st.lists(_TEXT, max_size=2),
}
_REQUEST = st.fixed_dictionaries({}, optional={k: v | st.none() for k, v in _KNOWN.items()})
_MESSAGE_KEYS = st.sampled_from(
    ["content", "name", "tool_calls", "tool_call_id", "refusal", "reasoning_content", "audio", "annotations"]
)


def _accepted(parse: Any, body: Any) -> Any:
    """``parse(body)``, or the test is skipped for a body the gateway refuses as invalid."""
    try:
        return parse(body)
    except GatewayError:
        hypothesis.assume(False)


@hypothesis.settings(max_examples=100, deadline=None, suppress_health_check=[hypothesis.HealthCheck.too_slow])
@hypothesis.given(
    known=_REQUEST,
    top=st.dictionaries(st.text(max_size=6), _JSON, max_size=3),
    message=st.dictionaries(_MESSAGE_KEYS | st.text(max_size=6), _JSON, max_size=4),
    role=st.sampled_from(["system", "user", "assistant", "tool", "developer"]),
    stream=st.sampled_from([None, True, False]),
)
def test_any_request_json_survives_the_codec(
    known: dict[str, Any], top: dict[str, Any], message: dict[str, Any], role: str, stream: bool | None
) -> None:
    message = {"content": "hi", **message, "role": role}
    body = {**top, **known, "model": "m", "messages": [message, {"role": "user", "content": "x"}]}
    if stream is not None:
        body["stream"] = stream
    request, streamed = _accepted(openai_chat.request_from_json, body)
    if streamed:
        request.chunk_layout = pb.CHUNK_LAYOUT_OPENAI
    wire = pb.ChatRequest.FromString(request.SerializeToString())  # across a gRPC hop too
    assert canonical(openai_chat.request_to_json(wire, stream=streamed)) == canonical(body)


_CHOICE_KEYS = st.sampled_from(["logprobs", "finish_reason", "content_filter_results"])


@hypothesis.settings(max_examples=100, deadline=None, suppress_health_check=[hypothesis.HealthCheck.too_slow])
@hypothesis.given(
    top=st.dictionaries(
        st.sampled_from(["usage", "system_fingerprint", "service_tier"]) | st.text(max_size=6),
        _JSON,
        max_size=3,
    ),
    message=st.dictionaries(_MESSAGE_KEYS | st.text(max_size=6), _JSON, max_size=4),
    choice=st.dictionaries(_CHOICE_KEYS | st.text(max_size=6), _JSON, max_size=3),
    delta=st.dictionaries(_MESSAGE_KEYS | st.sampled_from(["role"]) | st.text(max_size=6), _JSON, max_size=3),
)
def test_any_answer_json_survives_the_codec(
    top: dict[str, Any], message: dict[str, Any], choice: dict[str, Any], delta: dict[str, Any]
) -> None:
    head = {"id": "chatcmpl-1", "created": 1, "model": "m"}
    fixed = {"index": 0, "logprobs": None, "finish_reason": None}
    if isinstance(top.get("usage"), dict):  # the three counts are always there (and always written)
        top["usage"] = {**top["usage"], "prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    response = {
        **top,
        **head,
        "object": "chat.completion",
        "choices": [{**fixed, **choice, "index": 0, "message": {**message, "role": "assistant"}}],
    }
    try:
        parsed = openai_chat.response_from_json(response)
    except (ValueError, TypeError, KeyError):
        hypothesis.assume(False)
    wire = pb.ChatResponse.FromString(parsed.SerializeToString())
    assert canonical(openai_chat.response_to_json(wire)) == canonical(response)
    chunk = {
        **top,
        **head,
        "object": "chat.completion.chunk",
        "choices": [{**fixed, **choice, "index": 0, "delta": delta}],
    }
    if "usage" in top and not isinstance(top["usage"], dict | None):
        hypothesis.assume(False)
    try:
        parsed_chunk = openai_chat.chunk_from_json(chunk)
    except (ValueError, TypeError, KeyError):
        hypothesis.assume(False)
    wire_chunk = pb.ChatChunk.FromString(parsed_chunk.SerializeToString())
    assert canonical(openai_chat.chunk_to_json(wire_chunk)) == canonical(chunk)


async def test_an_upstream_request_error_keeps_its_param_and_code(fakes: Fakes, start_proxy: Any) -> None:
    """What OpenAI's SDK and the frameworks on it act on (``code: context_length_exceeded``) reaches them."""
    server = await start_proxy(proxy_config(fakes))
    messages = [{"role": "user", "content": [{"type": "text", "txt": "hi"}]}]
    with pytest.raises(openai.BadRequestError) as info:
        await sdk(server).chat.completions.create(model="rest-only", messages=messages)  # type: ignore[arg-type]
    assert (info.value.param, info.value.code) == (
        "messages[0].content[0].text",
        "missing_required_parameter",
    )
    assert "provider 'openai-fake' answered HTTP 400: Missing required parameter" in info.value.message
