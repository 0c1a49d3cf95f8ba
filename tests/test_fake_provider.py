"""The fake upstreams against the official SDKs (openai, anthropic) and a grpc.aio stub."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import grpc
import openai
import orjson
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmgateway.v1 import llm_service_pb2 as pb
from llmgateway.v1 import llm_service_pb2_grpc
from llmgw_dev import fakes as fp
from llmgw_dev.fakes import FakeProvider, Faults, make_reply

KEY = "sk-test-0123456789abcdef"
PROMPT = "hello there general kenobi"
MESSAGES: list[Any] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": PROMPT},
]
EXPECTED = make_reply(PROMPT)
PROMPT_TOKENS = 3 + 4  # words of the system prompt and of the user message
AUTH = (("authorization", f"Bearer {KEY}"),)
ROOT = Path(__file__).resolve().parents[1]


async def wait_until(predicate: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


@pytest.fixture
async def oai() -> AsyncIterator[FakeProvider]:
    async with FakeProvider("openai", api_key=KEY) as fake:
        yield fake


@pytest.fixture
async def ant() -> AsyncIterator[FakeProvider]:
    async with FakeProvider("anthropic", api_key=KEY) as fake:
        yield fake


@pytest.fixture
async def grpc_fake() -> AsyncIterator[FakeProvider]:
    async with FakeProvider("grpc", api_key=KEY, control_port=0) as fake:
        yield fake


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


class Clients:
    """SDK clients for one test, closed at its end (an unclosed one warns once the loop is gone)."""

    def __init__(self) -> None:
        self._open: list[openai.AsyncOpenAI | anthropic.AsyncAnthropic] = []

    def openai(self, fake: FakeProvider | str, key: str = KEY) -> openai.AsyncOpenAI:
        base_url = fake if isinstance(fake, str) else fake.base_url
        client = openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0)
        self._open.append(client)
        return client

    def anthropic(self, fake: FakeProvider, key: str = KEY) -> anthropic.AsyncAnthropic:
        client = anthropic.AsyncAnthropic(base_url=fake.base_url, api_key=key, max_retries=0)
        self._open.append(client)
        return client

    async def aclose(self) -> None:
        for client in self._open:
            await client.close()


@pytest.fixture
async def sdk() -> AsyncIterator[Clients]:
    clients = Clients()
    yield clients
    await clients.aclose()


def grpc_request(**kwargs: Any) -> pb.ChatRequest:
    return pb.ChatRequest(
        model=kwargs.pop("model", "demo-model"),
        messages=[
            pb.ChatMessage(role=pb.ROLE_SYSTEM, content="You are terse."),
            pb.ChatMessage(role=pb.ROLE_USER, content=PROMPT),
        ],
        **kwargs,
    )


# ------------------------------------------------------------------------------------------------ reply


def test_reply_is_deterministic_and_honours_limits() -> None:
    assert EXPECTED.text.startswith(f"This is a fake reply to: {PROMPT} lorem")
    assert len(EXPECTED.text.split()) == EXPECTED.completion_tokens == 20
    assert "".join(EXPECTED.tokens) == EXPECTED.text and EXPECTED.tokens[0] == "This "
    short = make_reply(PROMPT, max_tokens=5)
    assert (short.text, short.finish, short.completion_tokens) == ("This is a fake reply", "length", 5)
    stopped = make_reply(PROMPT, stop=["general", "fake"])
    assert (stopped.text, stopped.finish, stopped.stop_sequence) == ("This is a ", "stop", "fake")
    assert stopped.tokens == ("This ", "is ", "a ")
    assert make_reply("x " * 50, response_tokens=3).text == "This is a"


def test_constructor_refuses_non_loopback() -> None:
    with pytest.raises(ValueError, match="loopback"):
        FakeProvider("openai", host="0.0.0.0")
    with pytest.raises(ValueError, match="kind"):
        FakeProvider("cohere")


# ----------------------------------------------------------------------------------------------- openai


async def test_openai_plain(sdk: Clients, oai: FakeProvider) -> None:
    resp = await sdk.openai(oai).chat.completions.create(model="demo-model", messages=MESSAGES)
    assert resp.id.startswith("chatcmpl-") and resp.object == "chat.completion" and resp.model == "demo-model"
    choice = resp.choices[0]
    assert choice.message.content == EXPECTED.text and choice.message.role == "assistant"
    assert choice.message.refusal is None and choice.finish_reason == "stop" and choice.logprobs is None
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens, resp.usage.total_tokens) == (
        PROMPT_TOKENS,
        20,
        PROMPT_TOKENS + 20,
    )
    assert resp.system_fingerprint
    assert oai.stats["requests"] == oai.stats["completed"] == 1 and oai.inflight == 0


async def test_openai_stream_with_usage(sdk: Clients, oai: FakeProvider) -> None:
    stream = await sdk.openai(oai).chat.completions.create(
        model="demo-model", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    first = chunks[0].choices[0].delta
    assert (first.role, first.content) == ("assistant", "")
    tokens = [c.choices[0].delta.content for c in chunks[1:-2]]
    assert tokens == list(EXPECTED.tokens)
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (PROMPT_TOKENS, 20)
    assert oai.stats["completed"] == 1


async def test_openai_stream_wire_format(oai: FakeProvider, http: aiohttp.ClientSession) -> None:
    body = {"model": "demo-model", "messages": MESSAGES, "stream": True, "max_tokens": 2}
    headers = {"Authorization": f"Bearer {KEY}"}
    async with http.post(f"{oai.base_url}/chat/completions", json=body, headers=headers) as resp:
        assert resp.status == 200 and resp.content_type == "text/event-stream"
        raw = (await resp.read()).decode()
    events = raw.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""] and all(e.startswith("data: ") for e in events[:-1])
    parsed = [orjson.loads(e[6:]) for e in events[:-2]]
    assert [p["choices"][0]["delta"] for p in parsed] == [
        {"role": "assistant", "content": "", "refusal": None},
        {"content": "This "},
        {"content": "is"},
        {},
    ]
    assert parsed[-1]["choices"][0]["finish_reason"] == "length" and "usage" not in parsed[-1]


async def test_openai_models(sdk: Clients, oai: FakeProvider) -> None:
    page = await sdk.openai(oai).models.list()
    assert [(m.id, m.object) for m in page.data] == [("demo-model", "model"), ("demo-claude", "model")]
    assert all(m.created and m.owned_by for m in page.data)


async def test_openai_auth(sdk: Clients, oai: FakeProvider) -> None:
    wrong = "sk-wrong-0123456789abcdef"
    with pytest.raises(openai.AuthenticationError) as caught:
        await sdk.openai(oai, wrong).chat.completions.create(model="demo-model", messages=MESSAGES)
    assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"
    assert caught.value.type == "invalid_request_error" and wrong not in caught.value.message
    assert oai.stats["unauthorized"] == 1 and oai.stats["completed"] == 0


async def test_openai_unknown_model_and_bad_requests(
    sdk: Clients, oai: FakeProvider, http: aiohttp.ClientSession
) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await sdk.openai(oai).chat.completions.create(model="gpt-nope", messages=MESSAGES)
    assert caught.value.code == "model_not_found"
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    url = f"{oai.base_url}/chat/completions"
    for data in (b"{not json", b'{"model": "demo-model"}', b'{"model": "demo-model", "messages": []}'):
        async with http.post(url, data=data, headers=headers) as resp:
            assert resp.status == 400
            error = (await resp.json())["error"]
            assert error["type"] == "invalid_request_error" and set(error) == {
                "message",
                "type",
                "param",
                "code",
            }
    assert oai.stats["rejected"] == 4


async def test_openai_injected_500_then_success(sdk: Clients, oai: FakeProvider) -> None:
    oai.faults.fail_next = 1
    client = sdk.openai(oai)
    with pytest.raises(openai.InternalServerError) as caught:
        await client.chat.completions.create(model="demo-model", messages=MESSAGES)
    assert caught.value.status_code == 500 and caught.value.type == "server_error"
    resp = await client.chat.completions.create(model="demo-model", messages=MESSAGES)
    assert resp.choices[0].message.content == EXPECTED.text
    assert oai.stats["injected_errors"] == 1 and oai.faults.fail_next == 0


async def test_openai_rate_limit_every_second_request(sdk: Clients, oai: FakeProvider) -> None:
    oai.faults.rate_limit_every = 2
    oai.faults.retry_after_s = 2.5
    client = sdk.openai(oai)
    await client.chat.completions.create(model="demo-model", messages=MESSAGES)
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(model="demo-model", messages=MESSAGES)
    headers = caught.value.response.headers
    assert headers["retry-after"] == "2.5" and headers["x-ratelimit-remaining-requests"] == "0"
    assert caught.value.code == "rate_limit_exceeded"
    assert oai.stats["rate_limited"] == 1


async def test_openai_max_tokens_and_stop(sdk: Clients, oai: FakeProvider) -> None:
    client = sdk.openai(oai)
    resp = await client.chat.completions.create(model="demo-model", messages=MESSAGES, max_tokens=3)
    assert resp.choices[0].finish_reason == "length" and resp.choices[0].message.content == "This is a"
    assert resp.usage is not None and resp.usage.completion_tokens == 3
    resp = await client.chat.completions.create(model="demo-model", messages=MESSAGES, stop=[" reply"])
    assert resp.choices[0].finish_reason == "stop" and resp.choices[0].message.content == "This is a fake"


async def test_openai_stream_broken_midway(sdk: Clients, oai: FakeProvider) -> None:
    oai.faults.stream_error_after_tokens = 3
    stream = await sdk.openai(oai).chat.completions.create(model="demo-model", messages=MESSAGES, stream=True)
    received: list[str | None] = []
    with pytest.raises(openai.APIError, match="server had an error"):
        async for chunk in stream:
            received.append(chunk.choices[0].delta.content)
    assert received == ["", *EXPECTED.tokens[:3]]
    assert oai.stats["injected_errors"] == 1 and oai.stats["completed"] == 0


# -------------------------------------------------------------------------------------------- anthropic


async def test_anthropic_plain(sdk: Clients, ant: FakeProvider) -> None:
    msg = await sdk.anthropic(ant).messages.create(
        model="demo-claude",
        max_tokens=256,
        system="You are terse.",
        messages=[{"role": "user", "content": PROMPT}],
    )
    assert msg.id.startswith("msg_") and msg.type == "message" and msg.role == "assistant"
    assert msg.content[0].type == "text" and msg.content[0].text == EXPECTED.text
    assert (msg.stop_reason, msg.stop_sequence) == ("end_turn", None)
    assert (msg.usage.input_tokens, msg.usage.output_tokens) == (PROMPT_TOKENS, 20)


async def test_anthropic_stream(sdk: Clients, ant: FakeProvider) -> None:
    async with sdk.anthropic(ant).messages.stream(
        model="demo-claude",
        max_tokens=256,
        system=[{"type": "text", "text": "You are terse."}],
        messages=[{"role": "user", "content": [{"type": "text", "text": PROMPT}]}],
    ) as stream:
        texts = [text async for text in stream.text_stream]
        final = await stream.get_final_message()
    assert texts == list(EXPECTED.tokens)
    assert final.content[0].type == "text" and final.content[0].text == EXPECTED.text
    assert final.stop_reason == "end_turn"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (PROMPT_TOKENS, 20)
    assert ant.stats["completed"] == 1


async def test_anthropic_stream_event_sequence(ant: FakeProvider, http: aiohttp.ClientSession) -> None:
    body = {
        "model": "demo-claude",
        "max_tokens": 2,
        "messages": [{"role": "user", "content": PROMPT}],
        "stream": True,
    }
    headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
    async with http.post(f"{ant.base_url}/v1/messages", json=body, headers=headers) as resp:
        assert resp.status == 200 and resp.content_type == "text/event-stream"
        raw = (await resp.read()).decode()
    events = [e.split("\n") for e in raw.strip().split("\n\n")]
    names = [e[0].removeprefix("event: ") for e in events]
    assert names == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    datas = [orjson.loads(e[1].removeprefix("data: ")) for e in events]
    assert all(d["type"] == name for d, name in zip(datas, names, strict=True))
    assert datas[0]["message"]["content"] == [] and datas[0]["message"]["usage"]["input_tokens"] == 4
    assert datas[6]["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert datas[6]["usage"] == {"output_tokens": 2}


async def test_anthropic_stop_sequence_and_max_tokens(sdk: Clients, ant: FakeProvider) -> None:
    client = sdk.anthropic(ant)
    messages: list[Any] = [{"role": "user", "content": PROMPT}]
    msg = await client.messages.create(model="demo-claude", max_tokens=4, messages=messages)
    assert (msg.stop_reason, msg.usage.output_tokens) == ("max_tokens", 4)
    msg = await client.messages.create(
        model="demo-claude", max_tokens=99, messages=messages, stop_sequences=["fake"]
    )
    assert (msg.stop_reason, msg.stop_sequence) == ("stop_sequence", "fake")
    assert msg.content[0].type == "text" and msg.content[0].text == "This is a "


async def test_anthropic_overloaded_529(sdk: Clients, ant: FakeProvider) -> None:
    ant.faults.update({"fail_next": 1, "error_status": 529})
    with pytest.raises(anthropic.InternalServerError) as caught:
        await sdk.anthropic(ant).messages.create(
            model="demo-claude", max_tokens=10, messages=[{"role": "user", "content": PROMPT}]
        )
    assert isinstance(caught.value, anthropic.APIStatusError) and caught.value.status_code == 529
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["type"] == "error" and caught.value.body["error"]["type"] == "overloaded_error"


async def test_anthropic_auth_and_request_errors(
    sdk: Clients, ant: FakeProvider, http: aiohttp.ClientSession
) -> None:
    with pytest.raises(anthropic.AuthenticationError) as caught:
        await sdk.anthropic(ant, "wrong-key").messages.create(
            model="demo-claude", max_tokens=10, messages=[{"role": "user", "content": PROMPT}]
        )
    assert (
        isinstance(caught.value.body, dict) and caught.value.body["error"]["type"] == "authentication_error"
    )
    with pytest.raises(anthropic.NotFoundError):
        await sdk.anthropic(ant).messages.create(
            model="claude-nope", max_tokens=10, messages=[{"role": "user", "content": PROMPT}]
        )
    url = f"{ant.base_url}/v1/messages"
    cases = [
        (
            {"x-api-key": KEY},
            {"model": "demo-claude", "max_tokens": 5, "messages": MESSAGES[1:]},
            "anthropic-version",
        ),
        (
            {"x-api-key": KEY, "anthropic-version": "2023-06-01"},
            {"model": "demo-claude", "messages": []},
            "max_tokens",
        ),
    ]
    for headers, body, needle in cases:
        async with http.post(url, json=body, headers=headers) as resp:
            assert resp.status == 400
            payload = await resp.json()
            assert payload["type"] == "error" and payload["error"]["type"] == "invalid_request_error"
            assert needle in payload["error"]["message"]
    assert ant.stats["unauthorized"] == 1


async def test_anthropic_rate_limit_and_stream_error(sdk: Clients, ant: FakeProvider) -> None:
    client = sdk.anthropic(ant)
    messages: list[Any] = [{"role": "user", "content": PROMPT}]
    ant.faults.update({"rate_limit_every": 1, "retry_after_s": 3})
    with pytest.raises(anthropic.RateLimitError) as caught:
        await client.messages.create(model="demo-claude", max_tokens=10, messages=messages)
    assert caught.value.response.headers["retry-after"] == "3"
    ant.faults.update({"rate_limit_every": 0, "stream_error_after_tokens": 2, "error_status": 529})
    texts: list[str] = []
    with pytest.raises(anthropic.APIStatusError, match="overloaded_error"):
        async with client.messages.stream(model="demo-claude", max_tokens=99, messages=messages) as stream:
            async for text in stream.text_stream:
                texts.append(text)
    assert texts == list(EXPECTED.tokens[:2])


async def test_anthropic_models(sdk: Clients, ant: FakeProvider) -> None:
    page = await sdk.anthropic(ant).models.list()
    assert [(m.id, m.type) for m in page.data] == [("demo-model", "model"), ("demo-claude", "model")]
    assert page.data[1].display_name == "Demo Claude" and page.first_id == "demo-model"


# ------------------------------------------------------------------------------------------------- grpc


async def test_grpc_unary_stream_models_health(grpc_fake: FakeProvider) -> None:
    async with grpc.aio.insecure_channel(grpc_fake.target) as channel:
        stub = llm_service_pb2_grpc.LLMServiceStub(channel)
        resp = await stub.ChatCompletion(grpc_request(), metadata=AUTH)
        assert resp.content == EXPECTED.text and resp.finish_reason == pb.FINISH_REASON_STOP
        assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (PROMPT_TOKENS, 20)
        assert resp.id.startswith("chatcmpl-") and resp.created > 0
        chunks = [c async for c in stub.StreamingChat(grpc_request(max_tokens=4), metadata=AUTH)]
        assert [c.delta for c in chunks[:-1]] == list(make_reply(PROMPT, max_tokens=4).tokens)
        assert not any(c.HasField("usage") for c in chunks[:-1])
        final = chunks[-1]
        assert final.finish_reason == pb.FINISH_REASON_LENGTH and final.HasField("usage")
        assert (final.usage.prompt_tokens, final.usage.completion_tokens, final.usage.total_tokens) == (
            PROMPT_TOKENS,
            4,
            PROMPT_TOKENS + 4,
        )
        models = await stub.ListModels(pb.ListModelsRequest(), metadata=AUTH)
        assert [m.id for m in models.models] == ["demo-claude", "demo-model"]
        health = health_pb2_grpc.HealthStub(channel)
        check = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert check.status == health_pb2.HealthCheckResponse.SERVING
    assert grpc_fake.stats["completed"] == 2


async def test_grpc_auth_and_validation(grpc_fake: FakeProvider) -> None:
    async with grpc.aio.insecure_channel(grpc_fake.target) as channel:
        stub = llm_service_pb2_grpc.LLMServiceStub(channel)
        for metadata in ((), (("authorization", "Bearer wrong"),)):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.ChatCompletion(grpc_request(), metadata=metadata)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ChatCompletion(grpc_request(model="nope"), metadata=AUTH)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ChatCompletion(pb.ChatRequest(model="demo-model"), metadata=AUTH)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert grpc_fake.stats["unauthorized"] == 2 and grpc_fake.stats["rejected"] == 2


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (429, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (500, grpc.StatusCode.INTERNAL),
        (503, grpc.StatusCode.UNAVAILABLE),
        (529, grpc.StatusCode.UNAVAILABLE),
        (400, grpc.StatusCode.INVALID_ARGUMENT),
        (404, grpc.StatusCode.NOT_FOUND),
        (504, grpc.StatusCode.DEADLINE_EXCEEDED),
    ],
)
async def test_grpc_injected_status(grpc_fake: FakeProvider, status: int, code: grpc.StatusCode) -> None:
    grpc_fake.faults.update({"fail_next": 2, "error_status": status})
    async with grpc.aio.insecure_channel(grpc_fake.target) as channel:
        stub = llm_service_pb2_grpc.LLMServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ChatCompletion(grpc_request(), metadata=AUTH)
        assert caught.value.code() == code
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in stub.StreamingChat(grpc_request(), metadata=AUTH):
                pass
        assert caught.value.code() == code
    assert grpc_fake.stats["injected_errors"] == 2


async def test_grpc_rate_limit_retry_after_and_stream_error(grpc_fake: FakeProvider) -> None:
    grpc_fake.faults.update({"rate_limit_every": 1, "retry_after_s": 0.25})
    async with grpc.aio.insecure_channel(grpc_fake.target) as channel:
        stub = llm_service_pb2_grpc.LLMServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ChatCompletion(grpc_request(), metadata=AUTH)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert dict(caught.value.trailing_metadata() or ())["retry-after"] == "0.25"
        grpc_fake.faults.update({"rate_limit_every": 0, "stream_error_after_tokens": 2, "error_status": 503})
        deltas: list[str] = []
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for chunk in stub.StreamingChat(grpc_request(), metadata=AUTH):
                deltas.append(chunk.delta)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE and deltas == list(EXPECTED.tokens[:2])
    assert grpc_fake.stats["rate_limited"] == 1 and grpc_fake.stats["injected_errors"] == 1


async def test_same_text_on_all_three_kinds(
    sdk: Clients, oai: FakeProvider, ant: FakeProvider, grpc_fake: FakeProvider
) -> None:
    a = await sdk.openai(oai).chat.completions.create(model="demo-model", messages=MESSAGES, max_tokens=12)
    b = await sdk.anthropic(ant).messages.create(
        model="demo-claude", system="You are terse.", messages=MESSAGES[1:], max_tokens=12
    )
    async with grpc.aio.insecure_channel(grpc_fake.target) as channel:
        c = await llm_service_pb2_grpc.LLMServiceStub(channel).ChatCompletion(
            grpc_request(max_tokens=12), metadata=AUTH
        )
    assert b.content[0].type == "text" and a.usage is not None
    assert a.choices[0].message.content == b.content[0].text == c.content
    assert a.usage.prompt_tokens == b.usage.input_tokens == c.usage.prompt_tokens == PROMPT_TOKENS


# ---------------------------------------------------------------------------------------- control API


async def test_control_api(
    sdk: Clients, oai: FakeProvider, grpc_fake: FakeProvider, http: aiohttp.ClientSession
) -> None:
    base = oai.control_url
    async with http.put(f"{base}/_fake/faults", json={"fail_next": 1, "error_status": 503}) as resp:
        assert resp.status == 200 and (await resp.json())["fail_next"] == 1
    with pytest.raises(openai.InternalServerError) as caught:
        await sdk.openai(oai).chat.completions.create(model="demo-model", messages=MESSAGES)
    assert caught.value.status_code == 503
    async with http.get(f"{base}/_fake/stats") as resp:
        stats = await resp.json()
    assert stats["injected_errors"] == 1 and stats["requests"] == 1 and stats["inflight"] == 0
    async with http.get(f"{base}/_fake/faults") as resp:
        assert await resp.json() == Faults(error_status=503).as_dict()
    for bad in ({"bogus": 1}, {"error_rate": 2}, {"fail_next": "x"}, [1]):
        async with http.put(f"{base}/_fake/faults", json=bad) as resp:
            assert resp.status == 400 and "error" in await resp.json()
    assert oai.faults == Faults(error_status=503)
    async with http.delete(f"{base}/_fake/stats") as resp:
        assert (await resp.json())["requests"] == 0
    # The grpc kind serves the same API on its control port.
    assert grpc_fake.control_url is not None and grpc_fake.control_port != grpc_fake.port
    async with http.put(f"{grpc_fake.control_url}/_fake/faults", json={"latency_ms": 5}) as resp:
        assert resp.status == 200
    assert grpc_fake.faults.latency_ms == 5.0


# --------------------------------------------------------------------------------------- cancellation


async def test_cancelled_openai_stream_is_counted(sdk: Clients, oai: FakeProvider) -> None:
    oai.faults.token_delay_ms = 100
    stream = await sdk.openai(oai).chat.completions.create(model="demo-model", messages=MESSAGES, stream=True)
    async for _ in stream:
        break
    await stream.close()
    await wait_until(lambda: oai.stats["cancelled"] == 1)
    assert oai.inflight == 0 and oai.stats["completed"] == 0


async def test_cancelled_openai_unary_is_counted(sdk: Clients, oai: FakeProvider) -> None:
    oai.faults.latency_ms = 2000
    task = asyncio.create_task(sdk.openai(oai).chat.completions.create(model="demo-model", messages=MESSAGES))
    await wait_until(lambda: oai.inflight == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_until(lambda: oai.stats["cancelled"] == 1)
    assert oai.inflight == 0


async def test_cancelled_anthropic_stream_is_counted(sdk: Clients, ant: FakeProvider) -> None:
    ant.faults.token_delay_ms = 100
    async with sdk.anthropic(ant).messages.stream(
        model="demo-claude", max_tokens=99, messages=[{"role": "user", "content": PROMPT}]
    ) as stream:
        async for _ in stream.text_stream:
            break
    await wait_until(lambda: ant.stats["cancelled"] == 1)
    assert ant.inflight == 0 and ant.stats["completed"] == 0


async def test_cancelled_grpc_calls_are_counted(grpc_fake: FakeProvider) -> None:
    grpc_fake.faults.token_delay_ms = 100
    async with grpc.aio.insecure_channel(grpc_fake.target) as channel:
        stub = llm_service_pb2_grpc.LLMServiceStub(channel)
        call = stub.StreamingChat(grpc_request(), metadata=AUTH)
        await call.read()
        call.cancel()
        await wait_until(lambda: grpc_fake.stats["cancelled"] == 1)
        grpc_fake.faults.latency_ms = 2000
        unary = stub.ChatCompletion(grpc_request(), metadata=AUTH)
        await wait_until(lambda: grpc_fake.inflight == 1)
        unary.cancel()
        await wait_until(lambda: grpc_fake.stats["cancelled"] == 2)
    assert grpc_fake.inflight == 0 and grpc_fake.stats["completed"] == 0


# ------------------------------------------------------------------------------------------------- CLI


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_cli_run_serves_until_sigterm(sdk: Clients) -> None:
    port = free_port()
    code = (
        "import sys, argparse; from llmgw_dev import fakes as f; p=argparse.ArgumentParser(); "
        "f.configure_parser(p); sys.exit(f.run(p.parse_args(sys.argv[1:])))"
    )
    env = {**os.environ, "FAKE_KEY": KEY}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        "--kind",
        "openai",
        "--listen",
        f"127.0.0.1:{port}",
        "--api-key-env",
        "FAKE_KEY",
        "--response-tokens",
        "5",
        stdout=asyncio.subprocess.PIPE,
        env=env,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 15)
        assert line.decode() == f"fake-provider kind=openai listening on 127.0.0.1:{port}\n"
        resp = await sdk.openai(f"http://127.0.0.1:{port}/v1").chat.completions.create(
            model="demo-model", messages=MESSAGES
        )
        assert resp.choices[0].message.content == make_reply(PROMPT, response_tokens=5).text
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
        assert await proc.stdout.read() == b""
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_cli_refuses_non_loopback_and_missing_key(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    parser = argparse.ArgumentParser()
    fp.configure_parser(parser)
    with pytest.raises(SystemExit) as exited:
        parser.parse_args(["--kind", "openai", "--listen", "0.0.0.0:18001"])
    assert exited.value.code == 2 and "not a loopback address" in capsys.readouterr().err
    args = parser.parse_args(["--kind", "grpc", "--fail-next", "3", "--retry-after", "0.5"])
    assert args.listen == ("127.0.0.1", 18001)
    provider = fp.provider_from_args(args)
    assert provider.faults == Faults(fail_next=3, retry_after_s=0.5) and provider.kind == "grpc"
    monkeypatch.delenv("FAKE_MISSING_KEY", raising=False)
    assert fp.run(parser.parse_args(["--kind", "openai", "--api-key-env", "FAKE_MISSING_KEY"])) == 2
    assert "FAKE_MISSING_KEY" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ rich answers

TOOL: Any = {
    "type": "function",
    "function": {
        "name": "lookup",
        "parameters": {
            "type": "object",
            "properties": {"q": {"type": "string"}, "k": {"type": "integer"}, "mode": {"enum": ["a", "b"]}},
        },
    },
}


async def test_openai_records_requests_and_calls_tools(sdk: Clients, oai: FakeProvider) -> None:
    client = sdk.openai(oai)
    body = {"model": "demo-model", "messages": MESSAGES, "tools": [TOOL], "top_k": 5}
    reply = await client.chat.completions.create(
        model="demo-model",
        messages=MESSAGES,
        tools=[TOOL],
        extra_body={"top_k": 5},
    )
    assert oai.received[-1] == body, "the request's JSON as it arrived"
    (call,) = reply.choices[0].message.tool_calls or []
    assert reply.choices[0].finish_reason == "tool_calls" and reply.choices[0].message.content is None
    assert call.function.name == "lookup"  # type: ignore[union-attr]
    assert orjson.loads(call.function.arguments) == {"q": PROMPT, "k": 42, "mode": "a"}  # type: ignore[union-attr]

    stream = await client.chat.completions.create(
        model="demo-model", messages=MESSAGES, tools=[TOOL], stream=True
    )
    chunks = [c async for c in stream]
    deltas = [t for c in chunks for t in c.choices[0].delta.tool_calls or ()]
    assert deltas[0].id and deltas[0].function is not None and deltas[0].function.name == "lookup"
    assert len(deltas) > 2 and all(d.index == 0 for d in deltas)
    arguments = "".join(d.function.arguments or "" for d in deltas if d.function is not None)
    assert orjson.loads(arguments) == {"q": PROMPT, "k": 42, "mode": "a"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    answer = [*MESSAGES, reply.choices[0].message.model_dump(exclude_unset=True)]
    answer.append({"role": "tool", "tool_call_id": call.id, "content": "found it"})
    final = await client.chat.completions.create(model="demo-model", messages=answer, tools=[TOOL])
    assert final.choices[0].message.content == make_reply("found it").text


async def test_openai_reasoning_logprobs_n_and_usage_details(sdk: Clients, oai: FakeProvider) -> None:
    reply = await sdk.openai(oai).chat.completions.create(
        model="demo-model", messages=MESSAGES, reasoning_effort="low", logprobs=True, top_logprobs=2, n=2
    )
    assert [c.index for c in reply.choices] == [0, 1]
    assert (reply.choices[0].message.model_extra or {})["reasoning_content"] == f"Thinking about: {PROMPT}"
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None
    assert [t.token for t in logprobs.content] == list(EXPECTED.tokens)
    assert len(logprobs.content[0].top_logprobs) == 2
    usage = reply.usage
    assert usage is not None and usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 3  # the system prompt, before the last message
    assert (
        usage.completion_tokens_details is not None and usage.completion_tokens_details.reasoning_tokens == 6
    )
    assert usage.completion_tokens == 2 * 20 + 6


async def test_grpc_fake_answers_the_openai_layout_and_records_requests(grpc_fake: FakeProvider) -> None:
    async with grpc.aio.insecure_channel(grpc_fake.target) as channel:
        stub = llm_service_pb2_grpc.LLMServiceStub(channel)
        request = grpc_request(chunk_layout=pb.CHUNK_LAYOUT_OPENAI, reasoning_effort="low")
        chunks = [c async for c in stub.StreamingChat(request, metadata=AUTH)]
        assert grpc_fake.received[-1] == request
        assert chunks[0].choices[0].delta.role == "assistant" and not chunks[-1].HasField("usage")
        reasoning = "".join(c.choices[0].delta.reasoning_content for c in chunks if c.choices)
        assert reasoning.strip() == f"Thinking about: {PROMPT}"
        assert chunks[-1].choices[0].finish_reason == "stop"
        request.stream_options.include_usage = True
        chunks = [c async for c in stub.StreamingChat(request, metadata=AUTH)]
        assert not chunks[-1].choices and chunks[-1].usage.completion_tokens_details.reasoning_tokens == 6
