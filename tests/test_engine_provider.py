"""The engine provider types (``vllm``, ``sglang``) end to end: the fake engines of :mod:`llmgw_dev.fakes.engine`
behind an in-process proxy, the official ``openai`` SDK on its REST front (and the gRPC front once), and the
``vllm-http`` fake (vLLM's OpenAI server on the same model) as the reference: both paths of a migration
answer alike.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import openai
import pydantic
import pytest
from engine_routers import MODEL, answer, greedy_logprobs, leave_mid_stream

from llmgateway.v1 import llm_service_pb2 as pb
from llmgateway.v1 import llm_service_pb2_grpc as pb_grpc
from llmgw.providers import _engine_workers
from llmgw.server import ProxyServer
from llmgw_dev.fakes import FakeProvider, make_reply
from llmgw_dev.fakes.model import load

Start = Callable[[dict[str, Any]], Awaitable[ProxyServer]]
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "The city"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city"],
            },
        },
    }
]
HELLO = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hello there wörld 😀"}]
WEATHER = [{"role": "user", "content": "What is the weather in Paris? Use get_weather."}]
HISTORY: list[Any] = [
    *WEATHER,
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny and 21 degrees"},
]
THINK = {"chat_template_kwargs": {"enable_thinking": True}}
REQUESTS: list[dict[str, Any]] = [
    {"messages": HELLO},
    {"messages": WEATHER, "tools": TOOLS},
    {"messages": HISTORY, "tools": TOOLS},
    {"messages": HELLO, "extra_body": THINK},
    {"messages": WEATHER, "tools": TOOLS, "extra_body": THINK},
    {"messages": HELLO, "tools": TOOLS, "tool_choice": "required"},
    {
        "messages": HELLO,
        "tools": TOOLS,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    },
    {"messages": HELLO, "response_format": {"type": "json_object"}},
    {
        "messages": HELLO,
        "response_format": {
            "type": "json_schema",
            "json_schema": {
                "name": "a",
                "schema": {"type": "object", "properties": {"a": {"type": "integer"}}},
            },
        },
    },
    {"messages": HELLO, "max_tokens": 7},
    {"messages": HELLO, "stop": ["fake"]},
    {"messages": HELLO, "n": 2, "seed": 11, "temperature": 1.0},
    {"messages": HELLO, "n": 2, "temperature": 1.0},
]


def engine_settings(target: str, **more: Any) -> dict[str, Any]:
    return {"target": target, "toolCallParser": "hermes", "reasoningParser": "qwen3", **more}


def config(providers: list[dict[str, Any]], routes: list[dict[str, Any]], **overrides: Any) -> dict[str, Any]:
    retries = {"maxAttempts": 1, "initialBackoffSeconds": 0.01, "maxBackoffSeconds": 0.05}
    return {
        "generation": 1,
        "listen": {"grpc": "127.0.0.1:0", "rest": "127.0.0.1:0", "admin": "127.0.0.1:0"},
        "reloadIntervalSeconds": 0.1,
        "shutdown": {"drainSeconds": 1},
        "providers": [{"retries": retries, **p} for p in providers],
        "routes": routes,
        **overrides,
    }


def sdk(server: ProxyServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{server.rest_port}/v1", api_key="unused", max_retries=0, timeout=30
    )


def resolve_names(monkeypatch: pytest.MonkeyPatch, names: dict[str, list[tuple[str, int]]]) -> None:
    """Names that resolve to the addresses ``names`` gives them (changed in place as a test goes on): the
    hook is ``_engine_workers.resolve``, since a name of several loopback addresses with their own ports
    cannot be had from the system's resolver."""
    real = _engine_workers.resolve

    async def resolve(host: str, port: int) -> list[tuple[str, int]]:
        return names[host] if host in names else await real(host, port)

    monkeypatch.setattr(_engine_workers, "resolve", resolve)


def generated(*engines: FakeProvider) -> list[int]:
    """How many Generate requests each engine got."""
    return [sum(type(r).__name__ == "GenerateRequest" for r in e.received) for e in engines]


@contextlib.asynccontextmanager
async def engine_proxy(
    start_proxy: Start, kind: str = "vllm", vision: bool = False, **settings: Any
) -> AsyncIterator[tuple[FakeProvider, FakeProvider, openai.AsyncOpenAI, ProxyServer]]:
    """A fake engine of ``kind`` and the vllm-http fake (both seeing images with ``vision``), an SDK client on
    a proxy whose ``demo-model`` route goes to the engine; the second yielded fake is vllm-http."""
    async with (
        FakeProvider(kind, models=[MODEL], vision=vision) as engine,
        FakeProvider("vllm-http", models=[MODEL], vision=vision) as rest,
    ):
        server = await start_proxy(
            config(
                [{"name": "engine", kind: engine_settings(engine.target, **settings)}],
                [{"model": MODEL, "grpc": "engine"}],
            )
        )
        client = sdk(server)
        try:
            yield engine, rest, client, server
        finally:
            await client.close()


# ------------------------------------------------------------------------------------------ the same answers


@pytest.mark.parametrize("kind", ["vllm", "sglang"])
async def test_engine_answers_as_vllm_http_does(start_proxy: Start, kind: str) -> None:
    async with engine_proxy(start_proxy, kind) as (engine, rest, client, _):
        direct = openai.AsyncOpenAI(base_url=rest.base_url, api_key="unused", max_retries=0)
        for request in REQUESTS:
            for stream in (False, True):
                through = await answer(client, stream, **request)
                expected = await answer(direct, stream, **request)
                assert through == expected, (kind, stream, request)
        await direct.close()
        # What reached the engine: the rendered prompt, tokenized, under a chatcmpl- id.
        sent = [r for r in engine.received if type(r).__name__ == "GenerateRequest"][-1]
        assert sent.request_id.startswith("chatcmpl-")
        model = load(MODEL, 20)
        assert model.decode(list(sent.tokenized.input_ids), skip_special_tokens=False) == model.render(HELLO)


# ----------------------------------------------------------------------------------------- stream layout


async def test_stream_layout_tool_call_deltas_and_usage(start_proxy: Start) -> None:
    async with engine_proxy(start_proxy) as (_, _, client, _server):
        events = await client.chat.completions.create(
            model=MODEL,
            messages=WEATHER,
            tools=TOOLS,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in events]
        first = chunks[0].choices[0]
        assert (first.delta.role, first.delta.content) == ("assistant", "")
        ids = {c.id for c in chunks}
        assert len(ids) == 1 and ids.pop().startswith("chatcmpl-")
        calls = [t for c in chunks for ch in c.choices for t in ch.delta.tool_calls or []]
        assert calls[0].id and calls[0].id.startswith("call_") and calls[0].type == "function"
        assert calls[0].function is not None and calls[0].function.name == "get_weather"
        arguments = "".join(t.function.arguments or "" for t in calls if t.function is not None)
        assert json.loads(arguments) == {"city": "Paris", "unit": "celsius"}
        assert {t.index for t in calls} == {0}
        finishes = [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason]
        assert finishes == ["tool_calls"]
        assert chunks[-1].choices == [] and chunks[-1].usage is not None
        assert (
            chunks[-1].usage.total_tokens
            == chunks[-1].usage.prompt_tokens + chunks[-1].usage.completion_tokens
        )
        # Without include_usage, no usage chunk; the same request again reads its prompt from the cache.
        events = await client.chat.completions.create(model=MODEL, messages=WEATHER, tools=TOOLS, stream=True)
        assert all(c.usage is None for c in [c async for c in events])
        reply = await client.chat.completions.create(model=MODEL, messages=WEATHER, tools=TOOLS)
        assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
        assert (reply.usage.prompt_tokens_details.cached_tokens or 0) >= 16
        assert reply.choices[0].message.content is None
        # A multi-turn conversation with the tool's result: an answer about it, no call.
        reply = await client.chat.completions.create(model=MODEL, messages=HISTORY, tools=TOOLS)
        assert reply.choices[0].message.tool_calls is None or reply.choices[0].message.tool_calls == []
        assert "sunny and 21 degrees" in (reply.choices[0].message.content or "")
        assert reply.choices[0].finish_reason == "stop"


async def test_reasoning_stop_length_and_n(start_proxy: Start) -> None:
    async with engine_proxy(start_proxy, "sglang") as (_, _, client, _server):
        reply = await client.chat.completions.create(model=MODEL, messages=HELLO, extra_body=THINK)
        message = reply.choices[0].message
        assert getattr(message, "reasoning_content", "").startswith("The user wrote: hello there")
        assert (
            message.content == "\n\n" + make_reply("hello there wörld 😀").text
        )  # as written after </think>
        full = make_reply("hello there wörld 😀").text
        reply = await client.chat.completions.create(model=MODEL, messages=HELLO, stop=["fake"])
        assert reply.choices[0].message.content == full[: full.index("fake")]
        assert reply.choices[0].finish_reason == "stop"
        reply = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3)
        assert reply.choices[0].finish_reason == "length"
        assert reply.usage is not None and reply.usage.completion_tokens == 3
        reply = await client.chat.completions.create(model=MODEL, messages=HELLO, n=2, temperature=1.0)
        assert [c.index for c in reply.choices] == [0, 1]
        assert reply.choices[0].message.content != reply.choices[1].message.content


async def test_logprobs_and_json_schema(start_proxy: Start) -> None:
    async with engine_proxy(start_proxy) as (_, rest, client, _server):
        direct = openai.AsyncOpenAI(base_url=rest.base_url, api_key="unused", max_retries=0)
        values = [await greedy_logprobs(c, HELLO) for c in (client, direct)]
        assert values[0] == values[1] and len(values[0]) == 4
        events = await client.chat.completions.create(
            model=MODEL, messages=HELLO, logprobs=True, max_tokens=4, stream=True
        )
        entries = [
            e
            for c in [c async for c in events]
            for ch in c.choices
            if ch.logprobs
            for e in ch.logprobs.content or []
        ]
        assert len(entries) == 4
        await direct.close()

        class Answer(pydantic.BaseModel):
            reply: str
            count: int

        parsed = await client.beta.chat.completions.parse(model=MODEL, messages=HELLO, response_format=Answer)
        assert isinstance(parsed.choices[0].message.parsed, Answer)


async def test_refusals(start_proxy: Start) -> None:
    async with engine_proxy(start_proxy) as (engine, _, client, _server):
        with pytest.raises(openai.BadRequestError, match="maximum context length"):
            await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "word " * 9000}]
            )
        with pytest.raises(openai.BadRequestError, match="max_tokens"):
            await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=0)
        reply = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=100_000)
        assert reply.choices[0].finish_reason == "stop"
        image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
        with pytest.raises(
            openai.BadRequestError, match=r"an image cannot go to provider .* no mm_processor"
        ):
            await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}, image]}]
            )
        audio = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
        with pytest.raises(openai.BadRequestError, match=r"messages\[0\]\.content\[1\]"):
            await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}, audio]}]
            )
        with pytest.raises(openai.BadRequestError, match="modalities"):
            await client.chat.completions.create(
                model=MODEL,
                messages=HELLO,
                modalities=["text", "audio"],
                audio={"voice": "alloy", "format": "wav"},
            )
        with pytest.raises(openai.BadRequestError, match="no tool named"):
            await client.chat.completions.create(
                model=MODEL,
                messages=HELLO,
                tools=TOOLS,
                tool_choice={"type": "function", "function": {"name": "x"}},
            )
        assert generated(engine) == [1]  # only the clamped max_tokens reached the engine


# --------------------------------------------------------------------------------------- the gRPC front


async def test_grpc_front(start_proxy: Start) -> None:
    async with engine_proxy(start_proxy) as (_, _, _client, server):  # noqa: SIM117
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            stub = pb_grpc.LLMServiceStub(channel)
            request = pb.ChatRequest(
                model=MODEL, messages=[pb.ChatMessage(role=pb.ROLE_USER, content="hello there")]
            )
            reply = await stub.ChatCompletion(request)
            assert reply.content == make_reply("hello there").text
            assert reply.finish_reason == pb.FINISH_REASON_STOP and reply.usage.completion_tokens > 0
            chunks = [c async for c in stub.StreamingChat(request)]
            assert "".join(c.delta for c in chunks) == reply.content
            assert chunks[-1].finish_reason == pb.FINISH_REASON_STOP
            assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


# ------------------------------------------------------------------------------- cancellation, workers


@pytest.mark.parametrize("kind", ["vllm", "sglang"])
async def test_client_that_leaves_aborts_the_request(start_proxy: Start, kind: str) -> None:
    async with engine_proxy(start_proxy, kind) as (engine, _, client, _server):
        engine.faults.token_delay_ms = 100
        events = await client.chat.completions.create(model=MODEL, messages=HELLO, stream=True)
        aborts = await leave_mid_stream(engine, events)
        generate = [r for r in engine.received if type(r).__name__ == "GenerateRequest"][-1]
        assert aborts and generate.request_id in str(aborts[-1])


async def test_two_workers_behind_one_name(start_proxy: Start, monkeypatch: pytest.MonkeyPatch) -> None:
    """A target that resolves to two addresses."""
    async with FakeProvider("vllm", models=[MODEL]) as one, FakeProvider("vllm", models=[MODEL]) as two:
        addresses = {"engines.test": [("127.0.0.1", one.port), ("127.0.0.1", two.port)]}
        resolve_names(monkeypatch, addresses)
        server = await start_proxy(
            config(
                [
                    {
                        "name": "engine",
                        "vllm": engine_settings("engines.test:50051", resolveIntervalSeconds=0.2),
                        "retries": {
                            "maxAttempts": 2,
                            "initialBackoffSeconds": 0.01,
                            "maxBackoffSeconds": 0.05,
                        },
                    }
                ],
                [{"model": MODEL, "grpc": "engine"}],
            )
        )
        client = sdk(server)
        one.faults.token_delay_ms = two.faults.token_delay_ms = 20
        replies = await asyncio.gather(
            *(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5) for _ in range(6))
        )
        assert all(r.choices[0].finish_reason == "length" for r in replies)
        counts = generated(one, two)
        assert counts == [3, 3]
        # One engine stops: its requests fail over to the other (a retry skips the worker that failed).
        await one.stop()
        for _ in range(4):
            reply = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
            assert reply.choices[0].finish_reason == "length"
        # The name now resolves to the second alone: the first is forgotten.
        addresses["engines.test"] = [("127.0.0.1", two.port)]
        await asyncio.sleep(0.3)
        (before,) = generated(two)
        for _ in range(3):
            await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
        assert generated(two) == [before + 3]
        await client.close()


async def test_other_proxies_load_is_counted(start_proxy: Start, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two proxies share two engines: the one whose engine the other proxy keeps busy (GetLoads says so)
    sends its requests to the idle engine; with loadsIntervalSeconds 0 its own requests alone decide."""

    async with FakeProvider("vllm", models=[MODEL]) as busy, FakeProvider("vllm", models=[MODEL]) as idle:
        busy.faults.token_delay_ms = idle.faults.token_delay_ms = 20
        resolve_names(monkeypatch, {"engines.test": [("127.0.0.1", busy.port), ("127.0.0.1", idle.port)]})

        async def proxy(target: str, **settings: Any) -> openai.AsyncOpenAI:
            server = await start_proxy(
                config(
                    [{"name": "engine", "vllm": engine_settings(target, **settings)}],
                    [{"model": MODEL, "grpc": "engine"}],
                )
            )
            return sdk(server)

        other = await proxy(busy.target)  # another proxy, its requests all on the busy engine
        counted = await proxy("engines.test:50051", loadsIntervalSeconds=0.05)
        uncounted = await proxy("engines.test:50051", loadsIntervalSeconds=0)
        for client in (counted, uncounted):  # both workers checked, the first load report asked for
            await asyncio.gather(
                *(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=1) for _ in range(2))
            )
        long = [
            asyncio.create_task(
                other.chat.completions.create(
                    model=MODEL, messages=HELLO, max_tokens=150, extra_body={"ignore_eos": True}
                )
            )
            for _ in range(4)
        ]
        await asyncio.sleep(0.3)  # the four are running on the busy engine; a report has come since
        before = generated(busy, idle)
        for _ in range(6):
            await counted.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=1)
        after = generated(busy, idle)
        assert after[0] - before[0] == 0 and after[1] - before[1] == 6  # all to the idle engine
        for _ in range(6):
            await uncounted.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=1)
        last = generated(busy, idle)
        assert last[0] - after[0] == 3 and last[1] - after[1] == 3  # in turn: it does not see the others
        for task in long:
            task.cancel()
        await asyncio.gather(*long, return_exceptions=True)
        for client in (other, counted, uncounted):
            await client.close()


async def test_a_fleet_that_moves_to_another_model(
    start_proxy: Start, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Requests go only to workers serving the model the proxy loaded; once none is left and others serve
    another model (a rolling upgrade), the proxy loads that one; an engine restarted at the same address
    with another model is noticed by its new connection."""

    async with (
        FakeProvider("vllm", models=["model-a"]) as old,
        FakeProvider("vllm", models=["model-b"]) as new,
    ):
        addresses = {"engines.test": [("127.0.0.1", old.port)]}
        resolve_names(monkeypatch, addresses)
        server = await start_proxy(
            config(
                [
                    {
                        "name": "engine",
                        "vllm": engine_settings("engines.test:50051", resolveIntervalSeconds=0.1),
                    }
                ],
                [{"model": MODEL, "grpc": "engine"}],
            )
        )
        client = sdk(server)
        await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
        # The new model's engine joins: checked, set aside; model-a's engine takes every request.
        addresses["engines.test"].append(("127.0.0.1", new.port))
        await asyncio.sleep(0.2)
        for _ in range(4):
            await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
        assert generated(old, new) == [5, 0]
        # The old engine leaves: the proxy loads model-b from the new one, and no request fails.
        addresses["engines.test"] = [("127.0.0.1", new.port)]
        await asyncio.sleep(0.2)
        caplog.set_level(logging.WARNING, logger="llmgw")
        for _ in range(3):
            reply = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
            assert reply.choices[0].finish_reason == "length"
        assert generated(old, new) == [5, 3]
        assert "now serve model 'model-b', not 'model-a'" in caplog.text
        # model-b's engine restarts at its address serving model-c: its new connection is checked again.
        port = new.port
        await new.stop()
        async with FakeProvider("vllm", models=["model-c"], port=port) as restarted:
            for _ in range(2):
                reply = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
                assert reply.choices[0].finish_reason == "length"
            assert generated(restarted) == [2]
        assert "now serve model 'model-c', not 'model-b'" in caplog.text
        await client.close()


async def test_engine_down_is_503_and_falls_back(start_proxy: Start) -> None:
    async with (
        FakeProvider("vllm", models=[MODEL]) as engine,
        FakeProvider("vllm-http", models=[MODEL]) as rest,
    ):
        dead = engine.target
        await engine.stop()
        server = await start_proxy(
            config(
                [
                    {"name": "engine", "vllm": engine_settings(dead)},
                    {"name": "http", "openai": {"baseURL": rest.base_url}},
                ],
                [
                    {"model": MODEL, "rest": "http", "grpc": "engine", "grpcWeight": 100},
                    {"model": "engine-only", "grpc": "engine", "upstreamModel": MODEL},
                ],
            )
        )
        client = sdk(server)
        with pytest.raises(openai.APIStatusError) as caught:
            await client.chat.completions.create(model="engine-only", messages=HELLO)
        assert caught.value.status_code == 503
        assert "'engine'" in str(caught.value) and dead not in str(caught.value)
        reply = await client.chat.completions.create(model=MODEL, messages=HELLO)
        assert reply.choices[0].message.content == make_reply("hello there wörld 😀").text
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            stub = pb_grpc.LLMServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await stub.ChatCompletion(
                    pb.ChatRequest(
                        model="engine-only", messages=[pb.ChatMessage(role=pb.ROLE_USER, content="hi")]
                    )
                )
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        await client.close()


# ----------------------------------------------------------------------------- embeddings, tokenizer files


async def test_embeddings(start_proxy: Start) -> None:
    from llmgw_dev.fakes.endpoints import embedding

    async with engine_proxy(start_proxy) as (engine, _, client, _server):
        result = await client.embeddings.create(model=MODEL, input=["hello there", "second"])
        assert [d.index for d in result.data] == [0, 1]
        assert result.data[0].embedding == pytest.approx(embedding("hello there"), abs=1e-6)
        assert result.usage.prompt_tokens == sum(
            len(load(MODEL, 20).encode(t)) for t in ("hello there", "second")
        )
        b64 = await client.embeddings.create(model=MODEL, input="hello there", encoding_format="base64")
        raw = base64.b64decode(str(b64.data[0].embedding))
        vector = struct.unpack(f"<{len(raw) // 4}f", raw)
        assert vector == pytest.approx(embedding("hello there"), abs=1e-6)
        assert sum(type(r).__name__ == "EmbedRequest" for r in engine.received) == 3


async def test_tokenizer_and_template_from_settings(start_proxy: Start, tmp_path: Path) -> None:
    model = load(MODEL, 20)
    model.save(tmp_path / "model")
    config_file = tmp_path / "model" / "tokenizer_config.json"
    tokenizer_config = json.loads(config_file.read_text())
    tokenizer_config["chat_template"] = "FROM-PATH " + tokenizer_config["chat_template"]
    config_file.write_text(json.dumps(tokenizer_config))
    async with engine_proxy(start_proxy, tokenizerPath=str(tmp_path / "model")) as (engine, _, client, _s):
        reply = await client.chat.completions.create(model=MODEL, messages=HELLO)
        assert reply.choices[0].message.content == make_reply("hello there wörld 😀").text
        sent = [r for r in engine.received if type(r).__name__ == "GenerateRequest"][-1]
        assert model.decode(list(sent.tokenized.input_ids)).startswith("FROM-PATH")
    override = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}<|im_start|>assistant\n"
    async with engine_proxy(start_proxy, chatTemplate=override) as (engine, _, client, _s):
        reply = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}]
        )
        sent = [r for r in engine.received if type(r).__name__ == "GenerateRequest"][-1]
        text = model.decode(list(sent.tokenized.input_ids), skip_special_tokens=False)
        assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant"  # (Jinja drops a last newline)
        assert reply.choices[0].message.content == make_reply("hi").text


# ------------------------------------------------------------------- sampling, time bounds, one fetch


async def test_sampling_reaches_the_engine(start_proxy: Start) -> None:
    async with engine_proxy(start_proxy) as (engine, _, client, _server):
        await client.chat.completions.create(model=MODEL, messages=HELLO)
        sent = [r for r in engine.received if type(r).__name__ == "GenerateRequest"][-1].sampling_params
        # The model's defaults (GetModelInfo) for what the client left unset; the context left for max_tokens.
        assert (round(sent.temperature, 5), round(sent.top_p, 5), sent.top_k) == (0.7, 0.8, 20)
        assert sent.max_tokens == 8192 - len(load(MODEL, 20).encode(load(MODEL, 20).render(HELLO)))
        await client.chat.completions.create(
            model=MODEL,
            messages=HELLO,
            temperature=0.0,
            seed=7,
            stop=["x"],
            logit_bias={"5": 1.5},
            extra_body={
                "top_k": 5,
                "min_p": 0.1,
                "repetition_penalty": 1.1,
                "stop_token_ids": [9],
                "min_tokens": 2,
            },
        )
        sent = [r for r in engine.received if type(r).__name__ == "GenerateRequest"][-1].sampling_params
        assert (sent.temperature, sent.top_k, round(sent.min_p, 5), round(sent.repetition_penalty, 5)) == (
            0.0,
            5,
            0.1,
            1.1,
        )
        assert (sent.seed, list(sent.stop), list(sent.stop_token_ids), sent.min_tokens) == (7, ["x"], [9], 2)
        assert dict(sent.logit_bias) == {5: 1.5}
        await client.chat.completions.create(
            model=MODEL,
            messages=HELLO,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
        )
        sent = [r for r in engine.received if type(r).__name__ == "GenerateRequest"][-1].sampling_params
        assert json.loads(sent.json_schema) == TOOLS[0]["function"]["parameters"]
        await client.chat.completions.create(
            model=MODEL, messages=HELLO, extra_body={"guided_choice": ["a", "b"]}
        )
        sent = [r for r in engine.received if type(r).__name__ == "GenerateRequest"][-1].sampling_params
        assert list(sent.choice.choices) == ["a", "b"]


async def test_time_bounds(start_proxy: Start) -> None:
    async with FakeProvider("vllm", models=[MODEL]) as engine:
        server = await start_proxy(
            config(
                [
                    {
                        "name": "engine",
                        "vllm": engine_settings(engine.target),
                        "timeoutSeconds": 0.5,
                        "streamIdleTimeoutSeconds": 0.3,
                    }
                ],
                [{"model": MODEL, "grpc": "engine"}],
            )
        )
        client = sdk(server)
        await client.chat.completions.create(model=MODEL, messages=HELLO)  # the model is fetched
        engine.faults.latency_ms = 1500
        with pytest.raises(openai.APIStatusError, match="timeoutSeconds") as caught:
            await client.chat.completions.create(model=MODEL, messages=HELLO)
        assert caught.value.status_code == 504
        engine.faults.latency_ms = 0
        engine.faults.token_delay_ms = 1000
        events = await client.chat.completions.create(model=MODEL, messages=HELLO, stream=True)
        with pytest.raises(openai.APIError, match="streamIdleTimeoutSeconds"):
            async for _ in events:
                pass
        deadline = time.monotonic() + 5
        while (
            not any(type(r).__name__ == "AbortRequest" for r in engine.received)
            and time.monotonic() < deadline
        ):
            await asyncio.sleep(0.05)
        assert any(type(r).__name__ == "AbortRequest" for r in engine.received)  # a stalled engine is told
        await client.close()


async def test_concurrent_first_requests_fetch_the_tokenizer_once(
    start_proxy: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llmgw.providers import engine as engine_module

    fetches = 0
    real = engine_module.EngineClient._tokenizer_archive

    async def counted(self: Any, worker: Any, deadline: float) -> tuple[bytes, str]:
        nonlocal fetches
        fetches += 1
        return await real(self, worker, deadline)

    monkeypatch.setattr(engine_module.EngineClient, "_tokenizer_archive", counted)
    async with engine_proxy(start_proxy) as (_, _, client, _server):
        replies = await asyncio.gather(
            *(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2) for _ in range(5))
        )
        assert len(replies) == 5 and fetches == 1


async def test_engine_errors(start_proxy: Start) -> None:
    async with engine_proxy(start_proxy, "sglang") as (engine, _, client, _server):
        await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
        engine.faults.update({"fail_next": 1, "error_status": 500})
        with pytest.raises(openai.APIStatusError, match="injected error") as caught:
            await client.chat.completions.create(model=MODEL, messages=HELLO)
        assert "'engine'" in str(caught.value) and engine.target not in str(caught.value)
        assert caught.value.status_code >= 500
        # The engine's own refusal is the client's 400.
        with pytest.raises(openai.BadRequestError, match="'engine' refused the request"):
            await client.chat.completions.create(
                model=MODEL, messages=HELLO, extra_body={"stop_token_ids": [10**6]}
            )
        # A stream that breaks after its first tokens ends in an error, the text so far delivered.
        engine.faults.update({"stream_error_after_tokens": 3})
        events = await client.chat.completions.create(model=MODEL, messages=HELLO, stream=True)
        text = ""
        with pytest.raises(openai.APIError):
            async for chunk in events:
                for choice in chunk.choices:
                    text += choice.delta.content or ""
        assert text and make_reply("hello there wörld 😀").text.startswith(text)
