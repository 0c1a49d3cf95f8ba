#!/usr/bin/env python3
"""One gRPC client run against an LLMService, for comparing grpcio settings in separate processes.

``GRPC_EXPERIMENTS=... python bench/grpc_client.py PORT REQUESTS SECONDS`` calls ``ChatCompletion`` on
127.0.0.1:PORT: REQUESTS calls one at a time, then 64 concurrent workers for SECONDS, and prints one JSON line
``{"p50_us": ..., "rate": ..., "cpu_us": ...}`` (the process's CPU per request in the concurrent part).
grpcio reads ``GRPC_EXPERIMENTS`` on import, so each setting needs its own process: ``proxy_latency.py``
starts this script with grpcio's defaults and with llmgw's (``llmgw/grpc_env.py``), alternately.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time

import grpc
import uvloop

from llmgateway.v1 import llm_service_pb2 as pb
from llmgateway.v1 import llm_service_pb2_grpc as pb_grpc

REQUEST = pb.ChatRequest(model="bench-grpc", messages=[pb.ChatMessage(role=pb.ROLE_USER, content="hello")])
CONCURRENCY = 64


async def _run(port: int, requests: int, seconds: float) -> dict[str, float]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.LLMServiceStub(channel)
        for _ in range(max(20, requests // 5)):
            await stub.ChatCompletion(REQUEST, timeout=10)
        latencies = []
        for _ in range(requests):
            start = time.perf_counter()
            await stub.ChatCompletion(REQUEST, timeout=10)
            latencies.append((time.perf_counter() - start) * 1e6)
        done = 0
        end = time.perf_counter() + seconds
        cpu = time.process_time()

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < end:
                await stub.ChatCompletion(REQUEST, timeout=10)
                done += 1

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        cpu = time.process_time() - cpu
    return {
        "p50_us": statistics.median(latencies),
        "rate": done / seconds,
        "cpu_us": cpu / max(done, 1) * 1e6,
    }


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: grpc_client.py PORT REQUESTS SECONDS")
    print(json.dumps(uvloop.run(_run(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])))))
