"""Stream timing against a real proxy on 127.0.0.1: a provider's ``timeoutSeconds`` bounds only the wait for
its answer's first byte (REST headers, a gRPC stream's first message), ``streamIdleTimeoutSeconds`` each gap
within the answer, and the client's deadline (``x-llmgw-timeout-seconds``, a gRPC deadline,
``limits.requestTimeoutSeconds``) the whole request.

Each case runs through an openai provider (REST) and an llmgateway provider (gRPC), the REST front with the
official ``openai`` SDK and the gRPC front with grpcio.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import openai
import pytest

from llmgateway.v1 import llm_service_pb2 as pb
from llmgateway.v1 import llm_service_pb2_grpc as pb_grpc
from llmgw.server import ProxyServer
from llmgw_dev.fakes import FakeProvider

TOKENS = 8
ROUTES = ["rest-only", "grpc-only"]
USER = [{"role": "user", "content": "hello there"}]


class Upstreams:
    def __init__(self, openai_fake: FakeProvider, grpc_fake: FakeProvider) -> None:
        self.openai, self.grpc = openai_fake, grpc_fake

    def each(self) -> tuple[FakeProvider, FakeProvider]:
        return self.openai, self.grpc


@pytest.fixture
async def upstreams() -> AsyncIterator[Upstreams]:
    async with (
        FakeProvider("openai", response_tokens=TOKENS) as openai_fake,
        FakeProvider("grpc", response_tokens=TOKENS) as grpc_fake,
    ):
        yield Upstreams(openai_fake, grpc_fake)


def config(up: Upstreams, timeout: float, idle: float, request_timeout: float = 30) -> dict[str, Any]:
    once = {"maxAttempts": 1}
    common = {"timeoutSeconds": timeout, "streamIdleTimeoutSeconds": idle, "retries": once}
    return {
        "listen": {"grpc": "127.0.0.1:0", "rest": "127.0.0.1:0", "admin": "127.0.0.1:0"},
        "limits": {"requestTimeoutSeconds": request_timeout},
        "providers": [
            {"name": "openai-fake", "openai": {"baseURL": up.openai.base_url}, **common},
            {"name": "grpc-fake", "llmgateway": {"target": up.grpc.target}, **common},
        ],
        "routes": [
            {"model": "rest-only", "rest": "openai-fake", "upstreamModel": "demo-model"},
            {"model": "grpc-only", "grpc": "grpc-fake", "upstreamModel": "demo-model"},
        ],
    }


def sdk(server: ProxyServer, **headers: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{server.rest_port}/v1",
        api_key="unused",
        max_retries=0,
        default_headers=headers,
    )


async def sdk_stream(server: ProxyServer, route: str, **headers: str) -> str:
    stream = await sdk(server, **headers).chat.completions.create(model=route, messages=USER, stream=True)  # type: ignore[arg-type]
    return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])


async def grpc_stream(server: ProxyServer, route: str, timeout: float | None = None) -> str:
    request = pb.ChatRequest(model=route, messages=[pb.ChatMessage(role=pb.ROLE_USER, content="hello there")])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = pb_grpc.LLMServiceStub(channel)
        return "".join([c.delta async for c in stub.StreamingChat(request, timeout=timeout)])


async def test_a_stream_longer_than_timeout_seconds_that_keeps_flowing_completes(
    upstreams: Upstreams, start_proxy: Any
) -> None:
    """8 tokens 250 ms apart (about 1.75 s) through providers whose timeoutSeconds is 0.6 s."""
    for fake in upstreams.each():
        fake.faults.token_delay_ms = 250
    server = await start_proxy(config(upstreams, timeout=0.6, idle=0.6))
    started = time.monotonic()
    for route in ROUTES:
        assert (await sdk_stream(server, route)).startswith("This is a fake reply to: hello there")
        assert len((await grpc_stream(server, route)).split()) == TOKENS
    assert time.monotonic() - started > 4 * 1.7


@pytest.mark.parametrize("route", ROUTES)
async def test_a_stalled_stream_ends_with_an_error_naming_the_provider_and_the_timeout(
    upstreams: Upstreams, start_proxy: Any, route: str
) -> None:
    for fake in upstreams.each():
        fake.faults.update({"token_delay_ms": 100, "stream_stall_after_tokens": 3})
    server = await start_proxy(config(upstreams, timeout=5, idle=0.5))
    provider = "openai-fake" if route == "rest-only" else "grpc-fake"
    started = time.monotonic()
    with pytest.raises(openai.APIError) as caught:
        await sdk_stream(server, route)
    message = str(caught.value)
    assert provider in message and "streamIdleTimeoutSeconds (0.5 s)" in message, message
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await grpc_stream(server, route)
    assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert provider in (failed.value.details() or "") and "streamIdleTimeoutSeconds" in (
        failed.value.details() or ""
    )
    assert time.monotonic() - started < 4  # two stalls of 0.5 s, not the 5 s of timeoutSeconds


@pytest.mark.parametrize("route", ROUTES)
async def test_a_first_byte_later_than_timeout_seconds_fails(
    upstreams: Upstreams, start_proxy: Any, route: str
) -> None:
    for fake in upstreams.each():
        fake.faults.latency_ms = 1500
    server = await start_proxy(config(upstreams, timeout=0.4, idle=5))
    provider = "openai-fake" if route == "rest-only" else "grpc-fake"
    with pytest.raises(openai.APIStatusError) as caught:
        await sdk(server).chat.completions.create(model=route, messages=USER)  # type: ignore[arg-type]
    assert caught.value.status_code == 504
    assert f"provider '{provider}' sent no answer within its timeoutSeconds (0.4 s)" in str(caught.value)
    with pytest.raises(openai.APIStatusError) as caught:
        await sdk_stream(server, route)
    assert caught.value.status_code == 504 and "timeoutSeconds" in str(caught.value)
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await grpc_stream(server, route)
    assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_the_clients_deadline_bounds_the_whole_stream(upstreams: Upstreams, start_proxy: Any) -> None:
    """A healthy stream of about 1.75 s, a client deadline of 0.8 s: the request ends at the deadline."""
    for fake in upstreams.each():
        fake.faults.token_delay_ms = 250
    server = await start_proxy(config(upstreams, timeout=5, idle=5))
    for route in ROUTES:
        started = time.monotonic()
        with pytest.raises(openai.APIError) as caught:
            await sdk_stream(server, route, **{"x-llmgw-timeout-seconds": "0.8"})
        assert "deadline" in str(caught.value)
        assert time.monotonic() - started < 1.5
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await grpc_stream(server, route, timeout=0.8)
        assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    with pytest.raises(openai.BadRequestError, match="x-llmgw-timeout-seconds"):
        await sdk_stream(server, "rest-only", **{"x-llmgw-timeout-seconds": "soon"})


def test_the_crds_stream_idle_timeout_reaches_the_proxy_config() -> None:
    """``streamIdleTimeout`` in an LLMGateway becomes the provider's ``streamIdleTimeoutSeconds``; unset, the
    proxy uses the provider's ``timeoutSeconds``."""
    from llmgw_common import config as proxy_config
    from llmgw_operator import manifests
    from llmgw_operator.spec import with_defaults

    spec = with_defaults(
        {
            "providers": [
                {
                    "name": "a",
                    "openai": {"baseURL": "https://api.openai.com/v1"},
                    "streamIdleTimeout": "1m30s",
                },
                {"name": "b", "llmgateway": {"target": "vllm:50051"}, "timeout": "45s"},
            ],
            "routes": [{"model": "m", "rest": "a", "grpc": "b"}],
        }
    )
    rendered = manifests.build_proxy_config(spec, 0, 1)
    assert rendered["providers"][0]["streamIdleTimeoutSeconds"] == 90
    assert "streamIdleTimeoutSeconds" not in rendered["providers"][1]
    parsed = proxy_config.parse(rendered).providers
    assert (parsed["a"].timeout_s, parsed["a"].idle_timeout_s) == (120, 90)
    assert (parsed["b"].timeout_s, parsed["b"].idle_timeout_s) == (45, 45)
    rendered["providers"][0]["streamIdleTimeoutSeconds"] = 0
    with pytest.raises(
        proxy_config.ConfigError, match=r"providers\[0\]\.streamIdleTimeoutSeconds: must be > 0"
    ):
        proxy_config.parse(rendered)
