#!/usr/bin/env python3
"""One gRPC client run against an LLMService, for comparing gRPC clients in separate processes.

``python bench/grpc_client.py grpcio|llmgw PORT REQUESTS SECONDS`` calls ``ChatCompletion`` on
127.0.0.1:PORT with grpc.aio or with ``llmgw._net.grpc_channel`` (the proxy's client to grpc providers):
REQUESTS calls one at a time, then 64 concurrent workers for SECONDS, and prints one JSON line
``{"p50_us": ..., "rate": ..., "cpu_us": ...}`` (the process's CPU per request in the concurrent part).
grpcio reads ``GRPC_EXPERIMENTS`` on import, so each of its settings needs its own process:
``proxy_latency.py`` starts this script with grpcio's defaults, with llmgw's (``llmgw/grpc_env.py``) and
with llmgw's channel, alternately.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable

import grpc
import uvloop

from llmgateway.v1 import llm_service_pb2 as pb
from llmgateway.v1 import llm_service_pb2_grpc as pb_grpc
from llmgw._net.grpc_channel import Channel

REQUEST = pb.ChatRequest(model="bench-grpc", messages=[pb.ChatMessage(role=pb.ROLE_USER, content="hello")])
CONCURRENCY = 64


async def _calls(call: Callable[[], Awaitable[object]], requests: int, seconds: float) -> dict[str, float]:
    for _ in range(max(20, requests // 5)):
        await call()
    latencies = []
    for _ in range(requests):
        start = time.perf_counter()
        await call()
        latencies.append((time.perf_counter() - start) * 1e6)
    done = 0
    end = time.perf_counter() + seconds
    cpu = time.process_time()

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < end:
            await call()
            done += 1

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    cpu = time.process_time() - cpu
    return {
        "p50_us": statistics.median(latencies),
        "rate": done / seconds,
        "cpu_us": cpu / max(done, 1) * 1e6,
    }


async def _run(client: str, port: int, requests: int, seconds: float) -> dict[str, float]:
    if client == "llmgw":
        channel = Channel(f"127.0.0.1:{port}")
        body = REQUEST.SerializeToString()
        path = "/llmgateway.v1.LLMService/ChatCompletion"

        async def call() -> object:
            return pb.ChatResponse.FromString(await channel.unary(path, body, 10))

        try:
            return await _calls(call, requests, seconds)
        finally:
            await channel.close()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as aio_channel:
        stub = pb_grpc.LLMServiceStub(aio_channel)
        return await _calls(lambda: stub.ChatCompletion(REQUEST, timeout=10), requests, seconds)


if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[1] not in ("grpcio", "llmgw"):
        sys.exit("usage: grpc_client.py grpcio|llmgw PORT REQUESTS SECONDS")
    print(json.dumps(uvloop.run(_run(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])))))
