"""The client library against real servers on 127.0.0.1: fake providers (gRPC, OpenAI REST) and the proxy."""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import random
import ssl
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeAlias

import pytest

from llmgateway.v1 import llm_service_pb2 as pb
from llmgw.client import (
    BACKOFF_BASE_S,
    BACKOFF_CAP_S,
    LLMConnection,
    LLMGrpcClient,
    LLMHttpClient,
    backoff_delay,
)
from llmgw.errors import GatewayError, Kind
from llmgw_dev.fakes import FakeProvider

pytestmark = pytest.mark.timeout(30)

KEY = "sk-test-0123456789abcdef"
MESSAGES = [{"role": "user", "content": "hello there"}]
EXPECTED_PREFIX = "This is a fake reply to: hello there"

Client: TypeAlias = LLMGrpcClient | LLMHttpClient


@pytest.fixture
async def grpc_fake() -> AsyncIterator[FakeProvider]:
    async with FakeProvider("grpc", api_key=KEY) as fake:
        yield fake


@pytest.fixture
async def openai_fake() -> AsyncIterator[FakeProvider]:
    async with FakeProvider("openai", api_key=KEY) as fake:
        yield fake


def make_client(
    transport: str, grpc_fake: FakeProvider, openai_fake: FakeProvider, **kwargs: Any
) -> tuple[Client, FakeProvider]:
    kwargs.setdefault("api_key", KEY)
    if transport == "grpc":
        return LLMGrpcClient(grpc_fake.target, **kwargs), grpc_fake
    return LLMHttpClient(openai_fake.base_url, **kwargs), openai_fake


both = pytest.mark.parametrize("transport", ["grpc", "rest"])


async def collect(stream: AsyncIterator[pb.ChatChunk]) -> list[pb.ChatChunk]:
    return [chunk async for chunk in stream]


# ------------------------------------------------------------------------------------------ backoff_delay


def test_backoff_delay_full_jitter_within_exponential_bounds() -> None:
    rng = random.Random(7)
    for attempt in range(1, 12):
        ceiling = min(5.0, 0.1 * 2 ** (attempt - 1))
        draws = [backoff_delay(attempt, base=0.1, cap=5.0, retry_after=None, rng=rng) for _ in range(300)]
        assert all(0.0 <= d <= ceiling for d in draws)
        # Full jitter: the draws spread over the whole interval, not just near its top.
        assert min(draws) < 0.2 * ceiling and max(draws) > 0.8 * ceiling


def test_backoff_delay_is_capped() -> None:
    rng = random.Random(1)
    assert all(backoff_delay(40, base=0.1, cap=5.0, retry_after=None, rng=rng) <= 5.0 for _ in range(500))
    assert max(backoff_delay(40, base=0.1, cap=5.0, retry_after=None, rng=rng) for _ in range(500)) > 4.0


def test_backoff_delay_honours_retry_after_as_a_floor() -> None:
    rng = random.Random(3)
    # Retry-After beyond the jitter window is used as is (and is not capped: the server knows best).
    assert backoff_delay(1, base=0.1, cap=5.0, retry_after=2.0, rng=rng) == 2.0
    assert backoff_delay(1, base=0.1, cap=5.0, retry_after=30.0, rng=rng) == 30.0
    # Inside the window it is a lower bound on the jittered delay.
    draws = [backoff_delay(8, base=0.1, cap=5.0, retry_after=1.0, rng=rng) for _ in range(300)]
    assert all(1.0 <= d <= 5.0 for d in draws) and max(draws) > 4.0
    assert backoff_delay(3, base=0.1, cap=5.0, retry_after=0.0, rng=rng) <= 0.4


def test_backoff_delay_is_a_pure_function_of_its_rng() -> None:
    a = [backoff_delay(n, base=0.1, cap=5.0, retry_after=None, rng=random.Random(42)) for n in range(1, 8)]
    b = [backoff_delay(n, base=0.1, cap=5.0, retry_after=None, rng=random.Random(42)) for n in range(1, 8)]
    assert a == b
    assert (BACKOFF_BASE_S, BACKOFF_CAP_S) == (0.1, 5.0)


# --------------------------------------------------------------------------------------- request building


async def test_kwargs_are_validated_like_the_rest_front_before_any_network() -> None:
    client = LLMHttpClient("http://127.0.0.1:9/v1")  # discard port: never contacted
    with pytest.raises(GatewayError) as info:
        await client.chat_completion(model="demo-model", messages=[{"role": "robot", "content": "hi"}])
    assert info.value.kind is Kind.INVALID_ARGUMENT
    assert "messages[0].role: unknown role 'robot'" in info.value.message
    with pytest.raises(TypeError, match="either a ChatRequest or keyword arguments"):
        await client.chat_completion(pb.ChatRequest(model="m"), model="m")
    with pytest.raises(TypeError, match="streaming_chat"):
        await client.chat_completion(model="demo-model", messages=MESSAGES, stream=True)
    await client.close()


# ------------------------------------------------------------------------------------ unary/stream/models


@both
async def test_unary_with_kwargs_and_with_a_request(
    transport: str, grpc_fake: FakeProvider, openai_fake: FakeProvider
) -> None:
    client, _ = make_client(transport, grpc_fake, openai_fake)
    async with client:
        reply = await client.chat_completion(model="demo-model", messages=MESSAGES, temperature=0.2)
        assert isinstance(reply, pb.ChatResponse)
        assert reply.content.startswith(EXPECTED_PREFIX)
        assert reply.model == "demo-model" and reply.id.startswith("chatcmpl-")
        assert reply.finish_reason == pb.FINISH_REASON_STOP
        assert reply.usage.prompt_tokens == 2 and reply.usage.completion_tokens == 20
        assert reply.usage.total_tokens == 22

        request = pb.ChatRequest(
            model="demo-model",
            messages=[pb.ChatMessage(role=pb.ROLE_USER, content="hello there")],
            max_tokens=5,
        )
        short = await client.chat_completion(request)
        assert short.content == "This is a fake reply"
        assert short.finish_reason == pb.FINISH_REASON_LENGTH


@both
async def test_stream_yields_deltas_then_one_final_chunk_with_usage(
    transport: str, grpc_fake: FakeProvider, openai_fake: FakeProvider
) -> None:
    client, fake = make_client(transport, grpc_fake, openai_fake)
    async with client:
        chunks = await collect(client.streaming_chat(model="demo-model", messages=MESSAGES))
        unary = await client.chat_completion(model="demo-model", messages=MESSAGES)
    assert all(isinstance(c, pb.ChatChunk) for c in chunks)
    assert "".join(c.delta for c in chunks) == unary.content
    final = chunks[-1]
    assert final.finish_reason == pb.FINISH_REASON_STOP
    assert final.HasField("usage") and final.usage.total_tokens == 22
    # OpenAI's separate finish and usage-only chunks are merged, so both transports end the same way.
    assert not any(c.HasField("usage") or c.finish_reason for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1
    assert fake.stats["completed"] == 2


@both
async def test_list_models(transport: str, grpc_fake: FakeProvider, openai_fake: FakeProvider) -> None:
    client, _ = make_client(transport, grpc_fake, openai_fake)
    async with client:
        assert sorted(await client.list_models()) == ["demo-claude", "demo-model"]


@both
async def test_bad_api_key_is_unauthenticated_and_not_retried(
    transport: str, grpc_fake: FakeProvider, openai_fake: FakeProvider
) -> None:
    client, fake = make_client(transport, grpc_fake, openai_fake, api_key="sk-wrong")
    async with client:
        with pytest.raises(GatewayError) as info:
            await client.chat_completion(model="demo-model", messages=MESSAGES)
        assert info.value.kind is Kind.UNAUTHENTICATED
        assert info.value.upstream_status == 401 and not info.value.retryable
        assert info.value.message  # the server's own words
        with pytest.raises(GatewayError) as info:
            await client.list_models()
        assert info.value.kind is Kind.UNAUTHENTICATED
    assert fake.stats["requests"] == 1  # one chat request: not retried


@both
async def test_no_api_key_is_rejected(
    transport: str, grpc_fake: FakeProvider, openai_fake: FakeProvider
) -> None:
    client, _ = make_client(transport, grpc_fake, openai_fake, api_key=None)
    async with client:
        with pytest.raises(GatewayError) as info:
            await collect(client.streaming_chat(model="demo-model", messages=MESSAGES))
    assert info.value.kind is Kind.UNAUTHENTICATED


@both
async def test_unknown_model_is_not_found_with_the_servers_message(
    transport: str, grpc_fake: FakeProvider, openai_fake: FakeProvider
) -> None:
    client, fake = make_client(transport, grpc_fake, openai_fake)
    async with client:
        with pytest.raises(GatewayError) as info:
            await client.chat_completion(model="no-such-model", messages=MESSAGES)
    assert info.value.kind is Kind.NOT_FOUND and "no-such-model" in info.value.message
    assert fake.stats["requests"] == 1


# ------------------------------------------------------------------------------------------------ retries


@both
async def test_retries_until_the_third_attempt_succeeds(
    transport: str, grpc_fake: FakeProvider, openai_fake: FakeProvider
) -> None:
    client, fake = make_client(transport, grpc_fake, openai_fake)
    fake.faults.error_status = 503
    fake.faults.fail_next = 2
    async with client:
        reply = await client.chat_completion(model="demo-model", messages=MESSAGES)
    assert reply.content.startswith(EXPECTED_PREFIX)
    assert fake.stats["requests"] == 3 and fake.stats["injected_errors"] == 2


@both
async def test_gives_up_after_max_attempts(
    transport: str, grpc_fake: FakeProvider, openai_fake: FakeProvider
) -> None:
    client, fake = make_client(transport, grpc_fake, openai_fake, max_attempts=2)
    fake.faults.error_status = 500
    fake.faults.fail_next = 5
    async with client:
        with pytest.raises(GatewayError) as info:
            await client.chat_completion(model="demo-model", messages=MESSAGES)
    assert info.value.kind is Kind.INTERNAL and info.value.retryable and info.value.upstream_status == 500
    assert fake.stats["requests"] == 2


@both
async def test_rate_limit_waits_for_retry_after(
    transport: str, grpc_fake: FakeProvider, openai_fake: FakeProvider
) -> None:
    client, fake = make_client(transport, grpc_fake, openai_fake)
    fake.faults.rate_limit_every = 2  # the 2nd, 4th, ... requests are answered 429 / RESOURCE_EXHAUSTED
    fake.faults.retry_after_s = 0.4
    async with client:
        await client.chat_completion(model="demo-model", messages=MESSAGES)  # request 1: answered
        started = time.monotonic()
        reply = await client.chat_completion(model="demo-model", messages=MESSAGES)  # 2: limited, 3: ok
        elapsed = time.monotonic() - started
    assert reply.content.startswith(EXPECTED_PREFIX)
    assert fake.stats["rate_limited"] == 1 and fake.stats["requests"] == 3
    assert 0.39 <= elapsed < 2.0  # waited the server's 0.4 s, not the 0-0.1 s of the first backoff step


@both
async def test_retry_after_beyond_the_timeout_fails_at_once(
    transport: str, grpc_fake: FakeProvider, openai_fake: FakeProvider
) -> None:
    client, fake = make_client(transport, grpc_fake, openai_fake, timeout=2.0)
    fake.faults.rate_limit_every = 1
    fake.faults.retry_after_s = 5
    started = time.monotonic()
    async with client:
        with pytest.raises(GatewayError) as info:
            await client.chat_completion(model="demo-model", messages=MESSAGES)
    assert time.monotonic() - started < 1.0
    assert info.value.kind is Kind.RESOURCE_EXHAUSTED and info.value.retry_after == 5.0
    assert fake.stats["requests"] == 1


@both
async def test_stream_is_retried_before_its_first_chunk(
    transport: str, grpc_fake: FakeProvider, openai_fake: FakeProvider
) -> None:
    client, fake = make_client(transport, grpc_fake, openai_fake)
    fake.faults.error_status = 503
    fake.faults.fail_next = 1
    async with client:
        chunks = await collect(client.streaming_chat(model="demo-model", messages=MESSAGES))
    assert chunks[-1].usage.completion_tokens == 20
    assert fake.stats["requests"] == 2


@both
async def test_stream_is_not_retried_after_its_first_chunk(
    transport: str, grpc_fake: FakeProvider, openai_fake: FakeProvider
) -> None:
    client, fake = make_client(transport, grpc_fake, openai_fake)
    fake.faults.error_status = 503
    fake.faults.stream_error_after_tokens = 3
    received: list[str] = []
    async with client:
        with pytest.raises(GatewayError) as info:
            async for chunk in client.streaming_chat(model="demo-model", messages=MESSAGES):
                received.append(chunk.delta)
    assert "".join(received) == "This is a "  # three tokens (plus OpenAI's empty role chunk), then the error
    assert info.value.message
    assert fake.stats["requests"] == 1 and fake.stats["injected_errors"] == 1


@both
async def test_closing_a_stream_early_cancels_the_call(
    transport: str, grpc_fake: FakeProvider, openai_fake: FakeProvider
) -> None:
    client, fake = make_client(transport, grpc_fake, openai_fake)
    fake.faults.token_delay_ms = 50
    async with client:
        stream = client.streaming_chat(model="demo-model", messages=MESSAGES)
        async with contextlib.aclosing(stream):
            async for chunk in stream:
                if chunk.delta:
                    break
        for _ in range(100):
            if fake.stats["cancelled"]:
                break
            await asyncio.sleep(0.02)
    assert fake.stats["cancelled"] == 1 and fake.stats["completed"] == 0


@pytest.mark.parametrize("kind", ["grpc", "openai"])
async def test_unreachable_server_is_a_retryable_unavailable(kind: str) -> None:
    async with FakeProvider(kind) as fake:
        address = fake.target if kind == "grpc" else fake.base_url
    client: Client = LLMGrpcClient(address, max_attempts=2) if kind == "grpc" else LLMHttpClient(address)
    async with client:
        with pytest.raises(GatewayError) as info:
            await client.list_models()
    assert info.value.kind is Kind.UNAVAILABLE and info.value.retryable
    if kind == "openai":
        assert "cannot reach" in info.value.message


async def test_timeout_bounds_a_slow_call() -> None:
    async with FakeProvider("grpc", faults=None) as fake:
        fake.faults.latency_ms = 3000
        started = time.monotonic()
        async with LLMGrpcClient(fake.target, timeout=0.5) as client:
            with pytest.raises(GatewayError) as info:
                await client.chat_completion(model="demo-model", messages=MESSAGES)
        assert time.monotonic() - started < 2.0
    assert info.value.kind is Kind.DEADLINE_EXCEEDED and not info.value.retryable


# ------------------------------------------------------------------------------------------ LLMConnection


def connection(grpc_target: str, openai_fake: FakeProvider, **kwargs: Any) -> LLMConnection:
    return LLMConnection(grpc_target=grpc_target, rest_base_url=openai_fake.base_url, api_key=KEY, **kwargs)


async def test_connection_prefers_grpc_and_can_be_told_to_use_rest(
    grpc_fake: FakeProvider, openai_fake: FakeProvider
) -> None:
    async with connection(grpc_fake.target, openai_fake) as llm:
        assert llm.last_transport is None
        reply = await llm.chat_completion(model="demo-model", messages=MESSAGES)
        assert reply.content.startswith(EXPECTED_PREFIX) and llm.last_transport == "grpc"
        assert sorted(await llm.list_models()) == ["demo-claude", "demo-model"]
    async with connection(grpc_fake.target, openai_fake, use_grpc=False) as llm:
        chunks = await collect(llm.streaming_chat(model="demo-model", messages=MESSAGES))
        assert "".join(c.delta for c in chunks) == reply.content and llm.last_transport == "rest"
    async with LLMConnection(rest_base_url=openai_fake.base_url, api_key=KEY) as llm:
        await llm.chat_completion(model="demo-model", messages=MESSAGES)
        assert llm.last_transport == "rest"
    assert grpc_fake.stats["requests"] == 1 and openai_fake.stats["requests"] == 2
    with pytest.raises(ValueError, match="grpc_target"):
        LLMConnection()


async def test_connection_falls_back_to_rest_when_the_grpc_server_is_down(openai_fake: FakeProvider) -> None:
    grpc_fake = FakeProvider("grpc", api_key=KEY)
    await grpc_fake.start()
    target = grpc_fake.target
    await grpc_fake.stop()
    async with connection(target, openai_fake, max_attempts=2) as llm:
        reply = await llm.chat_completion(model="demo-model", messages=MESSAGES)
        assert reply.content.startswith(EXPECTED_PREFIX) and llm.last_transport == "rest"
        chunks = await collect(llm.streaming_chat(model="demo-model", messages=MESSAGES))
        assert chunks[-1].usage.total_tokens == 22 and llm.last_transport == "rest"
        assert sorted(await llm.list_models()) == ["demo-claude", "demo-model"]
        assert llm.last_transport == "rest"


async def test_connection_falls_back_to_rest_when_grpc_answers_503(
    grpc_fake: FakeProvider, openai_fake: FakeProvider
) -> None:
    grpc_fake.faults.error_rate = 1.0
    grpc_fake.faults.error_status = 503
    async with connection(grpc_fake.target, openai_fake) as llm:
        reply = await llm.chat_completion(model="demo-model", messages=MESSAGES)
        assert reply.content.startswith(EXPECTED_PREFIX) and llm.last_transport == "rest"
        chunks = await collect(llm.streaming_chat(model="demo-model", messages=MESSAGES))
        assert chunks[-1].finish_reason == pb.FINISH_REASON_STOP and llm.last_transport == "rest"
    assert grpc_fake.stats["requests"] == 6  # 3 attempts for each call, then REST
    assert openai_fake.stats["requests"] == 2


async def test_connection_without_fallback_raises(grpc_fake: FakeProvider, openai_fake: FakeProvider) -> None:
    grpc_fake.faults.error_rate = 1.0
    grpc_fake.faults.error_status = 503
    async with connection(grpc_fake.target, openai_fake, fallback=False, max_attempts=1) as llm:
        with pytest.raises(GatewayError) as info:
            await llm.chat_completion(model="demo-model", messages=MESSAGES)
    assert info.value.kind is Kind.UNAVAILABLE and info.value.upstream_status == 503
    assert llm.last_transport == "grpc" and openai_fake.stats["requests"] == 0


@pytest.mark.parametrize(
    ("kwargs", "kind"),
    [({"temperature": 3.0}, Kind.INVALID_ARGUMENT), ({"model": "no-such-model"}, Kind.NOT_FOUND)],
)
async def test_connection_does_not_fall_back_on_a_client_error(
    grpc_fake: FakeProvider, openai_fake: FakeProvider, kwargs: dict[str, Any], kind: Kind
) -> None:
    async with connection(grpc_fake.target, openai_fake) as llm:
        with pytest.raises(GatewayError) as info:
            await llm.chat_completion(**{"model": "demo-model", "messages": MESSAGES, **kwargs})
        assert info.value.kind is kind and not info.value.retryable
        with pytest.raises(GatewayError):
            await collect(llm.streaming_chat(**{"model": "demo-model", "messages": MESSAGES, **kwargs}))
    assert llm.last_transport == "grpc"
    assert grpc_fake.stats["requests"] == 2 and openai_fake.stats["requests"] == 0


async def test_connection_does_not_fall_back_once_a_stream_has_started(
    grpc_fake: FakeProvider, openai_fake: FakeProvider
) -> None:
    grpc_fake.faults.error_status = 503
    grpc_fake.faults.stream_error_after_tokens = 2
    async with connection(grpc_fake.target, openai_fake) as llm:
        received: list[str] = []
        with pytest.raises(GatewayError):
            async for chunk in llm.streaming_chat(model="demo-model", messages=MESSAGES):
                received.append(chunk.delta)
    assert received == ["This ", "is "] and llm.last_transport == "grpc"
    assert grpc_fake.stats["requests"] == 1 and openai_fake.stats["requests"] == 0


# ------------------------------------------------------------------------------------------ via the proxy


async def test_connection_through_the_proxy_on_both_fronts(
    fakes: Any, start_proxy: Callable[[dict[str, Any]], Any]
) -> None:
    from conftest import proxy_config  # the shared fixture module (tests/ is on sys.path under pytest)

    server = await start_proxy(proxy_config(fakes))
    grpc_target, rest_url = f"127.0.0.1:{server.grpc_port}", f"http://127.0.0.1:{server.rest_port}/v1"
    for use_grpc in (True, False):
        async with LLMConnection(grpc_target=grpc_target, rest_base_url=rest_url, use_grpc=use_grpc) as llm:
            reply = await llm.chat_completion(model="demo-model", messages=MESSAGES)
            chunks = await collect(llm.streaming_chat(model="demo-model", messages=MESSAGES))
            models = await llm.list_models()
            assert llm.last_transport == ("grpc" if use_grpc else "rest")
        assert reply.content.startswith(EXPECTED_PREFIX)
        assert "".join(c.delta for c in chunks) == reply.content
        assert chunks[-1].usage.total_tokens == reply.usage.total_tokens
        assert "demo-model" in models


async def test_tls_on_both_fronts(
    fakes: Any, start_proxy: Callable[[dict[str, Any]], Any], certificate: tuple[pathlib.Path, pathlib.Path]
) -> None:
    from conftest import proxy_config

    cert, key = certificate
    server = await start_proxy(proxy_config(fakes, tls={"certFile": str(cert), "keyFile": str(key)}))
    context = ssl.create_default_context(cafile=str(cert))
    async with LLMConnection(
        grpc_target=f"localhost:{server.grpc_port}",
        rest_base_url=f"https://localhost:{server.rest_port}/v1",
        tls=True,
        root_certificates=cert.read_bytes(),
        ssl=context,
        fallback=False,
    ) as llm:
        assert (await llm.chat_completion(model="demo-model", messages=MESSAGES)).content.startswith(
            EXPECTED_PREFIX
        )
        assert llm.last_transport == "grpc"
    async with LLMHttpClient(f"https://localhost:{server.rest_port}/v1", ssl=context) as rest:
        chunks = await collect(rest.streaming_chat(model="demo-model", messages=MESSAGES))
        assert chunks[-1].usage.completion_tokens == 20
    # Without the certificate's CA the connection is refused, as it should be.
    async with LLMGrpcClient(f"localhost:{server.grpc_port}", tls=True, max_attempts=1) as untrusting:
        with pytest.raises(GatewayError) as info:
            await untrusting.list_models()
        assert info.value.kind is Kind.UNAVAILABLE and info.value.retryable
