"""OpenAI's other endpoints through the gateway, with the official ``openai`` SDK (and raw JSON where exactness
is the point) against a real proxy on 127.0.0.1 in front of the fake providers:

- ``POST /v1/embeddings`` through an openai provider and an llmgateway provider's ``Embed`` (and the gRPC
  front's ``Embed``): every input shape, float and base64 vectors, ``dimensions``; what the client sends
  reaches the upstream unchanged but for the model name, and the answer reaches the client unchanged;
- ``GET /v1/models/{id}``;
- ``POST /v1/responses`` and ``POST /v1/completions`` relayed to an openai provider, unary and streamed;
- a clear 400 naming the route and provider where a provider cannot serve an endpoint.
"""

from __future__ import annotations

import base64
import struct
from typing import Any

import aiohttp
import grpc
import openai
import orjson
import pytest

from conftest import Fakes, proxy_config
from llmgateway.v1 import llm_service_pb2 as pb
from llmgateway.v1 import llm_service_pb2_grpc as pb_grpc
from llmgw.codecs import openai_embeddings
from llmgw.server import ProxyServer
from llmgw_dev.fakes.endpoints import embedding

ROUTES = ["rest-only", "grpc-only"]
INPUTS: dict[str, Any] = {
    "string": "hello there",
    "strings": ["hello there", "general kenobi", ""],
    "tokens": [15339, 1070],
    "token_arrays": [[15339, 1070], [4, 5, 6]],
}


def sdk(server: ProxyServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{server.rest_port}/v1", api_key="unused", max_retries=0
    )


def canonical(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def upstream_json(fakes: Fakes, route: str) -> Any:
    """What the route's fake received last, as OpenAI's JSON."""
    if route == "rest-only":
        return fakes.openai.received[-1]
    received = fakes.grpc.received[-1]
    assert isinstance(received, pb.EmbeddingRequest)
    return openai_embeddings.request_to_json(received)


async def _post(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with session.post(url, json=body) as resp:
        return resp.status, await resp.json()


@pytest.mark.parametrize("route", ROUTES)
async def test_embeddings_reach_the_upstream_and_come_back_unchanged(
    fakes: Fakes, start_proxy: Any, route: str
) -> None:
    server = await start_proxy(proxy_config(fakes))
    proxy = f"http://127.0.0.1:{server.rest_port}/v1/embeddings"
    direct = f"{fakes.openai.base_url}/embeddings"
    async with aiohttp.ClientSession() as session:
        for name, value in INPUTS.items():
            for extra in (
                {},
                {"encoding_format": "base64", "dimensions": 4},
                {"encoding_format": "float", "user": "u1", "vendor_x": [1, None]},
            ):
                body = {"input": value, **extra}
                status, via = await _post(session, proxy, {"model": route, **body})
                assert status == 200, via
                assert canonical(upstream_json(fakes, route)) == canonical({"model": "demo-model", **body}), (
                    name
                )
                _, expected = await _post(session, direct, {"model": "demo-model", **body})
                assert canonical(via) == canonical(expected), (name, extra)


@pytest.mark.parametrize("route", ROUTES)
async def test_embeddings_with_the_sdk_float_and_base64(fakes: Fakes, start_proxy: Any, route: str) -> None:
    server = await start_proxy(proxy_config(fakes))
    client = sdk(server)
    floats = await client.embeddings.create(model=route, input=["a b", "c"], encoding_format="float")
    assert [d.embedding for d in floats.data] == [embedding("a b"), embedding("c")]
    assert floats.usage.prompt_tokens == 3 and floats.model == "demo-model"
    b64 = await client.embeddings.create(model=route, input="a b", encoding_format="base64", dimensions=8)
    raw = base64.b64decode(b64.data[0].embedding)  # type: ignore[arg-type]
    assert list(struct.unpack("<8f", raw)) == embedding("a b", 8)
    default = await client.embeddings.create(model=route, input=[[1, 2, 3]])  # the SDK asks base64, decodes
    assert default.data[0].embedding == pytest.approx(embedding([1, 2, 3]))


async def test_embed_on_the_grpc_front(fakes: Fakes, start_proxy: Any) -> None:
    server = await start_proxy(proxy_config(fakes))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = pb_grpc.LLMServiceStub(channel)
        for route in ROUTES:
            reply = await stub.Embed(
                pb.EmbeddingRequest(
                    model=route, texts=["x y", "z"], input_shape=pb.EMBEDDING_INPUT_SHAPE_TEXTS
                )
            )
            assert [list(e.values) for e in reply.data] == [embedding("x y"), embedding("z")], route
            assert reply.usage.prompt_tokens == 3
            b64 = await stub.Embed(pb.EmbeddingRequest(model=route, texts=["x y"], encoding_format="base64"))
            assert struct.unpack("<16f", base64.b64decode(b64.data[0].base64)) == tuple(embedding("x y"))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Embed(pb.EmbeddingRequest(model="demo-claude", texts=["x"]))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Embed(pb.EmbeddingRequest(model="rest-only"))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "input" in (
            caught.value.details() or ""
        )


async def test_endpoints_a_provider_cannot_serve_are_a_clear_400(fakes: Fakes, start_proxy: Any) -> None:
    server = await start_proxy(proxy_config(fakes))
    client = sdk(server)
    with pytest.raises(openai.BadRequestError) as caught:
        await client.embeddings.create(model="demo-claude", input="hi")
    message = str(caught.value)
    assert "route 'demo-claude'" in message and "'anthropic-fake' (type anthropic)" in message
    assert "Anthropic has no embeddings API" in message
    with pytest.raises(openai.BadRequestError) as caught:
        await client.completions.create(model="grpc-only", prompt="hi")
    assert "POST /v1/completions" in str(caught.value) and "'grpc-fake' (type llmgateway)" in str(
        caught.value
    )
    with pytest.raises(openai.BadRequestError, match="POST /v1/completions"):
        await client.completions.create(model="demo-claude", prompt="hi")
    with pytest.raises(openai.BadRequestError, match="unknown model"):
        await client.embeddings.create(model="nope", input="hi")


async def test_models_retrieve(fakes: Fakes, start_proxy: Any) -> None:
    config = proxy_config(fakes)
    config["routes"].append({"model": "fake-*", "rest": "openai-fake", "upstreamModel": "demo-model"})
    config["routes"].append({"model": "org/model:v1", "rest": "openai-fake", "upstreamModel": "demo-model"})
    server = await start_proxy(config)
    client = sdk(server)
    assert (await client.models.retrieve("fake-large")).owned_by == "openai-fake"  # served by a pattern
    assert (await client.models.retrieve("org/model:v1")).id == "org/model:v1"  # ids may hold '/' and ':'

    model = await client.models.retrieve("rest-only")
    assert (model.id, model.object, model.owned_by) == ("rest-only", "model", "openai-fake")
    assert (await client.models.retrieve("demo-model")).owned_by == "openai-fake,grpc-fake"
    with pytest.raises(openai.NotFoundError) as caught:
        await client.models.retrieve("x" * 5000)
    body = caught.value.body
    assert isinstance(body, dict) and body["code"] == "model_not_found"
    assert len(body["message"]) < 400 and body["type"] == "invalid_request_error"


async def test_responses_unary_and_streamed(fakes: Fakes, start_proxy: Any) -> None:
    server = await start_proxy(proxy_config(fakes))
    client = sdk(server)
    response = await client.responses.create(
        model="rest-only", input="hello there", max_output_tokens=9, metadata={"a": "b"}
    )
    assert response.output_text.startswith("This is a fake reply to: hello there")
    assert response.usage is not None and response.usage.output_tokens == 9
    assert canonical(fakes.openai.received[-1]) == canonical(
        {"model": "demo-model", "input": "hello there", "max_output_tokens": 9, "metadata": {"a": "b"}}
    )
    events = [e async for e in await client.responses.create(model="rest-only", input="hi", stream=True)]
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == events[-1].response.output_text  # type: ignore[union-attr]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert fakes.openai.received[-1]["stream"] is True and fakes.openai.received[-1]["model"] == "demo-model"


@pytest.mark.parametrize("model", ["demo-claude", "grpc-only"])
async def test_responses_on_the_chat_path_of_providers_without_the_api(
    fakes: Fakes, start_proxy: Any, model: str
) -> None:
    """Anthropic and llmgateway upstreams have no Responses API: the gateway serves it on their chat path
    (:mod:`llmgw.providers._responses`), as it does for inference engines."""
    server = await start_proxy(proxy_config(fakes))
    client = sdk(server)
    chat = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hello there"}]
    )
    response = await client.responses.create(model=model, input="hello there", instructions="Be brief.")
    assert response.status == "completed" and response.store is False
    assert response.output_text == chat.choices[0].message.content
    assert response.usage is not None and response.usage.output_tokens > 0
    upstream = fakes.anthropic if model == "demo-claude" else fakes.grpc
    assert upstream.stats["requests"] >= 2
    events = [e async for e in await client.responses.create(model=model, input="hello there", stream=True)]
    kinds = [e.type for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds[-1] == "response.completed"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == events[-1].response.output_text == chat.choices[0].message.content  # type: ignore[union-attr]
    tools: Any = [
        {
            "type": "function",
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        }
    ]
    called = await client.responses.create(
        model=model,
        input="What is the weather in Paris? Use get_weather.",
        tools=tools,
        tool_choice="required",
    )
    calls = [item for item in called.output if item.type == "function_call"]
    assert calls and calls[0].name == "get_weather"
    with pytest.raises(openai.BadRequestError, match="previous_response_id: the gateway keeps no responses"):
        await client.responses.create(model=model, input="hi", previous_response_id="resp_1")


async def test_completions_unary_and_streamed(fakes: Fakes, start_proxy: Any) -> None:
    server = await start_proxy(proxy_config(fakes))
    client = sdk(server)
    completion = await client.completions.create(
        model="rest-only", prompt="hello there", max_tokens=8, extra_body={"top_k": 3}
    )
    assert completion.choices[0].text.startswith("This is a fake reply to: hello")
    assert completion.choices[0].finish_reason == "length" and completion.usage is not None
    assert canonical(fakes.openai.received[-1]) == canonical(
        {"model": "demo-model", "prompt": "hello there", "max_tokens": 8, "top_k": 3}
    )
    stream = await client.completions.create(
        model="rest-only", prompt="hi", stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices).startswith("This is a fake reply to: hi")
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0


async def test_a_relayed_stream_that_breaks_ends_with_an_error_event(fakes: Fakes, start_proxy: Any) -> None:
    fakes.openai.faults.update({"stream_stall_after_tokens": 2, "token_delay_ms": 10})
    config = proxy_config(fakes)
    config["providers"][0]["streamIdleTimeoutSeconds"] = 0.3
    server = await start_proxy(config)
    client = sdk(server)
    with pytest.raises(openai.APIError, match="streamIdleTimeoutSeconds"):
        async for _ in await client.completions.create(model="rest-only", prompt="hi", stream=True):
            pass
    async with aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{server.rest_port}/v1/responses"
        async with session.post(url, json={"model": "rest-only", "input": "hi", "stream": True}) as resp:
            text = (await resp.read()).decode()
    assert resp.status == 200 and text.count("event: response.output_text.delta") == 2
    last = text.strip().split("\n\n")[-1]
    assert last.startswith("event: error\ndata: ")
    error = orjson.loads(last.split("data: ", 1)[1])
    assert error["type"] == "error" and "openai-fake" in error["message"]


async def test_embeddings_through_a_chain_of_gateways_stay_exact(fakes: Fakes, start_proxy: Any) -> None:
    """REST front -> llmgateway provider -> another gateway's Embed -> openai provider: the answer is the
    upstream's JSON, base64 text and float digits alike."""
    first = await start_proxy(proxy_config(fakes))
    second = await start_proxy(
        {
            "listen": {"grpc": "127.0.0.1:0", "rest": "127.0.0.1:0", "admin": "127.0.0.1:0"},
            "providers": [{"name": "first", "llmgateway": {"target": f"127.0.0.1:{first.grpc_port}"}}],
            "routes": [{"model": "chained", "grpc": "first", "upstreamModel": "rest-only"}],
        }
    )
    async with aiohttp.ClientSession() as session:
        for extra in ({}, {"encoding_format": "base64"}, {"dimensions": 3, "extra": {"k": None}}):
            body = {"input": ["one", "two three"], **extra}
            status, via = await _post(
                session, f"http://127.0.0.1:{second.rest_port}/v1/embeddings", {"model": "chained", **body}
            )
            assert status == 200, via
            assert canonical(fakes.openai.received[-1]) == canonical({"model": "demo-model", **body})
            _, expected = await _post(
                session, f"{fakes.openai.base_url}/embeddings", {"model": "demo-model", **body}
            )
            assert canonical(via) == canonical(expected), extra


def _token_counts(server: ProxyServer, token_type: str) -> tuple[float, float]:
    """(observations, sum) of gen_ai_client_token_usage for the rest-only route."""
    labels = {"route": "rest-only", "path": "rest", "provider": "openai-fake", "token_type": token_type}
    count = server.metrics.registry.get_sample_value("gen_ai_client_token_usage_count", labels) or 0.0
    total = server.metrics.registry.get_sample_value("gen_ai_client_token_usage_sum", labels) or 0.0
    return count, total


async def test_relayed_endpoints_count_their_tokens(fakes: Fakes, start_proxy: Any) -> None:
    server = await start_proxy(proxy_config(fakes))
    client = sdk(server)
    calls = [
        lambda: client.embeddings.create(model="rest-only", input="one two three"),
        lambda: client.completions.create(model="rest-only", prompt="hello there", max_tokens=8),
        lambda: client.responses.create(model="rest-only", input="hello there", max_output_tokens=9),
    ]
    for call in calls:
        before = _token_counts(server, "input")
        await call()
        after = _token_counts(server, "input")
        assert after[0] == before[0] + 1 and after[1] > before[1]
    before_out = _token_counts(server, "output")
    stream = await client.completions.create(
        model="rest-only", prompt="hi", max_tokens=5, stream=True, stream_options={"include_usage": True}
    )
    async for _ in stream:
        pass
    async for _ in await client.responses.create(
        model="rest-only", input="hi", stream=True, max_output_tokens=4
    ):
        pass
    after_out = _token_counts(server, "output")
    assert after_out[0] == before_out[0] + 2 and after_out[1] - before_out[1] == 5 + 4
