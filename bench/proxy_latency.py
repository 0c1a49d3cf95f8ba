#!/usr/bin/env python3
"""The proxy's added latency and throughput, measured side by side with calling the upstream directly.

One run starts, as separate processes on 127.0.0.1 (free ports): a fake ``openai`` provider, a fake ``grpc``
provider (both ``--latency-ms 0 --token-delay-ms 0``) and one ``llmgw proxy`` with a generated configuration
(route ``bench-rest`` -> the openai fake only, route ``bench-grpc`` -> the grpc fake only, no client auth,
``maxConcurrentRequests: 1024``). This process is the load generator: it runs on uvloop, in its own process,
and compares, always against the same upstream:

* REST front: aiohttp ``POST /v1/chat/completions`` to the openai fake directly vs to the proxy's REST front;
* gRPC front: grpc.aio ``ChatCompletion`` to the grpc fake directly vs to the proxy's gRPC front;
* the same two pairs streaming (``"stream": true`` / ``StreamingChat``): time to the first content token
  (TTFT) and to the end of the stream.

Direct and proxied blocks of requests alternate, round after round (the order flips every round), so that
machine noise hits both alike. At concurrency 1 it reports p50, p99 and mean latency and the difference
"added" = via proxy - direct; at concurrency 32 and 64 (unary only) requests per second and the ratio
via proxy / direct. It also reports the CPU time each process spent per request during the throughput
blocks (from /proc), which shows where the time goes.

A second, short table justifies the library choices: aiohttp vs httpx as the HTTP client, asyncio vs uvloop
as the event loop (with the aiohttp client) and orjson vs the standard json module.

Everything is bounded: a request count and a wall-clock limit per block, a time budget for the whole run,
and every child process is stopped at the end (also on an error, Ctrl-C or SIGTERM; the children run in
their own process groups and, on Linux, also get SIGTERM if this process dies).

Usage::

    .venv/bin/python bench/proxy_latency.py             # ~2-3 minutes on a 2-core machine
    .venv/bin/python bench/proxy_latency.py --quick     # smoke run, well under 30 s; numbers are noise
    .venv/bin/python bench/proxy_latency.py --rounds 8 --requests 500 --json results.json

Tables go to stdout (markdown, paste-able); progress goes to stderr. The targets checked are the issue's:
p50 added latency under 0.5 ms (gRPC front) / 1 ms (REST front), p99 added under 2 ms, both for unary
calls and for streaming time to first token; throughput at concurrency 64 at least 40% of direct. The
numbers are reported as measured, met or not.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import importlib.metadata
import json
import math
import os
import pathlib
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from llmgw import grpc_env
from llmgw._net import http_client
from llmgw._net.grpc_channel import Channel

# The load generator's gRPC client (grpc.aio) runs with the settings llmgw gives the grpcio processes it runs
# (the fakes): the one that costs the least CPU per call in the library table.
grpc_env.apply()

import aiohttp  # noqa: E402
import grpc  # noqa: E402
import orjson  # noqa: E402
import uvloop  # noqa: E402
from _harness import (  # noqa: E402  (bench/ is on the path: the script's own folder)
    Child,
    command_line,
    cpu_model,
    llmgw_argv,
    log,
    machine_busy_seconds,
    met,
    ms,
    percentile,
    proc_cpu_seconds,
    raise_on_sigterm,
    signed_ms,
)

from llmgateway.v1 import llm_service_pb2 as pb  # noqa: E402
from llmgateway.v1 import llm_service_pb2_grpc as pb_grpc  # noqa: E402

PROMPT = "Hello from the proxy latency benchmark, please answer briefly"
REST_MODEL = "bench-rest"
GRPC_MODEL = "bench-grpc"
MESSAGES_MODEL = "bench-claude"  # the Anthropic Messages front, routed to an anthropic fake
# Routes to a second pair of fakes that pace their streams (--token-delay-ms PACED_TOKEN_DELAY_MS): a stream
# whose tokens arrive spaced out, as a real model's do, where any per-chunk delay of the proxy adds up.
REST_PACED_MODEL = "bench-rest-paced"
GRPC_PACED_MODEL = "bench-grpc-paced"
PACED_TOKEN_DELAY_MS = 5.0
PACED_TOKENS = 20
PACED_TARGET_MS = 1.5  # added to the whole paced stream (p50)
TARGETS = ("direct", "proxy")
REQUEST_TIMEOUT_S = 10.0

# The targets: added p50 per front, added p99 for both, throughput ratio at concurrency 64.
P50_TARGET_MS = {"grpc": 0.5, "rest": 1.0}
P99_TARGET_MS = 2.0
THROUGHPUT_TARGET = 0.40
THROUGHPUT_TARGET_CONCURRENCY = 64

FRONT_LABEL = {"rest": "REST front", "grpc": "gRPC front", "messages": "Messages front"}


# ------------------------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class Settings:
    requests: int  # requests per block at concurrency 1 (each target, each measurement, each round)
    rounds: int
    concurrency: tuple[int, ...]  # throughput levels
    tp_requests: int  # at most this many requests per throughput block ...
    tp_seconds: float  # ... and at most this long
    warmup: int  # warm-up requests per target at concurrency 1 (and 4x that at the highest concurrency)
    block_timeout_s: float  # wall-clock limit of one concurrency-1 block
    budget_s: float  # the whole measurement; rounds left when it is spent are skipped (and said so)
    response_tokens: int
    paced_requests: int  # streams per block of the paced-stream pairs (each takes ~0.1 s)
    micro_requests: int  # per candidate in the library comparison (0: skip it)
    micro_seconds: float  # throughput rows of the library comparison

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        quick = args.quick
        return cls(
            requests=args.requests or (25 if quick else 400),
            rounds=args.rounds or (2 if quick else 5),
            concurrency=tuple(args.concurrency),
            tp_requests=args.throughput_requests or (150 if quick else 20_000),
            tp_seconds=args.throughput_seconds or (0.3 if quick else 2.0),
            warmup=20 if quick else 200,
            block_timeout_s=30.0,
            budget_s=args.budget or (45.0 if quick else 300.0),
            response_tokens=args.response_tokens,
            paced_requests=args.paced_requests or (3 if quick else 20),
            micro_requests=0 if args.no_micro else (20 if quick else 300),
            micro_seconds=0.3 if quick else 1.0,
        )


# ------------------------------------------------------------------------------------------ processes


def start_fake(
    kind: str, model: str, workdir: pathlib.Path, response_tokens: int, token_delay_ms: float = 0.0
) -> Child:
    paced = " (paced)" if token_delay_ms else ""
    return Child(
        f"fake {kind} provider{paced}",
        llmgw_argv(
            "--log-level",
            "warning",
            "fake-provider",
            "--kind",
            kind,
            "--listen",
            "127.0.0.1:0",
            "--models",
            model,
            "--response-tokens",
            str(response_tokens),
            "--latency-ms",
            "0",
            "--token-delay-ms",
            f"{token_delay_ms:g}",
        ),
        workdir / f"fake-{kind}{'-paced' if token_delay_ms else ''}.log",
    )


def proxy_config(
    openai_port: int, grpc_port: int, paced_openai_port: int, paced_grpc_port: int, anthropic_port: int
) -> str:
    return f"""\
# Generated by bench/proxy_latency.py
generation: 1
listen:
  grpc: 127.0.0.1:0
  rest: 127.0.0.1:0
  admin: 127.0.0.1:0
limits:
  maxConcurrentRequests: 1024
  requestTimeoutSeconds: 60
shutdown:
  drainSeconds: 0
reloadIntervalSeconds: 30
providers:
  - name: bench-openai
    openai:
      baseURL: http://127.0.0.1:{openai_port}/v1
      maxConnections: 256
  - name: bench-grpc-upstream
    llmgateway:
      target: 127.0.0.1:{grpc_port}
  - name: bench-openai-paced
    openai:
      baseURL: http://127.0.0.1:{paced_openai_port}/v1
  - name: bench-grpc-paced
    llmgateway:
      target: 127.0.0.1:{paced_grpc_port}
  - name: bench-anthropic
    anthropic:
      baseURL: http://127.0.0.1:{anthropic_port}
routes:
  - model: {REST_MODEL}
    rest: bench-openai
  - model: {GRPC_MODEL}
    grpc: bench-grpc-upstream
  - model: {REST_PACED_MODEL}
    rest: bench-openai-paced
  - model: {GRPC_PACED_MODEL}
    grpc: bench-grpc-paced
  - model: {MESSAGES_MODEL}
    rest: bench-anthropic
"""


@dataclasses.dataclass
class Stack:
    """The running processes and where to reach them."""

    children: list[Child]
    openai_port: int = 0
    grpc_port: int = 0
    paced_openai_port: int = 0
    paced_grpc_port: int = 0
    anthropic_port: int = 0
    proxy_rest_port: int = 0
    proxy_grpc_port: int = 0
    pids: dict[str, int] = dataclasses.field(default_factory=dict)

    def stop(self) -> None:
        for child in reversed(self.children):
            try:
                child.stop()
            except Exception as exc:  # keep stopping the others
                print(f"warning: could not stop {child.name}: {exc}", file=sys.stderr)


def start_stack(stack: Stack, workdir: pathlib.Path, response_tokens: int) -> None:
    """Start the fakes (two answering at once, two pacing their streams), then the proxy in front of them;
    fills in ``stack`` as processes come up."""
    fake_openai = start_fake("openai", REST_MODEL, workdir, response_tokens)
    stack.children.append(fake_openai)
    fake_grpc = start_fake("grpc", GRPC_MODEL, workdir, response_tokens)
    stack.children.append(fake_grpc)
    paced_openai = start_fake("openai", REST_PACED_MODEL, workdir, PACED_TOKENS, PACED_TOKEN_DELAY_MS)
    stack.children.append(paced_openai)
    paced_grpc = start_fake("grpc", GRPC_PACED_MODEL, workdir, PACED_TOKENS, PACED_TOKEN_DELAY_MS)
    stack.children.append(paced_grpc)
    fake_anthropic = start_fake("anthropic", MESSAGES_MODEL, workdir, response_tokens)
    stack.children.append(fake_anthropic)
    listening = r"fake-provider kind=\w+ listening on [^\s]*:(\d+)"
    stack.openai_port = int(fake_openai.wait_for(listening).group(1))
    stack.grpc_port = int(fake_grpc.wait_for(listening).group(1))
    stack.paced_openai_port = int(paced_openai.wait_for(listening).group(1))
    stack.paced_grpc_port = int(paced_grpc.wait_for(listening).group(1))
    stack.anthropic_port = int(fake_anthropic.wait_for(listening).group(1))
    config_path = workdir / "proxy.yaml"
    config_path.write_text(
        proxy_config(
            stack.openai_port,
            stack.grpc_port,
            stack.paced_openai_port,
            stack.paced_grpc_port,
            stack.anthropic_port,
        )
    )
    proxy = Child(
        "proxy",
        llmgw_argv("--log-level", "info", "proxy", "--config", str(config_path)),
        workdir / "proxy.log",
    )
    stack.children.append(proxy)
    match = proxy.wait_for(r"proxy serving gRPC on port (\d+), REST on port (\d+), admin on port (\d+)")
    stack.proxy_grpc_port, stack.proxy_rest_port = int(match.group(1)), int(match.group(2))
    stack.pids = {
        "proxy": proxy.pid,
        "upstream (openai fake)": fake_openai.pid,
        "upstream (grpc fake)": fake_grpc.pid,
        "upstream (openai fake, paced)": paced_openai.pid,
        "upstream (grpc fake, paced)": paced_grpc.pid,
        "upstream (anthropic fake)": fake_anthropic.pid,
    }
    log(
        f"fakes: openai :{stack.openai_port}, grpc :{stack.grpc_port}; proxy: REST :{stack.proxy_rest_port}, "
        f"gRPC :{stack.proxy_grpc_port}"
    )


# ---------------------------------------------------------------------------------------- CPU accounting


def cpu_snapshot(pids: dict[str, int]) -> dict[str, float]:
    times = os.times()
    out = {"load generator": times.user + times.system}
    for name, pid in pids.items():
        value = proc_cpu_seconds(pid)
        if value is not None:
            out[name] = value
    return out


# ------------------------------------------------------------------------------------------- clients

JSON_HEADERS = {"Content-Type": "application/json"}


# A tool-calling request: the fakes answer it with a call of the function (its arguments streamed in
# fragments), as a model does.
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
                "required": ["city"],
            },
        },
    }
]


def rest_body(stream: bool, model: str = REST_MODEL, tools: bool = False) -> bytes:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": PROMPT}]}
    if tools:
        body["tools"] = TOOLS
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return orjson.dumps(body)


GRPC_REQUEST = pb.ChatRequest(model=GRPC_MODEL, messages=[pb.ChatMessage(role=pb.ROLE_USER, content=PROMPT)])
GRPC_PACED_REQUEST = pb.ChatRequest(
    model=GRPC_PACED_MODEL, messages=[pb.ChatMessage(role=pb.ROLE_USER, content=PROMPT)]
)
GRPC_TOOL_REQUEST = pb.ChatRequest(
    model=GRPC_MODEL,
    messages=[pb.ChatMessage(role=pb.ROLE_USER, content=PROMPT)],
    tools=[
        pb.Tool(
            type="function",
            function=pb.FunctionDefinition(
                name="get_weather",
                description="The current weather in a city",
                parameters_json=orjson.dumps(TOOLS[0]["function"]["parameters"]).decode(),
            ),
        )
    ],
)

MESSAGES_HEADERS = {"Content-Type": "application/json", "anthropic-version": "2023-06-01"}


def messages_body(stream: bool) -> bytes:
    body: dict[str, Any] = {
        "model": MESSAGES_MODEL,
        "max_tokens": 1024,
        "messages": [{"role": "user", "content": PROMPT}],
    }
    if stream:
        body["stream"] = True
    return orjson.dumps(body)


# A request function sends one request, checks the answer and returns the perf_counter_ns() at which the
# first content token arrived (streams) or 0 (unary).
RequestFn = Callable[[], Awaitable[int]]


def rest_unary(session: aiohttp.ClientSession, url: str, tools: bool = False) -> RequestFn:
    body = rest_body(stream=False, tools=tools)
    what = "tool_calls" if tools else "content"

    async def call() -> int:
        async with session.post(url, data=body, headers=JSON_HEADERS) as resp:
            data = await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {data[:200]!r}")
        if not orjson.loads(data)["choices"][0]["message"].get(what):
            raise RuntimeError(f"no {what} in the reply")
        return 0

    return call


def rest_stream(
    session: aiohttp.ClientSession, url: str, model: str = REST_MODEL, tools: bool = False
) -> RequestFn:
    """A streamed request; its first token is the first chunk with content (or a tool-call fragment)."""
    body = rest_body(stream=True, model=model, tools=tools)

    async def call() -> int:
        first = 0
        done = False
        async with session.post(url, data=body, headers=JSON_HEADERS) as resp:
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {(await resp.read())[:200]!r}")
            async for line in resp.content:
                if not line.startswith(b"data: "):
                    continue
                data = line[6:].rstrip()
                if data == b"[DONE]":
                    done = True
                    continue
                if not first:
                    choices = orjson.loads(data).get("choices")
                    delta = choices[0].get("delta", {}) if choices else {}
                    if delta.get("content") or delta.get("tool_calls"):
                        first = time.perf_counter_ns()
        if not first or not done:
            raise RuntimeError("stream ended without content or without [DONE]")
        return first

    return call


def messages_unary(session: aiohttp.ClientSession, url: str) -> RequestFn:
    body = messages_body(stream=False)

    async def call() -> int:
        async with session.post(url, data=body, headers=MESSAGES_HEADERS) as resp:
            data = await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {data[:200]!r}")
        if not orjson.loads(data)["content"][0].get("text"):
            raise RuntimeError("no text in the reply")
        return 0

    return call


def messages_stream(session: aiohttp.ClientSession, url: str) -> RequestFn:
    """A streamed Messages request; its first token is the first text_delta."""
    body = messages_body(stream=True)

    async def call() -> int:
        first = 0
        stopped = False
        async with session.post(url, data=body, headers=MESSAGES_HEADERS) as resp:
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {(await resp.read())[:200]!r}")
            async for line in resp.content:
                if line.startswith(b"event: message_stop"):
                    stopped = True
                elif not first and line.startswith(b"data: ") and b'"text_delta"' in line:
                    first = time.perf_counter_ns()
        if not first or not stopped:
            raise RuntimeError("stream ended without text or without message_stop")
        return first

    return call


def grpc_unary(stub: pb_grpc.LLMServiceStub, request: pb.ChatRequest = GRPC_REQUEST) -> RequestFn:
    async def call() -> int:
        response = await stub.ChatCompletion(request, timeout=REQUEST_TIMEOUT_S)
        if not (response.content or (response.choices and response.choices[0].message.tool_calls)):
            raise RuntimeError("empty reply")
        return 0

    return call


def grpc_stream(stub: pb_grpc.LLMServiceStub, request: pb.ChatRequest = GRPC_REQUEST) -> RequestFn:
    """A streamed request; its first token is the first chunk with text or a tool-call fragment (in the
    chunk's choices: the fake answers a request with tools in OpenAI's chunk layout)."""

    async def call() -> int:
        first = 0
        finished = False
        async for chunk in stub.StreamingChat(request, timeout=REQUEST_TIMEOUT_S):
            if not first and (chunk.delta or any(c.delta.tool_calls for c in chunk.choices)):
                first = time.perf_counter_ns()
            if chunk.finish_reason or any(c.HasField("finish_reason") for c in chunk.choices):
                finished = True
        if not first or not finished:
            raise RuntimeError("stream ended without content or without finish_reason")
        return first

    return call


# ---------------------------------------------------------------------------------------- measurement


@dataclasses.dataclass
class Block:
    """One block of requests against one target."""

    measurement: str
    target: str
    round: int
    concurrency: int
    completed: int
    errors: int
    elapsed_s: float
    latency_us: list[float]
    ttft_us: list[float]
    cpu_s: dict[str, float]
    first_error: str | None = None

    @property
    def rate(self) -> float:
        return self.completed / self.elapsed_s if self.elapsed_s > 0 else 0.0


async def run_block(
    fn: RequestFn, concurrency: int, max_requests: int, max_seconds: float
) -> tuple[int, int, float, list[float], list[float], str | None]:
    """Run up to ``max_requests`` calls with ``concurrency`` workers for at most ``max_seconds``."""
    latencies: list[float] = []
    ttfts: list[float] = []
    issued = 0
    errors = 0
    first_error: str | None = None
    start = time.perf_counter()
    deadline = start + max_seconds
    perf_ns = time.perf_counter_ns

    async def worker() -> None:
        nonlocal issued, errors, first_error
        while issued < max_requests and time.perf_counter() < deadline:
            issued += 1
            t0 = perf_ns()
            try:
                first = await fn()
            except Exception as exc:
                errors += 1
                if first_error is None:
                    first_error = f"{type(exc).__name__}: {exc}"[:300]
                continue
            t1 = perf_ns()
            latencies.append((t1 - t0) / 1000)
            if first:
                ttfts.append((first - t0) / 1000)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    return len(latencies), errors, elapsed, latencies, ttfts, first_error


@dataclasses.dataclass
class Measurement:
    key: str  # e.g. "rest/unary/c1"
    front: str  # rest | grpc
    mode: str  # unary | stream
    concurrency: int
    fns: dict[str, RequestFn]  # target -> request function
    requests: int | None = None  # requests per block at concurrency 1 and per warm-up (None: the settings')


class Bench:
    def __init__(self, settings: Settings, stack: Stack) -> None:
        self.settings = settings
        self.stack = stack
        self.blocks: list[Block] = []
        self.notes: list[str] = []
        self.other_load: dict[str, float] = {}  # phase -> share of all CPUs used by other processes
        self.deadline = time.monotonic() + settings.budget_s

    async def measure(self) -> None:
        s, st = self.settings, self.stack
        max_conc = max((*s.concurrency, 1))
        connector_limit = max(256, max_conc * 2)
        sessions = {
            t: aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=connector_limit, keepalive_timeout=60),
                timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S),
            )
            for t in TARGETS
        }
        channels = {
            "direct": grpc.aio.insecure_channel(f"127.0.0.1:{st.grpc_port}"),
            "proxy": grpc.aio.insecure_channel(f"127.0.0.1:{st.proxy_grpc_port}"),
        }
        try:
            urls = {
                "direct": f"http://127.0.0.1:{st.openai_port}/v1/chat/completions",
                "proxy": f"http://127.0.0.1:{st.proxy_rest_port}/v1/chat/completions",
            }
            stubs = {t: pb_grpc.LLMServiceStub(channels[t]) for t in TARGETS}
            latency = [
                Measurement(
                    "rest/unary/c1",
                    "rest",
                    "unary",
                    1,
                    {t: rest_unary(sessions[t], urls[t]) for t in TARGETS},
                ),
                Measurement("grpc/unary/c1", "grpc", "unary", 1, {t: grpc_unary(stubs[t]) for t in TARGETS}),
                Measurement(
                    "rest/stream/c1",
                    "rest",
                    "stream",
                    1,
                    {t: rest_stream(sessions[t], urls[t]) for t in TARGETS},
                ),
                Measurement(
                    "grpc/stream/c1", "grpc", "stream", 1, {t: grpc_stream(stubs[t]) for t in TARGETS}
                ),
            ]
            throughput = [
                Measurement(f"{m.front}/unary/c{c}", m.front, "unary", c, m.fns)
                for c in s.concurrency
                for m in latency[:2]
            ]
            paced_urls = {
                "direct": f"http://127.0.0.1:{st.paced_openai_port}/v1/chat/completions",
                "proxy": urls["proxy"],
            }
            paced_channel = grpc.aio.insecure_channel(f"127.0.0.1:{st.paced_grpc_port}")
            channels["paced"] = paced_channel
            paced_stubs = {"direct": pb_grpc.LLMServiceStub(paced_channel), "proxy": stubs["proxy"]}
            messages_urls = {
                "direct": f"http://127.0.0.1:{st.anthropic_port}/v1/messages",
                "proxy": f"http://127.0.0.1:{st.proxy_rest_port}/v1/messages",
            }
            extra = [
                Measurement(
                    "messages/unary/c1",
                    "messages",
                    "unary",
                    1,
                    {t: messages_unary(sessions[t], messages_urls[t]) for t in TARGETS},
                ),
                Measurement(
                    "messages/stream/c1",
                    "messages",
                    "stream",
                    1,
                    {t: messages_stream(sessions[t], messages_urls[t]) for t in TARGETS},
                ),
                Measurement(
                    "rest/tool/c1",
                    "rest",
                    "unary",
                    1,
                    {t: rest_unary(sessions[t], urls[t], True) for t in TARGETS},
                ),
                Measurement(
                    "rest/toolstream/c1",
                    "rest",
                    "stream",
                    1,
                    {t: rest_stream(sessions[t], urls[t], tools=True) for t in TARGETS},
                ),
                Measurement(
                    "grpc/tool/c1",
                    "grpc",
                    "unary",
                    1,
                    {t: grpc_unary(stubs[t], GRPC_TOOL_REQUEST) for t in TARGETS},
                ),
                Measurement(
                    "grpc/toolstream/c1",
                    "grpc",
                    "stream",
                    1,
                    {t: grpc_stream(stubs[t], GRPC_TOOL_REQUEST) for t in TARGETS},
                ),
                Measurement(
                    "rest/paced/c1",
                    "rest",
                    "stream",
                    1,
                    {t: rest_stream(sessions[t], paced_urls[t], REST_PACED_MODEL) for t in TARGETS},
                    s.paced_requests,
                ),
                Measurement(
                    "grpc/paced/c1",
                    "grpc",
                    "stream",
                    1,
                    {t: grpc_stream(paced_stubs[t], GRPC_PACED_REQUEST) for t in TARGETS},
                    s.paced_requests,
                ),
            ]
            await self.warm_up([*latency, *extra], max_conc)
            await self.rounds("latency", [*latency, *extra], s.requests, s.block_timeout_s)
            await self.rounds("throughput", throughput, s.tp_requests, s.tp_seconds)
        finally:
            for session in sessions.values():
                await session.close()
            for channel in channels.values():
                await channel.close()

    async def warm_up(self, measurements: Sequence[Measurement], max_conc: int) -> None:
        """Open the connections (the proxy's upstream pool too) and warm every code path before measuring."""
        log("warming up")
        n = self.settings.warmup
        for m in measurements:
            for target, fn in m.fns.items():
                completed, errors, _, _, _, first_error = await run_block(fn, 1, m.requests or n, 30.0)
                if m.mode == "unary" and m.key.endswith("/unary/c1"):
                    c2, e2, _, _, _, err2 = await run_block(fn, max_conc, 4 * n, 30.0)
                    completed, errors, first_error = completed + c2, errors + e2, first_error or err2
                if errors or not completed:
                    raise RuntimeError(
                        f"warm-up of {m.key} ({target}) failed: {errors} error(s): {first_error}"
                    )

    async def rounds(
        self, phase: str, measurements: Sequence[Measurement], max_requests: int, max_s: float
    ) -> None:
        """The phase's rounds, and how busy the rest of the machine was meanwhile."""
        wall, busy, ours = time.monotonic(), machine_busy_seconds(), cpu_snapshot(self.stack.pids)
        try:
            await self._rounds(phase, measurements, max_requests, max_s)
        finally:
            ours_after = cpu_snapshot(self.stack.pids)
            busy_after = machine_busy_seconds()
            if busy is not None and busy_after is not None:
                mine = sum(ours_after[k] - ours[k] for k in ours_after if k in ours)
                other = max(0.0, (busy_after - busy) - mine)
                self.other_load[phase] = other / ((time.monotonic() - wall) * usable_cpus())

    async def _rounds(
        self, phase: str, measurements: Sequence[Measurement], max_requests: int, max_s: float
    ) -> None:
        s = self.settings
        for r in range(s.rounds):
            if time.monotonic() > self.deadline:
                note = f"time budget of {s.budget_s:.0f}s spent: {phase} ran {r} of {s.rounds} rounds"
                self.notes.append(note)
                log(note)
                return
            log(f"{phase}: round {r + 1}/{s.rounds}")
            order = TARGETS if r % 2 == 0 else TARGETS[::-1]
            for m in measurements:
                for target in order:
                    await self.block(m, target, r, m.requests or max_requests, max_s)

    async def block(self, m: Measurement, target: str, round_: int, max_requests: int, max_s: float) -> None:
        gc.collect()
        await asyncio.sleep(0.02)  # let the previous block's stragglers settle
        before = cpu_snapshot(self.stack.pids)
        completed, errors, elapsed, lat, ttft, first_error = await run_block(
            m.fns[target], m.concurrency, max_requests, max_s
        )
        after = cpu_snapshot(self.stack.pids)
        cpu = {k: after[k] - before[k] for k in after if k in before}
        if not completed:
            raise RuntimeError(f"{m.key} ({target}): no request succeeded ({errors} errors: {first_error})")
        self.blocks.append(
            Block(
                m.key, target, round_, m.concurrency, completed, errors, elapsed, lat, ttft, cpu, first_error
            )
        )


# ------------------------------------------------------------------------------------------ statistics


def summary(values: Sequence[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": percentile(values, 0.50),
        "p99": percentile(values, 0.99),
        "mean": sum(values) / len(values) if values else math.nan,
    }


class Results:
    def __init__(self, blocks: Sequence[Block]) -> None:
        self.blocks = blocks

    def select(self, key: str, target: str) -> list[Block]:
        return [b for b in self.blocks if b.measurement == key and b.target == target]

    def samples(self, key: str, target: str, field: str) -> list[float]:
        return [v for b in self.select(key, target) for v in getattr(b, field)]

    def per_round(self, key: str, field: str, stat: Callable[[list[float]], float]) -> list[float]:
        """stat(proxy) - stat(direct) of each round in which both targets ran."""
        rounds = sorted({b.round for b in self.blocks if b.measurement == key})
        out = []
        for r in rounds:
            d = [v for b in self.select(key, "direct") if b.round == r for v in getattr(b, field)]
            p = [v for b in self.select(key, "proxy") if b.round == r for v in getattr(b, field)]
            if d and p:
                out.append(stat(p) - stat(d))
        return out

    def rate(self, key: str, target: str) -> float:
        blocks = self.select(key, target)
        elapsed = sum(b.elapsed_s for b in blocks)
        return sum(b.completed for b in blocks) / elapsed if elapsed else math.nan

    def rate_ratios(self, key: str) -> list[float]:
        direct = {b.round: b.rate for b in self.select(key, "direct")}
        return [b.rate / direct[b.round] for b in self.select(key, "proxy") if direct.get(b.round)]

    def cpu_per_request_us(self, key: str, target: str) -> dict[str, float]:
        blocks = self.select(key, target)
        completed = sum(b.completed for b in blocks)
        totals: dict[str, float] = {}
        for b in blocks:
            for name, seconds in b.cpu_s.items():
                totals[name] = totals.get(name, 0.0) + seconds
        return {name: seconds / completed * 1e6 for name, seconds in totals.items()} if completed else {}

    def errors(self) -> list[str]:
        out = []
        for b in self.blocks:
            if b.errors:
                out.append(
                    f"{b.measurement} {b.target} round {b.round + 1}: {b.errors} error(s), "
                    f"e.g. {b.first_error}"
                )
        return out


# ------------------------------------------------------------------------------------------- reporting


def span(values: Sequence[float], fmt: Callable[[float], str]) -> str:
    if len(values) < 2:
        return ""
    return f" (rounds: {fmt(min(values))} to {fmt(max(values))})"


def main_table(results: Results, settings: Settings) -> list[str]:
    rows = [
        "| measurement | direct | via proxy | added / ratio | target | met? |",
        "|---|---|---|---|---|---|",
    ]
    for front in ("rest", "grpc"):
        label = FRONT_LABEL[front]
        for mode, field, what in (
            ("unary", "latency_us", "unary latency"),
            ("stream", "ttft_us", "streaming TTFT"),
            ("stream", "latency_us", "streaming, whole stream"),
        ):
            key = f"{front}/{mode}/c1"
            d = summary(results.samples(key, "direct", field))
            p = summary(results.samples(key, "proxy", field))
            if not d["n"] or not p["n"]:
                continue
            with_target = field != "latency_us" or mode == "unary"
            for stat in ("p50", "p99", "mean"):
                added = p[stat] - d[stat]
                target, ok = "", ""
                if with_target and stat == "p50":
                    limit = P50_TARGET_MS[front]
                    target, ok = f"added < {limit:g} ms", met(added < limit * 1000)
                elif with_target and stat == "p99":
                    target, ok = f"added < {P99_TARGET_MS:g} ms", met(added < P99_TARGET_MS * 1000)
                extra = ""
                if stat == "p50":
                    extra = span(results.per_round(key, field, lambda v: percentile(v, 0.5)), signed_ms)
                rows.append(
                    f"| {label}, {what}, c=1, {stat} | {ms(d[stat])} | {ms(p[stat])} | "
                    f"{signed_ms(added)}{extra} | {target or '-'} | {ok or '-'} |"
                )
    for front in ("rest", "grpc"):
        for c in settings.concurrency:
            key = f"{front}/unary/c{c}"
            d_rate, p_rate = results.rate(key, "direct"), results.rate(key, "proxy")
            if math.isnan(d_rate) or math.isnan(p_rate):
                continue
            ratio = p_rate / d_rate
            extra = span(results.rate_ratios(key), lambda v: f"{v:.0%}")
            target, ok = "-", "-"
            if c == THROUGHPUT_TARGET_CONCURRENCY:
                target, ok = f">= {THROUGHPUT_TARGET:.0%} of direct", met(ratio >= THROUGHPUT_TARGET)
            rows.append(
                f"| {FRONT_LABEL[front]}, unary throughput, c={c} | {d_rate:,.0f} req/s | "
                f"{p_rate:,.0f} req/s | {ratio:.0%} of direct{extra} | {target} | {ok} |"
            )
    return rows


def extra_table(results: Results, settings: Settings) -> list[str]:
    """Paced streams (whole stream and TTFT) and tool calls (unary, streamed), p50 and p99 at c=1."""
    rows = [
        "| measurement | direct | via proxy | added | target | met? |",
        "|---|---|---|---|---|---|",
    ]
    paced = f"paced stream ({PACED_TOKENS} tokens, {PACED_TOKEN_DELAY_MS:g} ms apart)"
    for front in ("rest", "grpc", "messages"):
        label = FRONT_LABEL[front]
        if front == "messages":
            rows_of = [
                (f"{front}/unary/c1", "latency_us", "to an anthropic provider, unary", False),
                (f"{front}/stream/c1", "ttft_us", "to an anthropic provider, streamed, TTFT", False),
                (
                    f"{front}/stream/c1",
                    "latency_us",
                    "to an anthropic provider, streamed, whole stream",
                    False,
                ),
            ]
        else:
            rows_of = [
                (f"{front}/paced/c1", "latency_us", f"{paced}, whole stream", True),
                (f"{front}/paced/c1", "ttft_us", f"{paced}, TTFT", False),
                (f"{front}/tool/c1", "latency_us", "tool call, unary", False),
                (f"{front}/toolstream/c1", "ttft_us", "tool call, streamed, first fragment", False),
                (f"{front}/toolstream/c1", "latency_us", "tool call, streamed, whole stream", False),
            ]
        for key, field, what, with_target in rows_of:
            d = summary(results.samples(key, "direct", field))
            p = summary(results.samples(key, "proxy", field))
            if not d["n"] or not p["n"]:
                continue
            for stat in ("p50", "p99"):
                added = p[stat] - d[stat]
                target = ok = "-"
                if with_target and stat == "p50":
                    target, ok = f"added < {PACED_TARGET_MS:g} ms", met(added < PACED_TARGET_MS * 1000)
                extra = ""
                if stat == "p50":
                    extra = span(results.per_round(key, field, lambda v: percentile(v, 0.5)), signed_ms)
                rows.append(
                    f"| {label}, {what}, c=1, {stat} | {ms(d[stat])} | {ms(p[stat])} | "
                    f"{signed_ms(added)}{extra} | {target} | {ok} |"
                )
    return rows if len(rows) > 2 else []


def cpu_table(results: Results, settings: Settings) -> list[str]:
    """CPU time per request of each process, for the concurrency-1 pairs and the highest concurrency."""
    ncpu = usable_cpus()
    rows = [
        "| block | load generator | proxy | upstream fake | total "
        f"| ceiling if CPU-bound ({ncpu} CPUs) | proxy's ceiling on a core of its own |",
        "|---|---|---|---|---|---|---|",
    ]
    top = max(settings.concurrency) if settings.concurrency else None
    for front in ("rest", "grpc", "messages"):
        upstream = {
            "rest": "upstream (openai fake)",
            "grpc": "upstream (grpc fake)",
            "messages": "upstream (anthropic fake)",
        }[front]
        paced_upstream = upstream.replace("fake)", "fake, paced)")
        keys = [
            (f"{front}/unary/c1", "unary, c=1"),
            (f"{front}/stream/c1", "streaming, c=1"),
            (f"{front}/tool/c1", "tool call, c=1"),
            (f"{front}/toolstream/c1", "tool call streamed, c=1"),
            (f"{front}/paced/c1", "paced stream, c=1"),
        ]
        if top is not None:
            keys.append((f"{front}/unary/c{top}", f"unary, c={top}"))
        for key, what in keys:
            for target in TARGETS:
                cpu = results.cpu_per_request_us(key, target)
                up_name = paced_upstream if "/paced/" in key else upstream
                if not cpu or up_name not in cpu:
                    continue
                gen, up = cpu.get("load generator", 0.0), cpu[up_name]
                prx = cpu.get("proxy", 0.0) if target == "proxy" else 0.0
                total = gen + prx + up
                ceiling = own = "-"
                if not key.endswith("/c1") and total:
                    ceiling = f"{min(1e6 / max(gen, prx, up), ncpu * 1e6 / total):,.0f} req/s"
                    own = f"{1e6 / prx:,.0f} req/s" if prx else "-"
                side = "direct" if target == "direct" else "via proxy"
                rows.append(
                    f"| {FRONT_LABEL[front]}, {what}, {side} | {gen:.0f} µs | {prx:.0f} µs | {up:.0f} µs "
                    f"| {total:.0f} µs | {ceiling} | {own} |"
                )
    return rows if len(rows) > 2 else []


def usable_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def versions() -> dict[str, str]:
    out = {}
    for dist in ("uvloop", "aiohttp", "httptools", "grpcio", "orjson", "protobuf", "httpx", "httpx2"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[dist] = importlib.metadata.version(dist)
    return out


def machine_info() -> dict[str, Any]:
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "cpu_model": cpu_model(),
        "loadavg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "python_impl": platform.python_implementation(),
        "versions": versions(),
    }


def layout_text(info: dict[str, Any]) -> str:
    cpus = info["cpus_usable"] or info["cpu_count"]
    return (
        f"CPU layout: {cpus} CPU(s), no pinning: the OS shares them between this process (the load "
        "generator: uvloop, one aiohttp session and one grpc.aio channel per target), the proxy (one "
        "process, uvloop) and the fake upstream being measured (one process per fake, uvloop; the other "
        "fake idles). Everything talks over loopback."
    )


# ------------------------------------------------------------------------------------- library choices


@dataclasses.dataclass
class MicroRow:
    comparison: str
    candidate: str
    result: str
    value: float  # the number compared (lower is better for latency/time, higher for rates)
    higher_is_better: bool = False
    note: str = ""


def _import_httpx() -> tuple[Any, str] | None:
    for name in ("httpx", "httpx2"):
        try:
            module = __import__(name)
        except ImportError:
            continue
        return module, f"{name} {versions().get(name, getattr(module, '__version__', '?'))}"
    return None


ClientFactory = Callable[[str], contextlib.AbstractAsyncContextManager[RequestFn]]


@contextlib.asynccontextmanager
async def _aiohttp_client(url: str) -> AsyncIterator[RequestFn]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256)) as session:
        yield rest_unary(session, url)


@contextlib.asynccontextmanager
async def _http1_client(url: str) -> AsyncIterator[RequestFn]:
    client = http_client.HTTPClient(url, JSON_HEADERS, max_connections=256, connect_timeout=REQUEST_TIMEOUT_S)
    body = rest_body(stream=False)

    async def call() -> int:
        resp = await client.post(body, REQUEST_TIMEOUT_S)
        data = await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}")
        if not orjson.loads(data)["choices"][0]["message"]["content"]:
            raise RuntimeError("empty reply")
        return 0

    try:
        yield call
    finally:
        await client.close()


def _httpx_client(httpx: Any) -> ClientFactory:
    @contextlib.asynccontextmanager
    async def factory(url: str) -> AsyncIterator[RequestFn]:
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
        body = rest_body(stream=False)
        async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=limits) as client:

            async def call() -> int:
                resp = await client.post(url, content=body, headers=JSON_HEADERS)
                if resp.status_code != 200:
                    raise RuntimeError(f"HTTP {resp.status_code}")
                if not orjson.loads(resp.content)["choices"][0]["message"]["content"]:
                    raise RuntimeError("empty reply")
                return 0

            yield call

    return factory


async def _client_latency(factory: ClientFactory, url: str, n: int, warmup: int) -> list[float]:
    async with factory(url) as fn:
        await run_block(fn, 1, warmup, 30.0)
        _, _, _, lat, _, _ = await run_block(fn, 1, n, 30.0)
    return lat


async def _client_rate(factory: ClientFactory, url: str, c: int, seconds: float) -> float:
    async with factory(url) as fn:
        await run_block(fn, c, 4 * c, 30.0)
        completed, _, elapsed, _, _, _ = await run_block(fn, c, 10**9, seconds)
    return completed / elapsed


@contextlib.asynccontextmanager
async def _grpc_channel_client(port: int) -> AsyncIterator[RequestFn]:
    channel = Channel(f"127.0.0.1:{port}")
    body = GRPC_REQUEST.SerializeToString()
    path = "/llmgateway.v1.LLMService/ChatCompletion"

    async def call() -> int:
        if not pb.ChatResponse.FromString(await channel.unary(path, body, REQUEST_TIMEOUT_S)).content:
            raise RuntimeError("empty reply")
        return 0

    try:
        yield call
    finally:
        await channel.close()


def _static_servers_cpu(
    servers: dict[str, str],
    client_for: Callable[[int], contextlib.AbstractAsyncContextManager[RequestFn]],
    c: int,
    seconds: float,
) -> dict[str, float]:
    """Start each kind of ``bench/static_server.py`` and measure its CPU per request twice, alternately,
    with ``c`` workers calling it through ``client_for(port)``: the mean per kind."""
    children = {
        kind: Child(
            f"static {kind} server",
            [sys.executable, str(pathlib.Path(__file__).with_name("static_server.py")), kind],
            pathlib.Path(tempfile.gettempdir()) / f"llmgw-bench-static-{kind}-{os.getpid()}.log",
        )
        for kind in servers
    }
    cpu: dict[str, list[float]] = {kind: [] for kind in servers}
    try:
        ports = {
            kind: int(child.wait_for(r"listening on port (\d+)").group(1)) for kind, child in children.items()
        }
        for _ in range(2):
            for kind, child in children.items():
                per = uvloop.run(_server_cpu_per_request(client_for(ports[kind]), child.pid, c, seconds))
                if per is not None:
                    cpu[kind].append(per)
    finally:
        for child in children.values():
            child.stop()
    return {kind: sum(values) / len(values) for kind, values in cpu.items() if values}


async def _server_cpu_per_request(
    client: contextlib.AbstractAsyncContextManager[RequestFn], pid: int, c: int, seconds: float
) -> float | None:
    """CPU time (µs) the process ``pid`` spends per request while ``c`` workers call it through ``client``."""
    async with client as fn:
        await run_block(fn, c, 4 * c, 30.0)
        before = proc_cpu_seconds(pid)
        completed, _, _, _, _, _ = await run_block(fn, c, 10**9, seconds)
        after = proc_cpu_seconds(pid)
    if before is None or after is None or not completed:
        return None
    return (after - before) / completed * 1e6


def _latency_and_rate_rows(
    comparison: str,
    labels: dict[str, str],
    latencies: dict[str, list[float]],
    rates: dict[str, list[float]],
    concurrency: int,
) -> list[MicroRow]:
    """Per candidate, a row of its latency at c=1 and one of its mean rate at ``concurrency``."""
    rows = []
    for key, label in labels.items():
        st = summary(latencies[key])
        rows.append(
            MicroRow(comparison.format(c=1), label, f"p50 {ms(st['p50'])}, p99 {ms(st['p99'])}", st["p50"])
        )
    for key, label in labels.items():
        rate = sum(rates[key]) / len(rates[key])
        rows.append(
            MicroRow(
                comparison.format(c=concurrency), label, f"{rate:,.0f} req/s", rate, higher_is_better=True
            )
        )
    return rows


def library_comparison(settings: Settings, stack: Stack) -> tuple[list[MicroRow], list[str]]:
    """aiohttp vs httpx, asyncio vs uvloop, orjson vs json; each candidate alternates in two halves."""
    n = max(1, settings.micro_requests // 2)
    warmup = max(5, n // 10)
    url = f"http://127.0.0.1:{stack.openai_port}/v1/chat/completions"
    notes: list[str] = []
    rows: list[MicroRow] = []
    vers = versions()
    conc = max((*settings.concurrency, 1)) // 2 or 1

    # HTTP client (uvloop for all): latency at concurrency 1, then requests/s at a moderate concurrency.
    httpx_info = _import_httpx()
    clients: dict[str, ClientFactory] = {
        f"llmgw._net.http_client (httptools {vers.get('httptools', '?')}; the REST backends' client)": _http1_client,
        f"aiohttp {vers.get('aiohttp', '?')}": _aiohttp_client,
    }
    if httpx_info:
        clients[httpx_info[1]] = _httpx_client(httpx_info[0])
    else:
        notes.append("httpx (or httpx2) is not importable: the HTTP client comparison leaves it out.")
    lat: dict[str, list[float]] = {name: [] for name in clients}
    rates: dict[str, list[float]] = {name: [] for name in clients}
    for _ in range(2):
        for name, factory in clients.items():
            lat[name] += uvloop.run(_client_latency(factory, url, n, warmup))
    for _ in range(2):
        for name, factory in clients.items():
            rates[name].append(uvloop.run(_client_rate(factory, url, conc, settings.micro_seconds / 2)))
    labels = {name: name for name in clients}
    rows += _latency_and_rate_rows(
        "HTTP client: POST to the openai fake, c={c} (uvloop)", labels, lat, rates, conc
    )

    # HTTP servers, then gRPC servers, each alone in a child process answering a fixed reply: CPU per call.
    server_comparisons: list[
        tuple[str, dict[str, str], Callable[[int], contextlib.AbstractAsyncContextManager[RequestFn]]]
    ] = [
        (
            f"HTTP server: CPU per POST answered, c={conc}",
            {
                "llmgw": "llmgw._net.http_server (httptools; the REST front's server)",
                "aiohttp": f"aiohttp {vers.get('aiohttp', '?')} web server",
            },
            lambda port: _http1_client(f"http://127.0.0.1:{port}/v1/chat/completions"),
        ),
        (
            f"gRPC server: CPU per ChatCompletion answered, c={conc}",
            {
                "grpc-llmgw": "llmgw._net.grpc_server (the gRPC front's server)",
                "grpc-aio": f"grpc.aio {vers.get('grpcio', '?')} server ({grpc_env.EXPERIMENTS})",
            },
            _grpc_channel_client,
        ),
    ]
    for comparison, servers, client_for in server_comparisons:
        for kind, per in _static_servers_cpu(servers, client_for, conc, settings.micro_seconds / 2).items():
            rows.append(MicroRow(comparison, servers[kind], f"{per:.0f} µs", per))

    # gRPC clients, each in its own process (grpcio reads GRPC_EXPERIMENTS on import), alternately.
    grpc_clients = {  # label: (client, GRPC_EXPERIMENTS); an empty value keeps grpcio's defaults
        f"grpc.aio {vers.get('grpcio', '?')}, grpcio's defaults": ("grpcio", ""),
        f"grpc.aio, llmgw's GRPC_EXPERIMENTS ({grpc_env.EXPERIMENTS})": ("grpcio", grpc_env.EXPERIMENTS),
        "llmgw._net.grpc_channel (the grpc providers' client)": ("llmgw", grpc_env.EXPERIMENTS),
    }
    grpc_runs: dict[str, list[dict[str, float]]] = {name: [] for name in grpc_clients}
    for _ in range(2):
        for name, (client, experiments) in grpc_clients.items():
            out = subprocess.run(
                [
                    sys.executable,
                    str(pathlib.Path(__file__).with_name("grpc_client.py")),
                    client,
                    str(stack.grpc_port),
                    str(n),
                    str(settings.micro_seconds / 2),
                ],
                env={**os.environ, "GRPC_EXPERIMENTS": experiments},
                capture_output=True,
                text=True,
                timeout=120,
                check=True,
            )
            grpc_runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    for field, what, unit in (("p50_us", "c=1, p50", "ms"), ("cpu_us", "c=64, client CPU per call", "µs")):
        for name, runs in grpc_runs.items():
            value = sum(r[field] for r in runs) / len(runs)
            result = f"{ms(value)}" if unit == "ms" else f"{value:.0f} µs"
            rows.append(
                MicroRow(f"gRPC client (ChatCompletion to the grpc fake): {what}", name, result, value)
            )

    # Event loop, with the aiohttp client: latency at concurrency 1, then requests/s at concurrency `conc`.
    runners: dict[str, Callable[[Any], Any]] = {"asyncio": asyncio.run, "uvloop": uvloop.run}
    loops: dict[str, list[float]] = {"asyncio": [], "uvloop": []}
    loop_rates: dict[str, list[float]] = {"asyncio": [], "uvloop": []}
    for _ in range(2):
        for name, run in runners.items():
            loops[name] += run(_client_latency(_aiohttp_client, url, n, warmup))
    for _ in range(2):
        for name, run in runners.items():
            loop_rates[name].append(run(_client_rate(_aiohttp_client, url, conc, settings.micro_seconds / 2)))
    labels = {"asyncio": "asyncio (stdlib loop)", "uvloop": f"uvloop {vers.get('uvloop', '?')}"}
    rows += _latency_and_rate_rows(
        "event loop of the client: aiohttp POST, c={c}", labels, loops, loop_rates, conc
    )

    # JSON: encode + decode of the fake's real chat.completion body.
    async def fetch() -> bytes:
        async with (
            aiohttp.ClientSession() as session,
            session.post(url, data=rest_body(False), headers=JSON_HEADERS) as resp,
        ):
            return await resp.read()

    raw = uvloop.run(fetch())
    obj = orjson.loads(raw)
    loops_n = 200 if settings.micro_requests < 100 else 5000
    candidates: dict[str, tuple[Callable[[bytes], Any], Callable[[Any], Any]]] = {
        f"orjson {vers.get('orjson', '?')}": (orjson.loads, orjson.dumps),
        "json (stdlib)": (
            json.loads,
            lambda o: json.dumps(o, ensure_ascii=False, separators=(",", ":")).encode(),
        ),
    }
    best: dict[str, float] = {}
    for _ in range(3):
        for name, (loads, dumps) in candidates.items():
            t0 = time.perf_counter_ns()
            for _ in range(loops_n):
                dumps(loads(raw))
            per = (time.perf_counter_ns() - t0) / loops_n / 1000
            best[name] = min(best.get(name, math.inf), per)
    del obj
    for name, per in best.items():
        rows.append(
            MicroRow(
                f"JSON: loads + dumps of a chat.completion body ({len(raw)} B)",
                name,
                f"{per:.1f} µs (best of 3)",
                per,
            )
        )
    return rows, notes


def micro_table(rows: Sequence[MicroRow]) -> list[str]:
    out = ["| comparison | candidate | result | relative to the first |", "|---|---|---|---|"]
    first: dict[str, float] = {}
    for row in rows:
        base = first.setdefault(row.comparison, row.value)
        if row.higher_is_better:
            rel = f"{row.value / base:.2f}x the rate" if base else "n/a"
        else:
            rel = f"{row.value / base:.2f}x the time" if base else "n/a"
        out.append(f"| {row.comparison} | {row.candidate} | {row.result} | {rel} |")
    return out


# ----------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="tiny counts, a smoke test (numbers are noise)")
    parser.add_argument(
        "--requests", type=int, default=0, help="requests per block at concurrency 1 (default 400)"
    )
    parser.add_argument("--rounds", type=int, default=0, help="rounds of interleaved blocks (default 5)")
    parser.add_argument(
        "--concurrency",
        type=int,
        nargs="+",
        default=[32, 64],
        metavar="C",
        help="throughput concurrency levels (default 32 64)",
    )
    parser.add_argument(
        "--throughput-seconds",
        type=float,
        default=0.0,
        help="wall-clock limit of a throughput block (default 2)",
    )
    parser.add_argument(
        "--throughput-requests",
        type=int,
        default=0,
        help="request limit of a throughput block (default 20000)",
    )
    parser.add_argument(
        "--budget", type=float, default=0.0, help="time budget of the measurement in s (default 300)"
    )
    parser.add_argument("--response-tokens", type=int, default=16, help="words per fake reply (default 16)")
    parser.add_argument(
        "--paced-requests",
        type=int,
        default=0,
        help="streams per block of the paced-stream pairs (default 20; each takes ~0.1 s)",
    )
    parser.add_argument("--no-micro", action="store_true", help="skip the library comparison")
    parser.add_argument("--json", metavar="FILE", help="also write the raw results (all samples) as JSON")
    args = parser.parse_args(argv)
    for name in ("requests", "rounds", "throughput_requests", "paced_requests"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if any(c < 1 for c in args.concurrency):
        parser.error("--concurrency values must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Settings.from_args(args)
    info = machine_info()
    signal.signal(signal.SIGTERM, raise_on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored
    stack = Stack(children=[])
    micro_rows: list[MicroRow] = []
    micro_notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="llmgw-bench-") as tmp:
        workdir = pathlib.Path(tmp)
        try:
            log("starting the fake providers and the proxy")
            start_stack(stack, workdir, settings.response_tokens)
            bench = Bench(settings, stack)
            uvloop.run(bench.measure())
            if settings.micro_requests:
                log("library comparison")
                micro_rows, micro_notes = library_comparison(settings, stack)
        except KeyboardInterrupt:
            print("interrupted; stopping the child processes", file=sys.stderr)
            return 130
        except Exception:
            for child in stack.children:
                print(f"--- last lines of {child.name}'s output:\n{child.tail()}", file=sys.stderr)
            raise
        finally:
            stack.stop()
    log("done")

    print(report(info, settings, bench, micro_rows, micro_notes), flush=True)
    if args.json:
        raw = {
            "command": command_line(),
            "machine": info,
            "settings": dataclasses.asdict(settings),
            "notes": bench.notes,
            "other_load": bench.other_load,
            "child_pids": stack.pids,
            "blocks": [_block_json(b) for b in bench.blocks],
            "library_comparison": [dataclasses.asdict(r) for r in micro_rows],
        }
        pathlib.Path(args.json).write_text(json.dumps(raw, separators=(",", ":"), default=str))
        log(f"raw results written to {args.json}")
    return 0


def _block_json(block: Block) -> dict[str, Any]:
    """A block as JSON, samples rounded to 0.1 µs (in the order they completed)."""
    out = dataclasses.asdict(block)
    out["latency_us"] = [round(v, 1) for v in block.latency_us]
    out["ttft_us"] = [round(v, 1) for v in block.ttft_us]
    out["requests_per_s"] = round(block.rate, 1)
    return out


def report(
    info: dict[str, Any], settings: Settings, bench: Bench, micro_rows: list[MicroRow], micro_notes: list[str]
) -> str:
    results = Results(bench.blocks)
    load = info["loadavg_at_start"]
    out = [
        "## Proxy latency and throughput (bench/proxy_latency.py)",
        "",
        f"Command: `{command_line()}`",
        "",
        f"Machine: {info['cpu_count']} CPU(s) ({info['cpu_model']}), {info['platform']}; "
        f"Python {info['python']}; "
        + ", ".join(f"{k} {val}" for k, val in info["versions"].items())
        + "."
        + (f" Load average at start: {load[0]:.2f}." if load else ""),
        "",
        layout_text(info),
    ]
    if bench.other_load:
        shares = ", ".join(f"{phase} {share:.0%}" for phase, share in bench.other_load.items())
        out.append(
            f"Other processes on the machine used this share of all CPUs while measuring: {shares} "
            "(from /proc/stat, minus the bench's own processes)."
        )
    out += [
        "",
        f"Setup: the fake upstreams answer at once (--latency-ms 0 --token-delay-ms 0, "
        f"{settings.response_tokens} tokens per reply). {settings.rounds} rounds; in each, direct and "
        "via-proxy blocks alternate (the order flips every round). Concurrency 1: "
        f"{settings.requests} requests per block; throughput: blocks of at most {settings.tp_seconds:g} s "
        f"or {settings.tp_requests} requests. "
        "'added' = via proxy - direct; the per-round range of the p50 difference shows the noise. "
        "TTFT = time to the first content token.",
        "",
        *main_table(results, settings),
        "",
    ]
    extra_rows = extra_table(results, settings)
    if extra_rows:
        out += [
            "The Messages front, paced streams and tool calls, c=1. Messages: POST /v1/messages to a route "
            f"of an anthropic provider (the anthropic fake), relayed as it is. Paced: a second pair of fakes sends {PACED_TOKENS} tokens "
            f"{PACED_TOKEN_DELAY_MS:g} ms apart ({settings.paced_requests} streams per block), so that a delay "
            "the proxy adds to every chunk adds up over the stream; target: the whole stream not more than "
            f"{PACED_TARGET_MS:g} ms longer via the proxy. Tool call: the request carries a function tool, "
            "the fakes answer with a call of it (streamed: its arguments in fragments of 8 characters); "
            f"{settings.requests} requests per block.",
            "",
            *extra_rows,
            "",
        ]
    cpu_rows = cpu_table(results, settings)
    if cpu_rows:
        out += [
            "CPU time per request (per stream for streaming) of each process, all its threads, from /proc. "
            "Ceiling = min(1 s / the busiest process's CPU per request, CPUs / total); the proxy's own "
            "ceiling = 1 s / its CPU per request, its throughput if it had a core to itself:",
            "",
            *cpu_rows,
            "",
        ]
    out += [f"Note: {note}" for note in bench.notes]
    errors = results.errors()
    if errors:
        out.append(f"Errors ({len(errors)} block(s) had failed requests, left out of the numbers):")
        out += [f"- {e}" for e in errors[:20]]
        out.append("")
    if micro_rows:
        out += ["### Library choices (short comparison)", "", *micro_table(micro_rows), ""]
        out += [f"Note: {n}" for n in micro_notes]
        out.append(
            "Lower time / higher rate is better. For the full JSON vs Protobuf comparison see "
            "bench/payload.py."
        )
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
