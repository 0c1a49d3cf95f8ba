"""``llmgw proxy`` as a real process: configuration errors, SIGTERM drain, and secrets kept out of logs."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from typing import Any

import aiohttp
import grpc
import pytest

from conftest import LLMGW, Fakes, proxy_config, set_weight
from llmgateway.v1 import llm_service_pb2 as pb
from llmgateway.v1 import llm_service_pb2_grpc as pb_grpc
from llmgw_dev.fakes import FakeProvider

USER = [{"role": "user", "content": "hello"}]


def test_bad_config_exits_2_naming_the_key(tmp_path: Any) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "providers: [{name: a, openai: {baseURL: 'http://127.0.0.1:1'}}]\n"
        "routes: [{model: m, rest: a, grpcWeight: 150}]\n"
    )
    result = subprocess.run(
        [LLMGW, "proxy", "--config", str(path)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert "routes[0].grpcWeight: must be an integer from 0 to 100, got 150" in result.stderr


async def test_sigterm_drains_streams_in_flight(fakes: Fakes, proxy_process: Any) -> None:
    fakes.grpc.faults.token_delay_ms = 40
    fakes.openai.faults.token_delay_ms = 40
    proxy = proxy_process(set_weight(proxy_config(fakes, shutdown={"drainSeconds": 15}), 100))
    await asyncio.to_thread(proxy.wait_ready)
    first_chunk = asyncio.Event()
    started = 0

    async def rest_stream(session: aiohttp.ClientSession, model: str) -> str:
        nonlocal started
        resp = await session.post(
            f"http://127.0.0.1:{proxy.rest_port}/v1/chat/completions",
            json={"model": model, "messages": USER, "stream": True},
        )
        assert resp.status == 200
        body = b""
        async for line in resp.content:
            if not body:
                started += 1
                if started == 8:
                    first_chunk.set()
            body += line
        return body.decode()

    async def grpc_stream(stub: pb_grpc.LLMServiceStub, model: str) -> list[pb.ChatChunk]:
        nonlocal started
        chunks = []
        request = pb.ChatRequest(model=model, messages=[pb.ChatMessage(role=pb.ROLE_USER, content="hello")])
        async for chunk in stub.StreamingChat(request):
            if not chunks:
                started += 1
                if started == 8:
                    first_chunk.set()
            chunks.append(chunk)
        return chunks

    async with (
        aiohttp.ClientSession() as session,
        grpc.aio.insecure_channel(f"127.0.0.1:{proxy.grpc_port}") as channel,
    ):
        stub = pb_grpc.LLMServiceStub(channel)
        tasks = [asyncio.create_task(rest_stream(session, m)) for m in ("demo-model", "rest-only") * 2]
        tasks += [asyncio.create_task(grpc_stream(stub, m)) for m in ("demo-model", "grpc-only") * 2]
        await asyncio.wait_for(first_chunk.wait(), 10)
        proxy.terminate()
        await asyncio.sleep(0.3)
        with pytest.raises(aiohttp.ClientConnectionError):  # the listener is closed while draining
            async with aiohttp.ClientSession() as fresh:
                await fresh.get(f"http://127.0.0.1:{proxy.rest_port}/v1/models")
        results = await asyncio.wait_for(asyncio.gather(*tasks), 15)
    for body in results[:4]:
        assert isinstance(body, str) and body.rstrip().endswith("data: [DONE]"), body[-200:]
        assert '"finish_reason":"stop"' in body
    for chunks in results[4:]:
        assert isinstance(chunks, list) and chunks[-1].finish_reason == pb.FINISH_REASON_STOP
        assert len(chunks) == 21
    assert await asyncio.to_thread(proxy.proc.wait, 15) == 0
    assert "drained; exiting" in proxy.output()


async def test_provider_key_never_logged(fakes: Fakes, proxy_process: Any) -> None:
    secret = "sk-test-do-not-log-4f1d2c"
    async with FakeProvider("openai", api_key="sk-something-else") as guarded:
        config = proxy_config(fakes)
        config["providers"][0].update(apiKey={"env": "PROVIDER_KEY"}, openai={"baseURL": guarded.base_url})
        proxy = proxy_process(config, env={"PROVIDER_KEY": secret, "LLMGW_LOG_LEVEL": "debug"})
        await asyncio.to_thread(proxy.wait_ready)
        async with aiohttp.ClientSession() as session:
            resp = await session.post(
                f"http://127.0.0.1:{proxy.rest_port}/v1/chat/completions",
                json={"model": "rest-only", "messages": USER},
            )
            body = await resp.text()
            metrics = await (await session.get(f"http://127.0.0.1:{proxy.admin_port}/metrics")).text()
        assert resp.status == 502 and "rejected the gateway's credentials" in body
        assert guarded.stats["unauthorized"] == 1
        os.killpg(proxy.proc.pid, signal.SIGTERM)
        await asyncio.to_thread(proxy.proc.wait, 15)
    for text in (body, metrics, proxy.output()):
        assert secret not in text and secret[3:] not in text


def test_proxy_help_lists_subcommands() -> None:
    result = subprocess.run([LLMGW, "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    for command in ("proxy", "fake-provider", "demo"):
        assert command in result.stdout
