"""The proxy against real servers on 127.0.0.1: the official openai SDK on the REST front, a grpc.aio
client on the gRPC front, and fake OpenAI, Anthropic and gRPC providers behind it."""

from __future__ import annotations

import asyncio
import pathlib
import ssl
import time
from typing import Any

import aiohttp
import grpc
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from conftest import Fakes, proxy_config, set_weight, write_config
from llmgateway.v1 import llm_service_pb2 as pb
from llmgateway.v1 import llm_service_pb2_grpc as pb_grpc
from llmgw.server import ProxyServer
from llmgw_dev.fakes import FakeProvider

USER = [{"role": "user", "content": "hello there"}]


def sdk(server: ProxyServer, api_key: str = "unused", **kwargs: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{server.rest_port}/v1", api_key=api_key, max_retries=0, **kwargs
    )


def grpc_request(model: str = "demo-model", **fields: Any) -> pb.ChatRequest:
    return pb.ChatRequest(
        model=model, messages=[pb.ChatMessage(role=pb.ROLE_USER, content="hello there")], **fields
    )


def metric(server: ProxyServer, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for family in text_string_to_metric_families(
        __import__("prometheus_client").generate_latest(server.metrics.registry).decode()
    ):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


# -- both fronts, every backend type ---------------------------------------------------------------


@pytest.mark.parametrize(("weight", "upstream"), [(0, "openai"), (100, "grpc")])
async def test_openai_sdk_plain_and_stream(
    fakes: Fakes, start_proxy: Any, weight: int, upstream: str
) -> None:
    server = await start_proxy(set_weight(proxy_config(fakes), weight))
    client = sdk(server)
    reply = await client.chat.completions.create(model="demo-model", messages=USER)  # type: ignore[arg-type]
    assert reply.choices[0].message.content.startswith("This is a fake reply to: hello there")  # type: ignore[union-attr]
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None and reply.usage.total_tokens == reply.usage.prompt_tokens + 20

    stream = await client.chat.completions.create(
        model="demo-model",
        messages=USER,
        stream=True,
        stream_options={"include_usage": True},  # type: ignore[arg-type]
    )
    text, reasons, usage = [], [], None
    async for chunk in stream:
        if chunk.choices:
            text.append(chunk.choices[0].delta.content or "")
            reasons.append(chunk.choices[0].finish_reason)
        if chunk.usage:
            usage = chunk.usage
    assert "".join(text) == reply.choices[0].message.content
    assert reasons[-1] == "stop" and usage is not None and usage.completion_tokens == 20
    fake = getattr(fakes, upstream)
    assert fake.stats["completed"] == 2
    models = await client.models.list()
    assert [m.id for m in models.data] == ["demo-claude", "demo-model", "grpc-only", "rest-only"]


async def test_grpc_front_every_backend(fakes: Fakes, start_proxy: Any) -> None:
    server = await start_proxy(proxy_config(fakes))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = pb_grpc.LLMServiceStub(channel)
        texts = set()
        for model in ("rest-only", "grpc-only", "demo-claude"):
            reply = await stub.ChatCompletion(grpc_request(model, max_tokens=5))
            assert reply.finish_reason == pb.FINISH_REASON_LENGTH, model
            assert reply.usage.completion_tokens == 5
            chunks = [c async for c in stub.StreamingChat(grpc_request(model, max_tokens=5))]
            assert "".join(c.delta for c in chunks) == reply.content
            assert chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH
            assert chunks[-1].HasField("usage") and chunks[-1].usage.completion_tokens == 5
            assert all(not c.HasField("usage") for c in chunks[:-1])
            texts.add(reply.content)
        assert len(texts) == 1, "every provider type returns the same reply through the proxy"
        models = await stub.ListModels(pb.ListModelsRequest())
        assert "demo-model" in [m.id for m in models.models]
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = [
            a
            async for a in reflection.ServerReflectionInfo(
                iter(
                    [
                        reflection_pb2.ServerReflectionRequest(list_services=""),
                        reflection_pb2.ServerReflectionRequest(
                            file_containing_symbol="llmgateway.v1.LLMService"
                        ),
                    ]
                )
            )
        ]
        services = {s.name for s in answers[0].list_services_response.service}
        assert {"llmgateway.v1.LLMService", "grpc.health.v1.Health"} <= services
        assert answers[1].file_descriptor_response.file_descriptor_proto
    assert fakes.openai.stats["completed"] == 2 and fakes.grpc.stats["completed"] == 2
    assert fakes.anthropic.stats["completed"] == 2


async def test_grpc_health_check_and_watch_follow_draining(fakes: Fakes, start_proxy: Any) -> None:
    server = await start_proxy(proxy_config(fakes))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await health.Check(health_pb2.HealthCheckRequest(service="no.Such"))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        unknown = health.Watch(health_pb2.HealthCheckRequest(service="no.Such"))
        assert (await unknown.read()).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        unknown.cancel()
        watch = health.Watch(health_pb2.HealthCheckRequest(service="llmgateway.v1.LLMService"))
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        server.health.enter_graceful_shutdown()
        assert (await asyncio.wait_for(watch.read(), 5)).status == health_pb2.HealthCheckResponse.NOT_SERVING
        server.health.set("llmgateway.v1.LLMService", health_pb2.HealthCheckResponse.SERVING)
        check = await health.Check(health_pb2.HealthCheckRequest(service="llmgateway.v1.LLMService"))
        assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING, (
            "a draining proxy stays NOT_SERVING"
        )
        watch.cancel()


async def test_anthropic_conversion_both_ways(fakes: Fakes, start_proxy: Any) -> None:
    server = await start_proxy(proxy_config(fakes))
    reply = await sdk(server).chat.completions.create(
        model="demo-claude",
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi claude"}],
        max_tokens=3,
        stop=["zzz"],
        temperature=0.5,
    )
    assert reply.choices[0].finish_reason == "length"
    assert reply.choices[0].message.content.strip() == "This is a"  # type: ignore[union-attr]
    assert reply.id.startswith("msg_")
    too_hot = sdk(server).chat.completions.create(model="demo-claude", messages=USER, temperature=1.5)  # type: ignore[arg-type]
    with pytest.raises(
        openai.BadRequestError, match=r"temperature: 1.5 is out of range \[0, 1\] for Anthropic"
    ):
        await too_hot


# -- the REST/gRPC split ---------------------------------------------------------------------------


@pytest.mark.parametrize("weight", [0, 100])
async def test_weights_0_and_100_are_exact(fakes: Fakes, start_proxy: Any, weight: int) -> None:
    server = await start_proxy(set_weight(proxy_config(fakes), weight))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = pb_grpc.LLMServiceStub(channel)
        await asyncio.gather(*(stub.ChatCompletion(grpc_request()) for _ in range(300)))
    expected_grpc = 300 if weight == 100 else 0
    assert fakes.grpc.stats["requests"] == expected_grpc
    assert fakes.openai.stats["requests"] == 300 - expected_grpc
    assert metric(server, "llmgw_route_grpc_weight", route="demo-model") == weight


async def test_intermediate_weight_within_statistical_bounds(fakes: Fakes, start_proxy: Any) -> None:
    server = await start_proxy(set_weight(proxy_config(fakes), 30))
    client = sdk(server)
    n = 600
    for batch in range(0, n, 100):
        await asyncio.gather(
            *(
                client.chat.completions.create(model="demo-model", messages=USER)  # type: ignore[arg-type]
                for _ in range(batch, batch + 100)
            )
        )
    # Binomial(600, 0.3): mean 180, sd 11.2; 5 sd either side fails by chance once in ~3.5 million runs.
    assert 124 <= fakes.grpc.stats["requests"] <= 236
    assert fakes.grpc.stats["requests"] + fakes.openai.stats["requests"] == n
    assert metric(server, "llmgw_upstream_requests_total", path="grpc") == fakes.grpc.stats["requests"]


# -- fallback, retries, cancellation -----------------------------------------------------------------


async def test_fallback_to_rest_when_grpc_fails(fakes: Fakes, start_proxy: Any) -> None:
    server = await start_proxy(set_weight(proxy_config(fakes), 100))
    fakes.grpc.faults.error_rate = 1.0
    fakes.grpc.faults.error_status = 503
    client = sdk(server)
    replies = await asyncio.gather(
        *(
            client.chat.completions.create(model="demo-model", messages=USER)  # type: ignore[arg-type]
            for _ in range(20)
        )
    )
    assert all(r.choices[0].finish_reason == "stop" for r in replies)
    stream = await client.chat.completions.create(model="demo-model", messages=USER, stream=True)  # type: ignore[arg-type]
    assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert fakes.openai.stats["completed"] == 21
    assert fakes.grpc.stats["injected_errors"] == 21, (
        "the chosen path gets one attempt when a fallback exists"
    )
    assert metric(server, "llmgw_fallbacks_total", from_path="grpc", to_path="rest") == 21
    assert metric(server, "llmgw_upstream_requests_total", path="grpc", code="503") == 21


async def test_fallback_when_grpc_upstream_is_down(fakes: Fakes, start_proxy: Any) -> None:
    server = await start_proxy(set_weight(proxy_config(fakes), 100))
    await fakes.grpc.stop()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = pb_grpc.LLMServiceStub(channel)
        reply = await stub.ChatCompletion(grpc_request())
        chunks = [c async for c in stub.StreamingChat(grpc_request())]
    assert reply.content and chunks[-1].finish_reason == pb.FINISH_REASON_STOP
    assert fakes.openai.stats["completed"] == 2


async def test_no_fallback_on_client_error(fakes: Fakes, start_proxy: Any) -> None:
    server = await start_proxy(set_weight(proxy_config(fakes), 100))
    fakes.grpc.faults.fail_next = 1
    fakes.grpc.faults.error_status = 400
    with pytest.raises(openai.BadRequestError):
        await sdk(server).chat.completions.create(model="demo-model", messages=USER)  # type: ignore[arg-type]
    assert fakes.openai.stats["requests"] == 0


async def test_retries_honour_retry_after(fakes: Fakes, start_proxy: Any) -> None:
    server = await start_proxy(proxy_config(fakes))
    fakes.openai.faults.fail_next = 2
    fakes.openai.faults.error_status = 429
    fakes.openai.faults.retry_after_s = 0.3
    started = time.monotonic()
    reply = await sdk(server).chat.completions.create(model="rest-only", messages=USER)  # type: ignore[arg-type]
    elapsed = time.monotonic() - started
    assert reply.choices[0].message.content
    assert fakes.openai.stats["requests"] == 3
    assert elapsed >= 0.6, "two waits of Retry-After 0.3 s"
    assert metric(server, "llmgw_upstream_retries_total", provider="openai-fake", reason="429") == 2


async def test_retries_exhausted_gives_the_upstream_status(fakes: Fakes, start_proxy: Any) -> None:
    server = await start_proxy(proxy_config(fakes))
    fakes.grpc.faults.error_rate = 1.0
    fakes.grpc.faults.error_status = 503
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pb_grpc.LLMServiceStub(channel).ChatCompletion(grpc_request("grpc-only"))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "provider 'grpc-fake' failed with UNAVAILABLE" in (info.value.details() or "")
    assert fakes.grpc.stats["requests"] == 3


async def test_retry_after_longer_than_deadline_is_not_waited(fakes: Fakes, start_proxy: Any) -> None:
    server = await start_proxy(proxy_config(fakes))
    fakes.grpc.faults.rate_limit_every = 1
    fakes.grpc.faults.retry_after_s = 30
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pb_grpc.LLMServiceStub(channel).ChatCompletion(grpc_request("grpc-only"), timeout=2)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert time.monotonic() - started < 1.5
    assert dict(info.value.trailing_metadata() or ()).get("retry-after") == "30"


async def test_stream_not_retried_after_first_token(fakes: Fakes, start_proxy: Any) -> None:
    server = await start_proxy(set_weight(proxy_config(fakes), 100))
    fakes.grpc.faults.stream_error_after_tokens = 3
    fakes.grpc.faults.error_status = 503
    got: list[str] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for chunk in pb_grpc.LLMServiceStub(channel).StreamingChat(grpc_request()):
                got.append(chunk.delta)
    assert len(got) == 3 and info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert fakes.grpc.stats["requests"] == 1 and fakes.openai.stats["requests"] == 0

    fakes.openai.faults.stream_error_after_tokens = 2
    stream = await sdk(server).chat.completions.create(model="rest-only", messages=USER, stream=True)  # type: ignore[arg-type]
    with pytest.raises(openai.APIError):
        async for _ in stream:
            pass
    assert fakes.openai.stats["requests"] == 1


async def _wait_for(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("model", ["rest-only", "grpc-only", "demo-claude"])
async def test_client_cancel_reaches_upstream_grpc_front(fakes: Fakes, start_proxy: Any, model: str) -> None:
    server = await start_proxy(proxy_config(fakes))
    upstream = {"rest-only": fakes.openai, "grpc-only": fakes.grpc, "demo-claude": fakes.anthropic}[model]
    upstream.faults.token_delay_ms = 100
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        call = pb_grpc.LLMServiceStub(channel).StreamingChat(grpc_request(model))
        await call.read()
        call.cancel()
        await _wait_for(lambda: upstream.stats["cancelled"] == 1)
        upstream.faults.latency_ms = 5000
        unary = asyncio.ensure_future(pb_grpc.LLMServiceStub(channel).ChatCompletion(grpc_request(model)))
        await _wait_for(lambda: upstream.inflight == 1)
        unary.cancel()
        await _wait_for(lambda: upstream.stats["cancelled"] == 2)
    await _wait_for(lambda: metric(server, "llmgw_requests_total", code="499") == 2)


async def test_client_disconnect_reaches_upstream_rest_front(fakes: Fakes, start_proxy: Any) -> None:
    server = await start_proxy(proxy_config(fakes))
    fakes.grpc.faults.token_delay_ms = 100
    async with aiohttp.ClientSession() as session:
        resp = await session.post(
            f"http://127.0.0.1:{server.rest_port}/v1/chat/completions",
            json={"model": "grpc-only", "messages": USER, "stream": True},
        )
        assert resp.status == 200
        await resp.content.readline()
        resp.close()
    await _wait_for(lambda: fakes.grpc.stats["cancelled"] == 1)


# -- admission, auth, validation ---------------------------------------------------------------------


async def test_concurrency_cap(fakes: Fakes, start_proxy: Any) -> None:
    server = await start_proxy(proxy_config(fakes, limits={"maxConcurrentRequests": 2}))
    fakes.openai.faults.latency_ms = 400
    client = sdk(server)
    results = await asyncio.gather(
        *(client.chat.completions.create(model="rest-only", messages=USER) for _ in range(4)),  # type: ignore[arg-type]
        return_exceptions=True,
    )
    refused = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert len(refused) == 2 and len(results) - len(refused) == 2
    assert "limit of 2 concurrent requests" in str(refused[0])
    assert refused[0].response.headers["retry-after"] == "1"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = pb_grpc.LLMServiceStub(channel)
        calls = [stub.ChatCompletion(grpc_request("rest-only")) for _ in range(3)]
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
    codes = [o.code() for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert codes == [grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert metric(server, "llmgw_rejected_requests_total", reason="concurrency") == 3


async def test_client_auth(fakes: Fakes, start_proxy: Any, tmp_path: pathlib.Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("team-a-key\nteam-b-key\n")
    server = await start_proxy(proxy_config(fakes, auth={"apiKeysFile": str(keys)}))
    with pytest.raises(openai.AuthenticationError, match="invalid API key"):
        await sdk(server, api_key="wrong").chat.completions.create(model="demo-model", messages=USER)  # type: ignore[arg-type]
    assert await sdk(server, api_key="team-b-key").chat.completions.create(model="demo-model", messages=USER)  # type: ignore[arg-type]
    async with aiohttp.ClientSession() as session:
        resp = await session.get(f"http://127.0.0.1:{server.rest_port}/v1/models")
        assert resp.status == 401 and "missing API key" in (await resp.json())["error"]["message"]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = pb_grpc.LLMServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ChatCompletion(grpc_request())
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        reply = await stub.ChatCompletion(grpc_request(), metadata=(("authorization", "Bearer team-a-key"),))
        assert reply.content
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING, "health needs no key"


BAD_REQUESTS = [
    ({"model": "demo-model", "messages": []}, "messages: must contain at least one message"),
    (
        {"model": "demo-model", "messages": [{"role": "robot", "content": "x"}]},
        "messages[0].role: unknown role 'robot'",
    ),
    ({"model": "demo-model", "messages": USER, "temperature": 3}, "temperature: 3 is out of range [0, 2]"),
    ({"model": "demo-model", "messages": USER, "top_p": -1}, "top_p: -1 is out of range [0, 1]"),
    ({"model": "nope", "messages": USER}, "model: unknown model 'nope' (available: demo-claude, demo-model"),
    ({"messages": USER}, "model: required"),
    ({"model": "demo-model", "messages": USER, "tools": "search"}, "tools: must be a list, got str"),
    ({"model": "demo-model", "messages": USER, "max_tokens": 0}, "max_tokens: 0 must be between 1"),
]


@pytest.mark.parametrize(("body", "message"), BAD_REQUESTS, ids=[m[:30] for _, m in BAD_REQUESTS])
async def test_bad_rest_requests(fakes: Fakes, start_proxy: Any, body: dict[str, Any], message: str) -> None:
    server = await start_proxy(proxy_config(fakes))
    async with aiohttp.ClientSession() as session:
        resp = await session.post(f"http://127.0.0.1:{server.rest_port}/v1/chat/completions", json=body)
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error"
    assert fakes.openai.stats["requests"] == 0 and fakes.grpc.stats["requests"] == 0


async def test_bad_grpc_requests_and_size_limits(fakes: Fakes, start_proxy: Any) -> None:
    server = await start_proxy(proxy_config(fakes, limits={"maxRequestBytes": 4096}))
    cases = [
        (pb.ChatRequest(model="demo-model"), "messages: must contain at least one message"),
        (
            pb.ChatRequest(model="demo-model", messages=[pb.ChatMessage(content="x")]),
            "messages[0].role: unknown role",
        ),
        (grpc_request(temperature=2.5), "temperature: 2.5 is out of range [0, 2]"),
        (grpc_request("nope"), "model: unknown model 'nope'"),
    ]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = pb_grpc.LLMServiceStub(channel)
        for request, message in cases:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ChatCompletion(request)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert message in (info.value.details() or "")
        big = pb.ChatRequest(
            model="demo-model", messages=[pb.ChatMessage(role=pb.ROLE_USER, content="x" * 8000)]
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ChatCompletion(big)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    async with aiohttp.ClientSession() as session:
        resp = await session.post(
            f"http://127.0.0.1:{server.rest_port}/v1/chat/completions",
            json={"model": "demo-model", "messages": [{"role": "user", "content": "x" * 8000}]},
        )
        assert resp.status == 413
        assert "exceeds the limit of 4096" in (await resp.json())["error"]["message"]
        resp = await session.post(f"http://127.0.0.1:{server.rest_port}/v1/chat/completions", data=b"{nope")
        assert resp.status == 400 and "not valid JSON" in (await resp.json())["error"]["message"]
        resp = await session.post(f"http://127.0.0.1:{server.rest_port}/v1/audio/speech", json={})
        error = (await resp.json())["error"]
        assert resp.status == 404 and "no route for POST /v1/audio/speech" in error["message"]
        assert "POST /v1/chat/completions" in error["message"]
        resp = await session.get(f"http://127.0.0.1:{server.rest_port}/v1/chat/completions")
        assert resp.status == 405 and resp.headers["Allow"] == "POST"
        assert "accepts POST, not GET" in (await resp.json())["error"]["message"]


async def test_upstream_credentials_rejected_without_leaking(
    fakes: Fakes, start_proxy: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_OPENAI_KEY", "sk-wrong-secret-value")
    async with FakeProvider("openai", api_key="sk-the-right-one") as guarded:
        config = proxy_config(fakes)
        config["providers"][0].update(apiKey={"env": "FAKE_OPENAI_KEY"}, openai={"baseURL": guarded.base_url})
        server = await start_proxy(config)
        with pytest.raises(openai.APIStatusError) as info:
            await sdk(server).chat.completions.create(model="rest-only", messages=USER)  # type: ignore[arg-type]
        assert guarded.stats["unauthorized"] == 1
    assert info.value.status_code == 502
    assert "rejected the gateway's credentials" in str(info.value)
    assert "sk-wrong" not in str(info.value.body)


# -- cache, metrics, reload --------------------------------------------------------------------------


async def test_cache_for_deterministic_requests(fakes: Fakes, start_proxy: Any) -> None:
    server = await start_proxy(
        proxy_config(fakes, cache={"enabled": True, "maxEntries": 10, "ttlSeconds": 60})
    )
    client = sdk(server)
    first = await client.chat.completions.create(model="rest-only", messages=USER, temperature=0)  # type: ignore[arg-type]
    second = await client.chat.completions.create(model="rest-only", messages=USER, temperature=0)  # type: ignore[arg-type]
    await client.chat.completions.create(model="rest-only", messages=USER, temperature=0.7)  # type: ignore[arg-type]
    assert first.id == second.id
    assert fakes.openai.stats["requests"] == 2
    assert metric(server, "llmgw_cache_lookups_total", result="hit") == 1


async def test_metrics_and_probes(fakes: Fakes, start_proxy: Any) -> None:
    server = await start_proxy(proxy_config(fakes, generation=7))
    client = sdk(server)
    await client.chat.completions.create(model="demo-claude", messages=USER)  # type: ignore[arg-type]
    stream = await client.chat.completions.create(model="demo-claude", messages=USER, stream=True)  # type: ignore[arg-type]
    async for _ in stream:
        pass
    async with aiohttp.ClientSession() as session:
        base = f"http://127.0.0.1:{server.admin_port}"
        text = await (await session.get(f"{base}/metrics")).text()
        assert (await session.get(f"{base}/healthz")).status == 200
        assert (await session.get(f"{base}/readyz")).status == 200
    assert "llmgw_config_generation 7.0" in text
    assert 'llmgw_route_grpc_weight{route="demo-model"} 50.0' in text
    # Error series exist at 0 before any error, so Prometheus' increase() sees a path's first failures.
    for code in ("503", "504", "500"):
        assert (
            f'llmgw_upstream_requests_total{{code="{code}",path="grpc",provider="grpc-fake",route="demo-model"}} 0.0'
            in text
        )
    labels = {"route": "demo-claude", "path": "rest", "provider": "anthropic-fake"}
    assert metric(server, "llmgw_upstream_requests_total", code="200", **labels) == 2
    assert metric(server, "gen_ai_server_request_duration_seconds_count", **labels) == 2
    assert metric(server, "gen_ai_server_time_to_first_token_seconds_count", **labels) == 1
    assert metric(server, "gen_ai_client_token_usage_sum", token_type="output", **labels) == 40
    assert metric(server, "llmgw_upstream_payload_bytes_total", direction="received", **labels) > 0
    assert metric(server, "llmgw_requests_total", front="rest", route="demo-claude", code="200") == 2


async def test_hot_reload_under_load_loses_nothing(fakes: Fakes, start_proxy: Any) -> None:
    config = set_weight(proxy_config(fakes), 0)
    server = await start_proxy(config)
    path = pathlib.Path(server.config_path)
    client = sdk(server)
    fakes.openai.faults.latency_ms = 5
    fakes.grpc.faults.latency_ms = 5
    stop = asyncio.Event()
    outcomes: list[str] = []

    async def load() -> None:
        while not stop.is_set() and len(outcomes) < 5000:
            reply = await client.chat.completions.create(model="demo-model", messages=USER)  # type: ignore[arg-type]
            outcomes.append(reply.choices[0].finish_reason)

    workers = [asyncio.create_task(load()) for _ in range(8)]
    for generation, weight in ((2, 25), (3, 100)):
        await asyncio.sleep(0.4)
        config["generation"] = generation
        write_config(path, set_weight(config, weight))
        await _wait_for(lambda g=generation: metric(server, "llmgw_config_generation") == g)
    grpc_before = fakes.grpc.stats["requests"]
    await asyncio.sleep(0.3)
    assert (
        fakes.grpc.stats["requests"] > grpc_before
        and metric(server, "llmgw_route_grpc_weight", route="demo-model") == 100
    )
    path.write_text("routes: [this is not valid")  # a bad file: rejected, the old config stays
    await _wait_for(lambda: metric(server, "llmgw_config_reloads_total", result="failure") == 1)
    await asyncio.sleep(0.3)
    stop.set()
    await asyncio.gather(*workers)
    assert metric(server, "llmgw_config_generation") == 3
    assert len(outcomes) > 50 and set(outcomes) == {"stop"}
    assert metric(server, "llmgw_requests_total", code="200") == len(outcomes)


async def test_tls_on_both_fronts(
    fakes: Fakes, start_proxy: Any, certificate: tuple[pathlib.Path, pathlib.Path]
) -> None:
    cert, key = certificate
    server = await start_proxy(proxy_config(fakes, tls={"certFile": str(cert), "keyFile": str(key)}))
    async with openai.DefaultAsyncHttpxClient(
        verify=ssl.create_default_context(cafile=str(cert))
    ) as http_client:
        reply = await openai.AsyncOpenAI(
            base_url=f"https://127.0.0.1:{server.rest_port}/v1",
            api_key="x",
            http_client=http_client,
            max_retries=0,
        ).chat.completions.create(model="demo-model", messages=USER)  # type: ignore[arg-type]
    assert reply.choices[0].message.content
    credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    async with grpc.aio.secure_channel(f"127.0.0.1:{server.grpc_port}", credentials) as channel:
        assert (await pb_grpc.LLMServiceStub(channel).ChatCompletion(grpc_request())).content


async def test_layer_limits_from_the_configuration_reach_both_fronts(fakes: Fakes, start_proxy: Any) -> None:
    """``limits.restServer`` bounds the REST front's request head; ``limits.grpcServer`` is what the gRPC front
    advertises in its SETTINGS (INITIAL_WINDOW_SIZE, MAX_HEADER_LIST_SIZE)."""
    config = proxy_config(fakes)
    config["limits"] = {
        "maxRequestBytes": 65_536,  # below the window: a stream window is raised to hold one whole message
        "restServer": {"maxHeadBytes": 2048},
        "grpcServer": {"streamWindowBytes": 100_000, "maxHeaderBlockBytes": 9000},
    }
    server = await start_proxy(config)

    reader, writer = await asyncio.open_connection("127.0.0.1", server.rest_port)
    writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 3000 + b"\r\n\r\n")
    status_line = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    assert status_line.startswith(b"HTTP/1.1 431")

    reader, writer = await asyncio.open_connection("127.0.0.1", server.grpc_port)
    writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
    head = await asyncio.wait_for(reader.readexactly(9), 5)
    length, frame_type = int.from_bytes(head[:3], "big"), head[3]
    payload = await asyncio.wait_for(reader.readexactly(length), 5)
    writer.close()
    assert frame_type == 0x4  # the server's first frame is its SETTINGS
    settings = {
        int.from_bytes(payload[i : i + 2], "big"): int.from_bytes(payload[i + 2 : i + 6], "big")
        for i in range(0, length, 6)
    }
    assert settings[0x4] == 100_000 and settings[0x6] == 9000


async def test_an_llmgateway_providers_connect_timeout_is_its_connectTimeoutSeconds(
    fakes: Fakes, start_proxy: Any
) -> None:
    """A gRPC upstream that accepts the connection and never answers is given up after the provider's own
    ``connectTimeoutSeconds``, and the client hears which provider and why."""
    accepted: list[asyncio.StreamWriter] = []

    async def silent(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    listener = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    config = proxy_config(fakes)
    config["providers"].append(
        {
            "name": "silent",
            "llmgateway": {"target": f"127.0.0.1:{port}"},
            "connectTimeoutSeconds": 0.3,
            "retries": {"maxAttempts": 1},
        }
    )
    config["routes"].append({"model": "silent-model", "grpc": "silent"})
    server = await start_proxy(config)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            stub = pb_grpc.LLMServiceStub(channel)
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.ChatCompletion(grpc_request("silent-model"), timeout=10)
            elapsed = time.monotonic() - started
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "'silent'" in (caught.value.details() or "")
        assert "no answer within 0.3s" in (caught.value.details() or "")
        assert elapsed < 5  # the channel's own default would have waited 10 s
        assert accepted
    finally:
        for writer in accepted:
            writer.close()
        listener.close()
