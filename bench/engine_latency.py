#!/usr/bin/env python3
"""The gateway in front of an inference engine (issue 13): llmgw's vllm provider next to SMG, the reference
router, on the same fake engine, side by side in one run.

One run starts, as separate processes on 127.0.0.1 (free ports):

* one fake engine, ``llmgw fake-provider --kind vllm --latency-ms 0`` (``--token-delay-ms``, default 0): vLLM's
  gRPC protocol (``vllm.grpc.engine.VllmEngine``), token ids in, token ids out, with the fake model's real
  tokenizer and Qwen3-like chat template (``llmgw_dev.fakes.model``);
* SMG in front of it: ``smg launch --backend vllm --worker-urls grpc://127.0.0.1:PORT --tool-call-parser qwen
  --reasoning-parser qwen3`` (one process; it fetches the tokenizer from the engine);
* one ``llmgw proxy`` with a generated configuration: a ``vllm`` provider on the same engine
  (``toolCallParser: hermes, reasoningParser: qwen3``; route ``bench-model``) and an ``openai`` provider on
  the REST path's fake (route ``bench-rest``);
* the REST path's fake, ``llmgw fake-provider --kind vllm-http``: vLLM's OpenAI HTTP server on the same model.

This process is the load generator (uvloop; aiohttp for HTTP, grpc.aio with llmgw's GRPC_EXPERIMENTS for the
engine). It measures, in blocks that alternate round after round (the order flips every round):

* **time to first token at concurrency 1**, for prompts of about 100, 2,000 and 8,000 tokens (the fake
  model's tokenizer; its context is 8,192): *direct*, ``Generate`` with the prompt's ids tokenized
  beforehand (the floor: no template, no tokenizer, no HTTP); *via SMG* and *via llmgw*, OpenAI chat
  completions streamed over HTTP; and the REST path beside it: the vllm-http fake directly and via llmgw's
  openai provider. Every request's prompt is a new one (its user message starts with the request's number),
  so no cache of a router or of the engine answers from an earlier request. "added" = via - direct;
* **streamed tokens per second at concurrency 64** through SMG and through llmgw (200-token answers:
  ``max_tokens`` 200, finish "length"), counted from each stream's usage;
* **CPU time per request and per streamed token** of each process (all its threads:
  ``/proc/PID/task/*/schedstat``, or ``/proc/PID/stat`` when a thread ended meanwhile), and the share of the
  CPUs other processes on the machine used meanwhile. At c=1 it includes what a process does while idle
  (SMG's health checks and load monitoring, timers);
* **prompt tokenization**, in this process once the children are gone: each size's rendered prompt encoded
  by the ``tokenizers`` package and by llmgw's ``EngineTokenizer`` (its tiktoken path), the ids checked equal.

Targets (printed with "yes" / "**no**"): llmgw's added TTFT (p50) within 1 ms of SMG's at every prompt size;
llmgw's streamed tokens/s at c=64 at least 0.8x SMG's. A missed target is not an error. When llmgw has no
``vllm`` provider type (``llmgw.providers.CLIENTS``), its engine rows are skipped with a message and the
rest is measured.

Usage::

    .venv/bin/python bench/engine_latency.py              # ~2 minutes on a 2-core machine
    .venv/bin/python bench/engine_latency.py --quick      # smoke run; its numbers are noise
    .venv/bin/python bench/engine_latency.py --rounds 6 --requests 60 --json results.json

Everything is bounded (a request timeout, a wall-clock limit per block, ``--budget`` for the measurement)
and every child process is stopped and reaped at the end, also on an error, Ctrl-C or SIGTERM (the children
run in their own process groups and, on Linux, get SIGTERM from the kernel if this process dies).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib
import importlib.metadata
import itertools
import json
import os
import pathlib
import platform
import re
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from llmgw import grpc_env

grpc_env.apply()  # the engine client runs with the settings llmgw gives its own grpcio processes

import aiohttp  # noqa: E402
import grpc  # noqa: E402
import orjson  # noqa: E402
import uvloop  # noqa: E402
from _harness import (  # noqa: E402  (bench/ is on the path: the script's own folder)
    READY_TIMEOUT_S,
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

MODEL = "bench-model"  # the engine's served model; llmgw's route to the vllm provider
REST_MODEL = "bench-rest"  # llmgw's route to the openai provider (the vllm-http fake), upstreamModel MODEL
PROMPT_SIZES = (100, 2000, 8000)  # tokens of the rendered prompt, about
TTFT_MAX_TOKENS = 16
STREAM_TOKENS = 200  # tokens per answer in the throughput blocks
CONCURRENCY = 64
SYSTEM = "You are a helpful assistant. Answer briefly."
REQUEST_TIMEOUT_S = 60.0
ADDED_TTFT_TARGET_MS = 1.0  # llmgw's added TTFT - SMG's, p50, every prompt size
THROUGHPUT_TARGET = 0.8  # llmgw's streamed tokens/s / SMG's, c=64

# Targets: the engine path (direct gRPC, via SMG, via llmgw's vllm provider) and the REST path (the vllm-http
# fake directly, via llmgw's openai provider).
ENGINE_TARGETS = ("direct", "smg", "llmgw")
REST_TARGETS = ("rest-direct", "rest-llmgw")
LABEL = {
    "direct": "direct (gRPC Generate, ids)",
    "smg": "via SMG",
    "llmgw": "via llmgw",
    "rest-direct": "vllm-http fake direct",
    "rest-llmgw": "via llmgw (openai provider)",
}
# Which processes serve each target (besides the load generator).
PROCESSES = {
    "direct": ("fake engine",),
    "smg": ("SMG", "fake engine"),
    "llmgw": ("llmgw proxy", "fake engine"),
    "rest-direct": ("vllm-http fake",),
    "rest-llmgw": ("llmgw proxy", "vllm-http fake"),
}
LOADGEN = "load generator"

SMG_BIN = pathlib.Path(sys.executable).with_name("smg")
vpb: Any = importlib.import_module("smg_grpc_proto.generated.vllm_engine_pb2")
vpb_grpc: Any = importlib.import_module("smg_grpc_proto.generated.vllm_engine_pb2_grpc")


def llmgw_has_engine_provider() -> tuple[bool, str]:
    """Whether llmgw has the ``vllm`` provider type (its client registered in ``llmgw.providers.CLIENTS``)."""
    try:
        from llmgw.providers import CLIENTS
    except Exception as exc:  # pragma: no cover - the package is broken
        return False, f"llmgw.providers does not import ({type(exc).__name__}: {exc})"
    if "vllm" not in CLIENTS:
        return False, (
            "llmgw has no vllm provider yet (llmgw.providers.CLIENTS: "
            f"{', '.join(sorted(CLIENTS))}): the llmgw engine rows are skipped"
        )
    return True, ""


# ------------------------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class Settings:
    requests: int  # streams per block at concurrency 1
    rounds: int
    warmup: int  # warm-up streams per target and prompt size
    tp_seconds: float  # one throughput block
    budget_s: float
    token_delay_ms: float
    block_timeout_s: float
    tokenize_repeats: int  # prompts per size in the in-process tokenization table

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        quick = args.quick
        return cls(
            requests=args.requests or (3 if quick else 40),
            rounds=args.rounds or (1 if quick else 4),
            warmup=2 if quick else 8,
            tp_seconds=args.throughput_seconds or (0.6 if quick else 4.0),
            budget_s=args.budget or (40.0 if quick else 240.0),
            token_delay_ms=args.token_delay_ms,
            block_timeout_s=30.0 if quick else 60.0,
            tokenize_repeats=3 if quick else 40,
        )


# ------------------------------------------------------------------------------------------ processes


def _fake(kind: str, workdir: pathlib.Path, settings: Settings) -> Child:
    return Child(
        f"fake {kind}",
        llmgw_argv(
            "--log-level",
            "warning",
            "fake-provider",
            "--kind",
            kind,
            "--listen",
            "127.0.0.1:0",
            "--models",
            MODEL,
            "--response-tokens",
            str(STREAM_TOKENS + 20),  # words: more tokens than max_tokens, so answers end by "length"
            "--latency-ms",
            "0",
            "--token-delay-ms",
            f"{settings.token_delay_ms:g}",
        ),
        workdir / f"fake-{kind}.log",
    )


def proxy_config(engine_port: int, rest_port: int, engine: bool) -> str:
    engine_provider = f"""\
  - name: bench-engine
    vllm:
      target: 127.0.0.1:{engine_port}
      toolCallParser: hermes
      reasoningParser: qwen3
"""
    engine_route = f"""\
  - model: {MODEL}
    grpc: bench-engine
"""
    return f"""\
# Generated by bench/engine_latency.py
generation: 1
listen:
  grpc: 127.0.0.1:0
  rest: 127.0.0.1:0
  admin: 127.0.0.1:0
limits:
  maxConcurrentRequests: 1024
  requestTimeoutSeconds: 120
shutdown:
  drainSeconds: 0
reloadIntervalSeconds: 30
providers:
{engine_provider if engine else ""}\
  - name: bench-vllm-http
    openai:
      baseURL: http://127.0.0.1:{rest_port}/v1
      maxConnections: 256
routes:
{engine_route if engine else ""}\
  - model: {REST_MODEL}
    rest: bench-vllm-http
    upstreamModel: {MODEL}
"""


@dataclasses.dataclass
class Stack:
    children: list[Child] = dataclasses.field(default_factory=list)
    engine_port: int = 0
    rest_port: int = 0
    smg_port: int = 0
    proxy_port: int = 0
    pids: dict[str, int] = dataclasses.field(default_factory=dict)

    def stop(self) -> None:
        for child in reversed(self.children):
            try:
                child.stop()
            except Exception as exc:  # keep stopping the others
                print(f"warning: could not stop {child.name}: {exc}", file=sys.stderr)

    def check_alive(self) -> None:
        for child in self.children:
            child.check_alive()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_stack(stack: Stack, workdir: pathlib.Path, settings: Settings, engine: bool) -> None:
    """The fakes, then SMG and the proxy in front of them (fills ``stack`` as processes come up)."""
    listening = r"fake-provider kind=[\w-]+ listening on [^\s]*:(\d+)"
    fake_engine = _fake("vllm", workdir, settings)
    stack.children.append(fake_engine)
    rest = _fake("vllm-http", workdir, settings)
    stack.children.append(rest)
    stack.engine_port = int(fake_engine.wait_for(listening).group(1))
    stack.rest_port = int(rest.wait_for(listening).group(1))
    stack.pids = {"fake engine": fake_engine.pid, "vllm-http fake": rest.pid}

    stack.smg_port = _free_port()
    smg = Child(
        "SMG",
        [
            str(SMG_BIN),
            "launch",
            "--backend",
            "vllm",
            "--worker-urls",
            f"grpc://127.0.0.1:{stack.engine_port}",
            "--host",
            "127.0.0.1",
            "--port",
            str(stack.smg_port),
            "--prometheus-host",
            "127.0.0.1",
            "--prometheus-port",
            str(_free_port()),
            "--tool-call-parser",
            "qwen",
            "--reasoning-parser",
            "qwen3",
            "--log-level",
            "warn",
            "--shutdown-grace-period-secs",
            "1",
        ],
        workdir / "smg.log",
    )
    stack.children.append(smg)
    stack.pids["SMG"] = smg.pid

    config_path = workdir / "proxy.yaml"
    config_path.write_text(proxy_config(stack.engine_port, stack.rest_port, engine))
    proxy = Child(
        "llmgw proxy",
        llmgw_argv("--log-level", "info", "proxy", "--config", str(config_path)),
        workdir / "proxy.log",
    )
    stack.children.append(proxy)
    stack.pids["llmgw proxy"] = proxy.pid
    match = proxy.wait_for(r"proxy serving gRPC on port (\d+), REST on port (\d+), admin on port (\d+)")
    stack.proxy_port = int(match.group(2))
    log(
        f"engine :{stack.engine_port}, vllm-http :{stack.rest_port}, SMG :{stack.smg_port}, "
        f"llmgw REST :{stack.proxy_port}"
    )


# ---------------------------------------------------------------------------------------- CPU accounting


def _threads_cpu_ns(pid: int) -> dict[int, int]:
    """Each live thread's time on a CPU in ns (``/proc/PID/task/TID/schedstat``); {} where unavailable."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return {}
    for tid in tids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            out[int(tid)] = int(pathlib.Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
    return out


@dataclasses.dataclass
class CpuSnapshot:
    ticks: dict[str, float]  # process -> utime + stime, s (10 ms ticks; dead threads included)
    threads: dict[str, dict[int, int]]  # process -> live thread -> ns on a CPU

    @classmethod
    def take(cls, pids: dict[str, int]) -> CpuSnapshot:
        times = os.times()
        ticks = {LOADGEN: times.user + times.system}
        threads = {LOADGEN: _threads_cpu_ns(os.getpid())}
        for name, pid in pids.items():
            value = proc_cpu_seconds(pid)
            if value is not None:
                ticks[name] = value
                threads[name] = _threads_cpu_ns(pid)
        busy = machine_busy_seconds()
        if busy is not None:
            ticks["machine"] = busy
        return cls(ticks, threads)

    def since(self, before: CpuSnapshot) -> dict[str, float]:
        """CPU seconds per process between ``before`` and this snapshot: the sum of its threads' schedstat
        times (ns) when no thread ended in between, else the clock ticks."""
        out = {}
        for name, value in self.ticks.items():
            if name not in before.ticks:
                continue
            out[name] = value - before.ticks[name]
            old, new = before.threads.get(name), self.threads.get(name)
            if old and new and old.keys() <= new.keys():
                out[name] = sum(ns - old.get(tid, 0) for tid, ns in new.items()) / 1e9
        return out


# --------------------------------------------------------------------------------------------- prompts


class Prompts:
    """The prompts of each size: a system message and a user message of corpus text, each request's own
    (its user message starts with the request's number); the fake model's tokenizer counts them."""

    def __init__(self) -> None:
        from llmgw_dev.fakes.model import load

        self.model = load(MODEL, STREAM_TOKENS + 20)
        corpus = (pathlib.Path(importlib.import_module("llmgw_dev").__file__ or "").parent / "data").joinpath(
            "tokenizer_corpus.txt"
        )
        words = corpus.read_text(encoding="utf-8").split()
        self.bodies: dict[int, str] = {}
        self.tokens: dict[int, int] = {}
        for size in PROMPT_SIZES:
            low, high = 1, 1
            while self._count(self._text(words, high)) < size:
                high *= 2
            while low < high:  # the fewest words that reach the size
                mid = (low + high) // 2
                if self._count(self._text(words, mid)) < size:
                    low = mid + 1
                else:
                    high = mid
            self.bodies[size] = self._text(words, low)
            self.tokens[size] = len(self.ids(size, 0))

    @staticmethod
    def _text(words: list[str], n: int) -> str:
        return " ".join(itertools.islice(itertools.cycle(words), n))

    def _count(self, body: str) -> int:
        return len(self.model.encode(self.model.render(self._messages(body, 0))))

    @staticmethod
    def _messages(body: str, number: int) -> list[dict[str, str]]:
        return [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Question {number}: {body}"},
        ]

    def messages(self, size: int, number: int) -> list[dict[str, str]]:
        return self._messages(self.bodies[size], number)

    def ids(self, size: int, number: int) -> list[int]:
        return self.model.encode(self.model.render(self.messages(size, number)))


# ------------------------------------------------------------------------------------------- clients


@dataclasses.dataclass(slots=True)
class Sample:
    t0: int  # perf_counter_ns when the request was sent (its preparation done)
    first: int  # when the first content token arrived
    end: int  # when the stream ended
    tokens: int  # completion tokens
    events: int = 0  # SSE events (throughput streams)
    nbytes: int = 0  # body bytes (throughput streams)


# A request function sends request number ``n`` and returns its Sample; it raises on a bad answer.
Call = Callable[[int], Awaitable[Sample]]

_COMPLETION_TOKENS = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')


def http_ttft(session: aiohttp.ClientSession, url: str, model: str, prompts: Prompts, size: int) -> Call:
    """A streamed chat completion; its first token is the first chunk with content."""

    async def call(n: int) -> Sample:
        body = orjson.dumps(
            {
                "model": model,
                "messages": prompts.messages(size, n),
                "max_tokens": TTFT_MAX_TOKENS,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        )
        first = 0
        done = False
        tokens = 0
        t0 = time.perf_counter_ns()
        async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {(await resp.read())[:300]!r}")
            async for line in resp.content:
                if not line.startswith(b"data: "):
                    continue
                data = line[6:].rstrip()
                if data == b"[DONE]":
                    done = True
                    continue
                if not first or b'"usage":{' in data:
                    chunk = orjson.loads(data)
                    choices = chunk.get("choices")
                    if not first and choices and (choices[0].get("delta") or {}).get("content"):
                        first = time.perf_counter_ns()
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
        end = time.perf_counter_ns()
        if not first or not done:
            raise RuntimeError("stream ended without content or without [DONE]")
        return Sample(t0, first, end, tokens)

    return call


def http_throughput(session: aiohttp.ClientSession, url: str, model: str) -> Call:
    """A streamed chat completion of STREAM_TOKENS tokens, read in bulk: only the usage is parsed."""

    async def call(n: int) -> Sample:
        body = orjson.dumps(
            {
                "model": model,
                "messages": [
                    {"role": "system", "content": SYSTEM},
                    {"role": "user", "content": f"Question {n}: please tell me a long story about Paris."},
                ],
                "max_tokens": STREAM_TOKENS,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        )
        tail = b""
        events = nbytes = 0
        t0 = time.perf_counter_ns()
        first = 0
        async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {(await resp.read())[:300]!r}")
            async for data in resp.content.iter_any():
                if not first:
                    first = time.perf_counter_ns()
                tail = (tail + data)[-4096:]
                nbytes += len(data)
                events += data.count(b"data: ")
        end = time.perf_counter_ns()
        counts = _COMPLETION_TOKENS.findall(tail)
        if not tail.rstrip().endswith(b"data: [DONE]") or not counts:
            raise RuntimeError(f"stream ended without usage or [DONE]: ...{tail[-200:]!r}")
        return Sample(t0, first, end, int(counts[-1]), events, nbytes)

    return call


def grpc_ttft(stub: Any, prompts: Prompts, size: int) -> Call:
    """The engine's Generate, streamed, with the prompt's ids (tokenized before the clock starts)."""

    async def call(n: int) -> Sample:
        request = vpb.GenerateRequest(
            request_id=f"bench-{n}",
            tokenized=vpb.TokenizedInput(input_ids=prompts.ids(size, n)),
            sampling_params=vpb.SamplingParams(max_tokens=TTFT_MAX_TOKENS),
            stream=True,
        )
        first = 0
        tokens = 0
        finished = False
        t0 = time.perf_counter_ns()
        async for response in stub.Generate(request, timeout=REQUEST_TIMEOUT_S):
            kind = response.WhichOneof("response")
            if kind == "chunk":
                if not first and response.chunk.token_ids:
                    first = time.perf_counter_ns()
                tokens += len(response.chunk.token_ids)
            elif kind == "complete":
                finished = True
        end = time.perf_counter_ns()
        if not first or not finished:
            raise RuntimeError("Generate ended without a token or without its Complete")
        return Sample(t0, first, end, tokens)

    return call


# ---------------------------------------------------------------------------------------- measurement


@dataclasses.dataclass
class Block:
    measurement: str  # "ttft/100", "ttft/2000", "ttft/8000", "throughput"
    target: str
    round: int
    concurrency: int
    completed: int
    errors: int
    elapsed_s: float
    ttft_us: list[float]
    total_us: list[float]
    tokens: int
    cpu_s: dict[str, float]
    first_error: str | None = None
    events: int = 0
    nbytes: int = 0


class Bench:
    def __init__(self, settings: Settings, stack: Stack, prompts: Prompts, engine: bool) -> None:
        self.settings = settings
        self.stack = stack
        self.prompts = prompts
        self.engine = engine  # llmgw has its vllm provider
        self.blocks: list[Block] = []
        self.notes: list[str] = []
        self.deadline = time.monotonic() + settings.budget_s
        self.counter = itertools.count(1)
        self.rounds_done: dict[str, int] = {}

    def ttft_targets(self) -> list[str]:
        return [t for t in (*ENGINE_TARGETS, *REST_TARGETS) if self.engine or t != "llmgw"]

    def tp_targets(self) -> list[str]:
        return ["smg", "llmgw"] if self.engine else ["smg"]

    async def measure(self) -> None:
        st = self.stack
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=512, keepalive_timeout=60),
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S),
        )
        channel = grpc.aio.insecure_channel(
            f"127.0.0.1:{st.engine_port}",
            options=[
                ("grpc.max_receive_message_length", 64 << 20),
                ("grpc.max_send_message_length", 64 << 20),
            ],
        )
        try:
            stub = vpb_grpc.VllmEngineStub(channel)
            urls = {
                "smg": (f"http://127.0.0.1:{st.smg_port}/v1/chat/completions", MODEL),
                "llmgw": (f"http://127.0.0.1:{st.proxy_port}/v1/chat/completions", MODEL),
                "rest-direct": (f"http://127.0.0.1:{st.rest_port}/v1/chat/completions", MODEL),
                "rest-llmgw": (f"http://127.0.0.1:{st.proxy_port}/v1/chat/completions", REST_MODEL),
            }
            ttft: dict[int, dict[str, Call]] = {}
            for size in PROMPT_SIZES:
                ttft[size] = {"direct": grpc_ttft(stub, self.prompts, size)}
                for target in self.ttft_targets()[1:]:
                    url, model = urls[target]
                    ttft[size][target] = http_ttft(session, url, model, self.prompts, size)
            tp = {t: http_throughput(session, *urls[t]) for t in self.tp_targets()}

            await self.wait_ready(ttft[PROMPT_SIZES[0]])
            log("warm-up")
            for size in PROMPT_SIZES:
                for fn in ttft[size].values():
                    await self.run(fn, 1, self.settings.warmup, self.settings.block_timeout_s)
            for fn in tp.values():
                await self.run(fn, CONCURRENCY, CONCURRENCY * 2, self.settings.block_timeout_s)

            for round_ in range(self.settings.rounds):
                if time.monotonic() > self.deadline:
                    self.notes.append(
                        f"the time budget ({self.settings.budget_s:g} s) ran out after {round_} of "
                        f"{self.settings.rounds} rounds; the rest were skipped"
                    )
                    break
                log(f"round {round_ + 1}/{self.settings.rounds}")
                for size in PROMPT_SIZES:
                    order = list(ttft[size]) if round_ % 2 == 0 else list(reversed(ttft[size]))
                    for target in order:
                        await self.block(f"ttft/{size}", target, round_, ttft[size][target], 1)
                order = list(tp) if round_ % 2 == 0 else list(reversed(tp))
                for target in order:
                    await self.block("throughput", target, round_, tp[target], CONCURRENCY)
                self.stack.check_alive()
        finally:
            await session.close()
            await channel.close()

    async def wait_ready(self, fns: dict[str, Call]) -> None:
        """Until every target answers (SMG registers its worker and fetches the tokenizer first)."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        for target, fn in fns.items():
            while True:
                try:
                    await fn(next(self.counter))
                    break
                except Exception as exc:
                    self.stack.check_alive()
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"{LABEL[target]} did not answer within {READY_TIMEOUT_S:g} s: {exc}"
                        ) from exc
                    await asyncio.sleep(0.25)
        log("every target answers")

    async def run(
        self, fn: Call, concurrency: int, max_requests: int, max_seconds: float
    ) -> tuple[list[Sample], int, float, str | None]:
        samples: list[Sample] = []
        issued = 0
        errors = 0
        first_error: str | None = None
        start = time.perf_counter()
        deadline = start + max_seconds

        async def worker() -> None:
            nonlocal issued, errors, first_error
            while issued < max_requests and time.perf_counter() < deadline:
                issued += 1
                try:
                    samples.append(await fn(next(self.counter)))
                except Exception as exc:
                    errors += 1
                    if first_error is None:
                        first_error = f"{type(exc).__name__}: {exc}"[:300]

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return samples, errors, time.perf_counter() - start, first_error

    async def block(self, measurement: str, target: str, round_: int, fn: Call, concurrency: int) -> None:
        s = self.settings
        if concurrency == 1:
            max_requests, max_seconds = s.requests, s.block_timeout_s
        else:
            max_requests, max_seconds = 10**9, s.tp_seconds
        before = CpuSnapshot.take(self.stack.pids)
        samples, errors, elapsed, first_error = await self.run(fn, concurrency, max_requests, max_seconds)
        after = CpuSnapshot.take(self.stack.pids)
        self.blocks.append(
            Block(
                measurement=measurement,
                target=target,
                round=round_,
                concurrency=concurrency,
                completed=len(samples),
                errors=errors,
                elapsed_s=elapsed,
                ttft_us=[(x.first - x.t0) / 1000 for x in samples],
                total_us=[(x.end - x.t0) / 1000 for x in samples],
                tokens=sum(x.tokens for x in samples),
                events=sum(x.events for x in samples),
                nbytes=sum(x.nbytes for x in samples),
                cpu_s=after.since(before),
                first_error=first_error,
            )
        )


# ---------------------------------------------------------------------------------------------- results


class Results:
    def __init__(self, blocks: Sequence[Block]) -> None:
        self.blocks = list(blocks)

    def select(self, measurement: str, target: str) -> list[Block]:
        return [b for b in self.blocks if b.measurement == measurement and b.target == target]

    def ttft(self, measurement: str, target: str) -> list[float]:
        return [v for b in self.select(measurement, target) for v in b.ttft_us]

    def rounds(self, measurement: str) -> list[int]:
        return sorted({b.round for b in self.blocks if b.measurement == measurement})

    def round_p50(self, measurement: str, target: str, round_: int) -> float:
        return percentile(
            [v for b in self.select(measurement, target) if b.round == round_ for v in b.ttft_us], 0.5
        )

    def tokens_per_s(self, target: str, round_: int | None = None) -> float:
        blocks = [b for b in self.select("throughput", target) if round_ is None or b.round == round_]
        elapsed = sum(b.elapsed_s for b in blocks)
        return sum(b.tokens for b in blocks) / elapsed if elapsed else float("nan")

    def cpu(self, measurement: str, target: str) -> tuple[dict[str, float], int, int, float]:
        """(CPU seconds per process, streams, tokens, wall seconds) over the blocks of one target."""
        total: dict[str, float] = {}
        streams = tokens = 0
        wall = 0.0
        for b in self.select(measurement, target):
            for name, value in b.cpu_s.items():
                total[name] = total.get(name, 0.0) + value
            streams += b.completed
            tokens += b.tokens
            wall += b.elapsed_s
        return total, streams, tokens, wall

    def errors(self) -> list[str]:
        return [
            f"{b.measurement} {LABEL[b.target]} round {b.round + 1}: {b.errors} failed ({b.first_error})"
            for b in self.blocks
            if b.errors
        ]


def prompt_label(size: int, prompts: Prompts) -> str:
    return f"~{size:,}-token prompt ({prompts.tokens[size]:,})"


def ttft_table(results: Results, bench: Bench) -> tuple[list[str], dict[int, bool | None]]:
    skipped = "skipped" if not bench.engine else None
    out = [
        "| measurement | direct | via SMG | via llmgw | SMG added | llmgw added | llmgw - SMG (per-round range) "
        "| target | met? |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    verdicts: dict[int, bool | None] = {}
    for size in PROMPT_SIZES:
        key = f"ttft/{size}"
        for q in (50, 99):
            direct = percentile(results.ttft(key, "direct"), q / 100)
            smg = percentile(results.ttft(key, "smg"), q / 100)
            gw = percentile(results.ttft(key, "llmgw"), q / 100)
            diff = gw - smg
            cells = [
                f"engine path, TTFT, {prompt_label(size, bench.prompts)}, c=1, p{q}",
                ms(direct),
                ms(smg),
                skipped or ms(gw),
                signed_ms(smg - direct),
                skipped or signed_ms(gw - direct),
            ]
            if q == 50 and not skipped:
                per_round = [
                    results.round_p50(key, "llmgw", r) - results.round_p50(key, "smg", r)
                    for r in results.rounds(key)
                ]
                spread = (
                    f" ({min(per_round) / 1000:+.2f}..{max(per_round) / 1000:+.2f})"
                    if len(per_round) > 1
                    else ""
                )
                ok = diff <= ADDED_TTFT_TARGET_MS * 1000 if diff == diff else None
                verdicts[size] = ok
                cells += [signed_ms(diff) + spread, f"<= +{ADDED_TTFT_TARGET_MS:g} ms", met(ok)]
            elif q == 50:
                verdicts[size] = None
                cells += [skipped or "", f"<= +{ADDED_TTFT_TARGET_MS:g} ms", met(None)]
            else:
                cells += [skipped or signed_ms(diff), "", ""]
            out.append("| " + " | ".join(cells) + " |")
    for size in PROMPT_SIZES:
        key = f"ttft/{size}"
        for q in (50, 99):
            direct = percentile(results.ttft(key, "rest-direct"), q / 100)
            via = percentile(results.ttft(key, "rest-llmgw"), q / 100)
            out.append(
                f"| REST path (vllm-http fake), TTFT, {prompt_label(size, bench.prompts)}, c=1, p{q} | "
                f"{ms(direct)} | | {ms(via)} | | {signed_ms(via - direct)} | | | |"
            )
    return out, verdicts


def throughput_table(results: Results, bench: Bench) -> tuple[list[str], bool | None]:
    skipped = "skipped" if not bench.engine else None
    smg = results.tokens_per_s("smg")
    gw = results.tokens_per_s("llmgw")
    ratio = gw / smg if smg else float("nan")
    per_round = [
        results.tokens_per_s("llmgw", r) / results.tokens_per_s("smg", r)
        for r in results.rounds("throughput")
        if results.select("throughput", "llmgw") and results.tokens_per_s("smg", r)
    ]
    spread = f" ({min(per_round):.2f}..{max(per_round):.2f})" if len(per_round) > 1 else ""
    ok = None if skipped or ratio != ratio else ratio >= THROUGHPUT_TARGET
    rows = []
    for target in ("smg", "llmgw"):
        blocks = results.select("throughput", target)
        wall = sum(b.elapsed_s for b in blocks)
        streams = sum(b.completed for b in blocks) / wall if wall else float("nan")
        first = percentile([v for b in blocks for v in b.ttft_us], 0.5)
        done = sum(b.completed for b in blocks)
        events = f"{sum(b.events for b in blocks) / done:.0f}" if done else "n/a"
        nbytes = f"{sum(b.nbytes for b in blocks) / done:,.0f}" if done else "n/a"
        rows.append((f"{streams:,.1f}", ms(first), events, nbytes))
    if skipped:
        rows[1] = (skipped,) * 4
    tokens_cell = skipped or f"{gw:,.0f}"
    ratio_cell = skipped or f"{ratio:.2f}{spread}"
    out = [
        "| measurement | via SMG | via llmgw | llmgw / SMG (per-round range) | target | met? |",
        "|---|---|---|---|---|---|",
        f"| streamed tokens/s, c={CONCURRENCY}, {STREAM_TOKENS}-token answers | {smg:,.0f} | {tokens_cell} | "
        f"{ratio_cell} | >= {THROUGHPUT_TARGET:g} | {met(ok)} |",
        f"| streams/s, c={CONCURRENCY} | {rows[0][0]} | {rows[1][0]} | | | |",
        f"| first bytes of the answer, c={CONCURRENCY}, p50 | {rows[0][1]} | {rows[1][1]} | | | |",
        f"| SSE events per stream | {rows[0][2]} | {rows[1][2]} | | | |",
        f"| bytes per stream | {rows[0][3]} | {rows[1][3]} | | | |",
    ]
    return out, ok


def cpu_tables(results: Results, bench: Bench) -> list[str]:
    out = [
        f"CPU per stream and per streamed token, c={CONCURRENCY}, {STREAM_TOKENS}-token answers:",
        "",
        "| process | via SMG: per stream | via SMG: per token | via llmgw: per stream | via llmgw: per token |",
        "|---|---|---|---|---|",
    ]
    per: dict[str, tuple[dict[str, float], int, int, float]] = {
        t: results.cpu("throughput", t) for t in ("smg", "llmgw")
    }

    router = {"smg": "SMG", "llmgw": "llmgw proxy"}

    def cells(target: str, name: str) -> str:
        total, streams, tokens, _ = per[target]
        if target == "llmgw" and not bench.engine:
            return "skipped | skipped"
        names = (
            (router[target], "fake engine", LOADGEN)
            if name == "all"
            else ({"router": router[target]}.get(name, name),)
        )
        if not streams or not tokens or any(n not in total for n in names):
            return "n/a | n/a"
        value = sum(total[n] for n in names)
        return f"{value / streams * 1000:.2f} ms | {value / tokens * 1e6:.1f} µs"

    for name, label in (
        ("router", "the router (SMG / llmgw proxy)"),
        ("fake engine", "fake engine"),
        (LOADGEN, "load generator"),
        ("all", "all three"),
    ):
        out.append(f"| {label} | {cells('smg', name)} | {cells('llmgw', name)} |")
    out += [
        "",
        f"CPU per request at concurrency 1 (streams of {TTFT_MAX_TOKENS} tokens), by prompt size:",
        "",
        "| target | process | " + " | ".join(f"~{s:,} tokens" for s in PROMPT_SIZES) + " |",
        "|---|---|" + "---|" * len(PROMPT_SIZES),
    ]
    for target in (*ENGINE_TARGETS, *REST_TARGETS):
        for name in PROCESSES[target]:
            row = []
            for size in PROMPT_SIZES:
                total, streams, _, _ = results.cpu(f"ttft/{size}", target)
                if target == "llmgw" and not bench.engine:
                    row.append("skipped")
                elif not streams or name not in total:
                    row.append("n/a")
                else:
                    row.append(f"{total[name] / streams * 1000:.2f} ms")
            out.append(f"| {LABEL[target]} | {name} | " + " | ".join(row) + " |")
    return out


def tokenization_ms(prompts: Prompts, repeats: int) -> tuple[dict[int, tuple[float, float]], bool] | None:
    """In this process, once the children are gone: the median time to encode each size's rendered prompt
    (a new one each time) with the ``tokenizers`` package and with llmgw's ``EngineTokenizer`` (its tiktoken
    path when the tokenizer allows it), alternating; and whether that path is in use. None without
    ``llmgw.engine``."""
    try:
        from llmgw.engine import EngineTokenizer
    except ImportError:
        return None
    tokenizer = EngineTokenizer.from_files(prompts.model.files())
    out = {}
    for size in PROMPT_SIZES:
        hf: list[float] = []
        llmgw: list[float] = []
        for i in range(repeats + 2):  # the first two warm up
            text = prompts.model.render(prompts.messages(size, 100_000 + i))
            t0 = time.perf_counter_ns()
            expected = tokenizer.tokenizer.encode(text, add_special_tokens=False).ids
            t1 = time.perf_counter_ns()
            ids = tokenizer.encode(text)
            t2 = time.perf_counter_ns()
            if ids != expected:
                raise AssertionError(f"llmgw's ids differ from tokenizers' on the ~{size}-token prompt")
            if i >= 2:
                hf.append((t1 - t0) / 1e6)
                llmgw.append((t2 - t1) / 1e6)
        out[size] = (percentile(hf, 0.5), percentile(llmgw, 0.5))
    return out, getattr(tokenizer, "_fast_bpe", None) is not None


def tokenization_table(timings: tuple[dict[int, tuple[float, float]], bool] | None) -> list[str]:
    if timings is None:
        return ["Prompt tokenization: skipped (llmgw.engine is not installed).", ""]
    by_size, fast = timings
    out = [
        "Prompt tokenization in one process (the rendered chat prompt, p50; the proxy does this per request):",
        "",
        "| prompt | tokenizers package | llmgw EngineTokenizer"
        + (" (tiktoken path)" if fast else " (no fast path for this tokenizer)")
        + " | ratio |",
        "|---|---|---|---|",
    ]
    for size, (hf, llmgw) in by_size.items():
        out.append(f"| ~{size:,} tokens | {hf:.3f} ms | {llmgw:.3f} ms | {hf / llmgw:.1f}x |")
    return [*out, ""]


def other_load(results: Results) -> float | None:
    """The share of all CPUs that processes other than the bench's used while measuring."""
    busy = ours = wall = 0.0
    for b in results.blocks:
        if "machine" not in b.cpu_s:
            return None
        busy += b.cpu_s["machine"]
        ours += sum(v for k, v in b.cpu_s.items() if k != "machine")
        wall += b.elapsed_s
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(busy - ours, 0.0) / (wall * cpus) if wall else None


def versions() -> dict[str, str]:
    out = {}
    for dist in ("smg", "smg-grpc-proto", "grpcio", "aiohttp", "uvloop", "tokenizers", "tiktoken", "jinja2"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[dist] = importlib.metadata.version(dist)
    return out


def machine_info() -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "loadavg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions(),
    }


def report(
    info: dict[str, Any],
    settings: Settings,
    bench: Bench,
    engine_note: str,
    tokenization: tuple[dict[int, tuple[float, float]], bool] | None,
) -> str:
    results = Results(bench.blocks)
    load = info["loadavg_at_start"]
    end_load = os.getloadavg() if hasattr(os, "getloadavg") else None
    out = [
        "## llmgw's engine provider next to SMG (bench/engine_latency.py)",
        "",
        f"Command: `{command_line()}`",
        "",
        f"Machine: {info['cpu_count']} CPU(s) ({info['cpu_model']}), {info['platform']}; Python {info['python']}; "
        + ", ".join(f"{k} {v}" for k, v in info["versions"].items())
        + "."
        + (f" Load average at start: {load[0]:.2f}" if load else "")
        + (f", at the end: {end_load[0]:.2f}." if end_load else "."),
    ]
    share = other_load(results)
    if share is not None:
        out.append(
            f"Other processes on the machine used {share:.0%} of all CPUs while measuring (from /proc/stat, "
            "minus the bench's own processes)."
        )
    out += [
        "",
        f"Setup: one fake engine (kind vllm, --latency-ms 0, --token-delay-ms {settings.token_delay_ms:g}); SMG "
        "(--backend vllm, --tool-call-parser qwen, --reasoning-parser qwen3) and one llmgw proxy (vllm provider, "
        "toolCallParser hermes, reasoningParser qwen3) in front of it; the vllm-http fake for the REST path. "
        f"{len(results.rounds('throughput')) or settings.rounds} round(s); in each, the targets' blocks alternate "
        f"(the order flips every round). TTFT: {settings.requests} streams per block at c=1, "
        f"max_tokens {TTFT_MAX_TOKENS}, each with a prompt of its own; TTFT = time to the first content token "
        "(direct: the first token id). 'added' = via - direct (direct = the engine's Generate with the ids, or "
        "the vllm-http fake for the REST path). Throughput: "
        f"{settings.tp_seconds:g} s blocks at c={CONCURRENCY}, max_tokens {STREAM_TOKENS}.",
        "",
    ]
    if engine_note:
        out += [f"**Skipped:** {engine_note}.", ""]
    rows, verdicts = ttft_table(results, bench)
    tp_rows, tp_ok = throughput_table(results, bench)
    out += [*rows, "", *tp_rows, "", *cpu_tables(results, bench), "", *tokenization_table(tokenization)]
    out += ["Targets:", ""]
    for size in PROMPT_SIZES:
        out.append(
            f"- llmgw's added TTFT within {ADDED_TTFT_TARGET_MS:g} ms of SMG's, ~{size:,}-token prompt (p50): "
            f"{met(verdicts.get(size))}"
        )
    out.append(
        f"- llmgw's streamed tokens/s at c={CONCURRENCY} at least {THROUGHPUT_TARGET:g}x SMG's: {met(tp_ok)}"
    )
    out.append("")
    out += [f"Note: {note}" for note in bench.notes]
    errors = results.errors()
    if errors:
        out.append(f"Errors ({len(errors)} block(s) had failed requests, left out of the numbers):")
        out += [f"- {e}" for e in errors[:20]]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="tiny counts, a smoke test (numbers are noise)")
    parser.add_argument("--requests", type=int, default=0, help="streams per TTFT block at c=1 (default 40)")
    parser.add_argument("--rounds", type=int, default=0, help="rounds of interleaved blocks (default 4)")
    parser.add_argument(
        "--throughput-seconds", type=float, default=0.0, help=f"one c={CONCURRENCY} block, in s (default 4)"
    )
    parser.add_argument(
        "--budget", type=float, default=0.0, help="time budget of the measurement in s (default 240)"
    )
    parser.add_argument(
        "--token-delay-ms",
        type=float,
        default=0.0,
        help="the fake engine's delay between streamed tokens (default 0: as fast as it can)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the raw results (all samples) as JSON")
    args = parser.parse_args(argv)
    for name in ("requests", "rounds"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be positive")
    if args.token_delay_ms < 0:
        parser.error("--token-delay-ms must not be negative")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Settings.from_args(args)
    info = machine_info()
    signal.signal(signal.SIGTERM, raise_on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    engine, engine_note = llmgw_has_engine_provider()
    if not engine:
        log(f"note: {engine_note}")
    stack = Stack()
    bench: Bench | None = None
    with tempfile.TemporaryDirectory(prefix="llmgw-engine-bench-") as tmp:
        workdir = pathlib.Path(tmp)
        try:
            log("starting the fake engine, the vllm-http fake, SMG and the llmgw proxy")
            start_stack(stack, workdir, settings, engine)  # before this process starts any thread
            prompts = Prompts()
            log("prompts: " + ", ".join(f"~{s}: {prompts.tokens[s]} tokens" for s in PROMPT_SIZES))
            bench = Bench(settings, stack, prompts, engine)
            uvloop.run(bench.measure())
        except KeyboardInterrupt:
            print("interrupted; stopping the child processes", file=sys.stderr)
            return 130
        except Exception:
            for child in stack.children:
                print(f"--- last lines of {child.name}'s output:\n{child.tail()}", file=sys.stderr)
            raise
        finally:
            stack.stop()
    assert bench is not None
    log("tokenizing the prompts in this process")
    tokenization = tokenization_ms(bench.prompts, settings.tokenize_repeats)
    log("done")
    print(report(info, settings, bench, engine_note, tokenization), flush=True)
    if args.json:
        raw = {
            "command": command_line(),
            "machine": info,
            "settings": dataclasses.asdict(settings),
            "llmgw_engine_provider": engine,
            "prompt_tokens": {str(k): v for k, v in bench.prompts.tokens.items()},
            "tokenization_ms": None
            if tokenization is None
            else {str(k): {"tokenizers": hf, "llmgw": ours} for k, (hf, ours) in tokenization[0].items()},
            "notes": bench.notes,
            "child_pids": stack.pids,
            "blocks": [
                {
                    **dataclasses.asdict(b),
                    "ttft_us": [round(v, 1) for v in b.ttft_us],
                    "total_us": [round(v, 1) for v in b.total_us],
                }
                for b in bench.blocks
            ],
        }
        pathlib.Path(args.json).write_text(json.dumps(raw, separators=(",", ":"), default=str))
        log(f"raw results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
