"""``llmgw demo``: the gateway working end to end on this machine, in about half a minute.

It starts three fake providers (OpenAI, Anthropic and gRPC) and one proxy from the embedded
``examples/proxy/local.yaml``, all as child processes on 127.0.0.1, shows a REST request through the
OpenAI-compatible front and a live token stream through the gRPC front, sends a bounded load to both
fronts, prints what the proxy's own metrics say about the REST/gRPC split, and stops everything it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from llmgw.client import LLMGrpcClient, LLMHttpClient
from llmgw_common import config as config_mod

DEFAULT_CONFIG = pathlib.Path(__file__).parent / "data" / "local.yaml"  # examples/proxy/local.yaml
_FAKES = (("openai", "openai-fake"), ("anthropic", "anthropic-fake"), ("grpc", "grpc-fake"))
_CONCURRENCY = 8
_TOKEN_DELAY_MS = "25"


def _say(text: str = "") -> None:
    print(text, flush=True)


def _address(provider: config_mod.Provider) -> str:
    settings = provider.settings
    if hasattr(settings, "target"):
        return str(settings.target)
    return str(settings.base_url).split("://", 1)[1].split("/", 1)[0]


def _check_free(address: str) -> None:
    host, port = config_mod.check_listen_address(address, "listen")
    with socket.socket() as sock:
        if sock.connect_ex((host, port)) == 0:
            raise SystemExit(
                f"demo: {address} is already in use; stop what listens there and run the demo again"
            )


def _wait_port(address: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    host, port = config_mod.check_listen_address(address, "listen")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"demo: a child process exited early with code {proc.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"demo: nothing listens on {address} after {timeout:.0f}s")


@contextlib.contextmanager
def _children() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _spawn(args: list[str], procs: list[subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmgw_common.cli", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    procs.append(proc)
    return proc


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


async def _load(call: object, count: int) -> tuple[list[float], int]:
    latencies: list[float] = []
    errors = 0
    queue = iter(range(count))

    async def worker() -> None:
        nonlocal errors
        for _ in queue:
            started = time.perf_counter()
            try:
                await call(model="demo-model", messages=[{"role": "user", "content": "Say hello"}])  # type: ignore[operator]
                latencies.append(time.perf_counter() - started)
            except Exception:
                errors += 1

    await asyncio.gather(*(worker() for _ in range(_CONCURRENCY)))
    return latencies, errors


async def _scenario(cfg: config_mod.ProxyConfig, requests: int) -> None:
    grpc_client = LLMGrpcClient(cfg.listen.grpc, timeout=30)
    rest_client = LLMHttpClient(f"http://{cfg.listen.rest}/v1", timeout=30)
    try:
        _say("\n1) REST front (OpenAI-compatible JSON), model demo-model:")
        reply = await rest_client.chat_completion(
            model="demo-model", messages=[{"role": "user", "content": "What is the gateway?"}]
        )
        _say(f"   {reply.content!r}  [{reply.usage.total_tokens} tokens]")

        _say("\n2) gRPC front, streaming from demo-claude (an Anthropic provider behind the proxy):")
        print("   ", end="", flush=True)
        started = time.perf_counter()
        first = None
        async for chunk in grpc_client.streaming_chat(
            model="demo-claude", messages=[{"role": "user", "content": "Stream me a sentence"}]
        ):
            if first is None:
                first = time.perf_counter() - started
            print(chunk.delta, end="", flush=True)
        _say(
            f"\n   first token after {first * 1000 if first else float('nan'):.1f} ms, "
            f"whole stream {(time.perf_counter() - started) * 1000:.0f} ms"
        )

        route = cfg.route_for("demo-model")
        weight = f"grpcWeight {route.grpc_weight}" if route else "no such route"
        _say(
            f"\n3) Load: {requests} requests on each front, concurrency {_CONCURRENCY}, model demo-model ({weight})"
        )
        results = {
            "REST front": await _load(rest_client.chat_completion, requests),
            "gRPC front": await _load(grpc_client.chat_completion, requests),
        }
        _say("\n   | front      | requests | errors | p50 ms | p99 ms |")
        _say("   |------------|---------:|-------:|-------:|-------:|")
        for name, (latencies, errors) in results.items():
            _say(
                f"   | {name} | {len(latencies) + errors:8d} | {errors:6d} | "
                f"{_percentile(latencies, 0.5) * 1000:6.2f} | {_percentile(latencies, 0.99) * 1000:6.2f} |"
            )
        await _show_split(cfg)
    finally:
        await grpc_client.close()
        await rest_client.close()


async def _show_split(cfg: config_mod.ProxyConfig) -> None:
    async with aiohttp.ClientSession() as session:
        text = await (await session.get(f"http://{cfg.listen.admin}/metrics")).text()
    counts: dict[tuple[str, str, str], float] = {}
    durations: dict[tuple[str, str], tuple[float, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "llmgw_upstream_requests_total":
                key = (labels["route"], labels["path"], labels["code"])
                counts[key] = counts.get(key, 0) + sample.value
            elif sample.name.startswith("gen_ai_server_request_duration_seconds_"):
                key2 = (labels["route"], labels["path"])
                total, n = durations.get(key2, (0.0, 0.0))
                if sample.name.endswith("_sum"):
                    durations[key2] = (total + sample.value, n)
                elif sample.name.endswith("_count"):
                    durations[key2] = (total, n + sample.value)
    _say("\n4) What the proxy's /metrics say about the split (llmgw_upstream_requests_total):")
    _say("   | route       | path | code | upstream requests | mean upstream ms |")
    _say("   |-------------|------|------|------------------:|-----------------:|")
    for (route, path, code), value in sorted(counts.items()):
        total, n = durations.get((route, path), (0.0, 0.0))
        mean = total / n * 1000 if n else float("nan")
        _say(f"   | {route:11} | {path:4} | {code:4} | {value:17.0f} | {mean:16.2f} |")


def run(config_path: str | None, requests: int) -> int:
    requests = max(1, min(requests, 5000))  # a bounded load, whatever was asked
    return _run(config_path or str(DEFAULT_CONFIG), requests)


def _run(config_path: str, requests: int) -> int:
    cfg = config_mod.load(config_path)
    for address in (cfg.listen.grpc, cfg.listen.rest, cfg.listen.admin):
        host, _ = config_mod.check_listen_address(address, "listen")
        if not config_mod.is_loopback(host):
            raise SystemExit(f"demo: {address} is not a loopback address; the demo only binds 127.0.0.1")
        _check_free(address)
    _say("llm-gateway demo: fake providers + proxy on 127.0.0.1 (everything stops at the end)")
    started = time.monotonic()
    with _children() as procs:
        for kind, name in _FAKES:
            provider = cfg.providers.get(name)
            if provider is None:
                continue
            address = _address(provider)
            _check_free(address)
            proc = _spawn(
                ["fake-provider", "--kind", kind, "--listen", address, "--token-delay-ms", _TOKEN_DELAY_MS],
                procs,
            )
            _wait_port(address, proc)
            _say(f"   fake {kind:9} provider on {address}")
        proxy = _spawn(["proxy", "--config", config_path], procs)
        for address in (cfg.listen.grpc, cfg.listen.rest, cfg.listen.admin):
            _wait_port(address, proxy)
        _say(f"   proxy: gRPC {cfg.listen.grpc}, REST {cfg.listen.rest}, admin {cfg.listen.admin}")
        import uvloop

        uvloop.run(_scenario(cfg, requests))
    _say(f"\nDone in {time.monotonic() - started:.1f} s; all child processes stopped.")
    return 0
