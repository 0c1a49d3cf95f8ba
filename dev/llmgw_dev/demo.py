"""``llmgw demo``: the whole product on this machine, in about a minute, leaving nothing behind.

1. A local control plane (etcd, kube-apiserver, kube-controller-manager on 127.0.0.1; built from
   Kubernetes' Go modules on first use, with progress) with the ``LLMGateway`` CRD installed.
2. ``llmgw operator`` as a process; a fake vLLM fleet on loopback, seen two ways: its OpenAI HTTP server
   (the REST path) and its engine gRPC API (the gRPC path, ``vllm.grpc.engine.VllmEngine``: the proxies
   render the chat template, tokenize and detokenize themselves), one model behind both; the local kubelet,
   which runs the proxy pods of the Deployment the operator writes as ``llmgw proxy`` processes.
3. A provider Secret and an ``LLMGateway`` with a migration plan (10, 25, 50, 100% gRPC, a few seconds per
   step); a bounded load through the proxies' OpenAI-compatible REST fronts; the rollout shown live (the
   ``llmgw status --watch`` view) until it succeeds or, with ``--fail-grpc-at N``, until the gRPC provider,
   made to fail once the weight reaches N%, gets the gateway rolled back.
4. A summary: time per step, requests served per path, errors, p50/p99 per path (from the proxies' own
   metrics); then everything it started is stopped and its files removed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Any

import aiohttp
from lightkube import Client, KubeConfig, codecs
from lightkube.resources.core_v1 import Namespace
from prometheus_client.parser import text_string_to_metric_families

from llmgw_dev import k8s_build
from llmgw_dev.cluster import ControlPlane
from llmgw_dev.fakes import FakeProvider
from llmgw_dev.local_kubelet import LocalKubelet
from llmgw_operator import status_view
from llmgw_operator.analysis import quantile_from_buckets
from llmgw_operator.kube import LLMGateway
from llmgw_operator.migration import FINAL_PHASES, parse_time

NAMESPACE = "llmgw-demo"
GATEWAY = "demo"
STEPS = [10, 25, 50, 100]
INTERVAL_S = 5
TIME_LIMIT_S = 300
OPENAI_KEY = (
    "sk-demo-vllm"  # the fleet's OpenAI server takes a key (vllm serve --api-key); its engine API none
)


def _say(text: str = "") -> None:
    print(text, flush=True)


class _Loop:
    """An event loop on a thread of its own: the fakes, the kubelet and the load run there."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="demo-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 120.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def _ready_pod_ips(kubelet: LocalKubelet) -> list[str]:
    # From the kubelet's own snapshot: lightkube's decoders must not be first used from two threads at once.
    return [pod.ip for pod in kubelet.pods if pod.ready and pod.ip]


class _Load:
    """Chat completions through the ready pods' REST fronts: a few workers, bounded in count and time."""

    def __init__(self, client: Client, rate_per_s: float = 40.0, workers: int = 4) -> None:
        self.client, self.pause = client, workers / rate_per_s
        self.workers = workers
        self.codes: Counter[str] = Counter()
        self.stop = asyncio.Event()
        self.ips: list[str] = []

    async def run(self) -> None:
        deadline = time.monotonic() + TIME_LIMIT_S
        body = {"model": "demo-model", "messages": [{"role": "user", "content": "Say hello"}]}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:

            async def worker() -> None:
                while (
                    not self.stop.is_set()
                    and time.monotonic() < deadline
                    and sum(self.codes.values()) < 50_000
                ):
                    if not self.ips:
                        await asyncio.sleep(0.2)
                        continue
                    url = f"http://{random.choice(self.ips)}:8080/v1/chat/completions"
                    try:
                        async with session.post(url, json=body) as response:
                            await response.read()
                            self.codes[str(response.status)] += 1
                    except (aiohttp.ClientError, TimeoutError) as exc:
                        self.codes[type(exc).__name__] += 1
                    await asyncio.sleep(self.pause)

            await asyncio.gather(*(worker() for _ in range(self.workers)))


def _gateway(http: FakeProvider, engine: FakeProvider) -> dict[str, Any]:
    return {
        "apiVersion": "llmgateway.io/v1alpha1",
        "kind": "LLMGateway",
        "metadata": {"name": GATEWAY, "namespace": NAMESPACE},
        "spec": {
            "providers": [
                {
                    "name": "vllm-http",
                    "openai": {"baseURL": http.base_url},
                    "apiKeySecretRef": {"name": "llm-keys", "key": "vllm"},
                },
                {
                    "name": "vllm-engine",
                    "vllm": {"target": engine.target, "toolCallParser": "hermes", "reasoningParser": "qwen3"},
                },
            ],
            "routes": [{"model": "demo-model", "rest": "vllm-http", "grpc": "vllm-engine"}],
            "proxy": {"replicas": 2},
            "migration": {
                "steps": STEPS,
                "interval": f"{INTERVAL_S}s",
                "analysis": {"maxErrorRate": 0.02, "maxP99Latency": "2s", "minRequests": 10},
                "failureLimit": 1,
                "progressDeadline": "2m",
            },
        },
    }


def _path_figures(ips: list[str]) -> dict[str, dict[str, float]]:
    """Requests, server errors and p50/p99 per upstream path, summed over the proxies' /metrics."""
    counts: dict[tuple[str, str], float] = {}
    buckets: dict[str, dict[float, float]] = {}
    for ip in ips:
        with urllib.request.urlopen(f"http://{ip}:9090/metrics", timeout=5) as response:
            text = response.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                path = sample.labels.get("path", "")
                if sample.name == "llmgw_upstream_requests_total":
                    key = (path, "errors" if sample.labels["code"].startswith("5") else "ok")
                    counts[key] = counts.get(key, 0.0) + sample.value
                elif sample.name == "gen_ai_server_request_duration_seconds_bucket":
                    by_bound = buckets.setdefault(path, {})
                    bound = float(sample.labels["le"])
                    by_bound[bound] = by_bound.get(bound, 0.0) + sample.value
    figures = {}
    for path in ("rest", "grpc"):
        series = sorted(buckets.get(path, {}).items())
        figures[path] = {
            "requests": counts.get((path, "ok"), 0.0) + counts.get((path, "errors"), 0.0),
            "errors": counts.get((path, "errors"), 0.0),
            "p50": quantile_from_buckets(0.5, series) or 0.0,
            "p99": quantile_from_buckets(0.99, series) or 0.0,
        }
    return figures


def _summary(
    gateway: dict[str, Any], codes: Counter[str], figures: dict[str, dict[str, float]], took: float
) -> None:
    state = gateway["status"].get("migration", {})
    _say(f"\nMigration {state.get('phase')} in {took:.0f}s: {state.get('message', '')}\n")
    _say("| step | gRPC weight | time in step | result |")
    _say("|---|--:|--:|---|")
    for entry in state.get("history", []):
        started, ended = parse_time(entry["startedAt"]), parse_time(entry["endedAt"])
        seconds = f"{(ended - started).total_seconds():.1f} s" if started and ended else "-"
        _say(f"| {entry['step'] + 1} | {entry['weight']}% | {seconds} | {entry['result']} |")
    _say("\n| upstream path | requests | server errors | p50 | p99 |")
    _say("|---|--:|--:|--:|--:|")
    for path, label in (("rest", "REST (vLLM's OpenAI server)"), ("grpc", "gRPC (the vLLM engine)")):
        f = figures[path]
        _say(
            f"| {label} | {f['requests']:.0f} | {f['errors']:.0f} | {f['p50'] * 1000:.0f} ms | {f['p99'] * 1000:.0f} ms |"
        )
    failed = {code: n for code, n in codes.items() if code != "200"}
    _say(
        f"\nClient requests: {sum(codes.values())}, answered 200: {codes.get('200', 0)}, failed: {failed or 'none'}"
    )


def run(fail_grpc_at: int | None = None) -> int:
    if fail_grpc_at is not None and fail_grpc_at not in STEPS:
        _say(f"demo: --fail-grpc-at must be one of the steps {', '.join(map(str, STEPS))}")
        return 2
    binaries = k8s_build.ensure(_say)
    for noisy in ("llmgw.local_kubelet", "httpx", "httpx2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)  # the live view says what matters
    crd = Path(str(resources.files("llmgw_operator").joinpath("data/crd.yaml")))
    loop = _Loop()
    operator: subprocess.Popen[bytes] | None = None
    kubelet: LocalKubelet | None = None
    fakes: list[FakeProvider] = []
    with tempfile.TemporaryDirectory(prefix="llmgw-demo-") as tmp, contextlib.ExitStack() as stack:
        plane = stack.enter_context(ControlPlane(Path(tmp) / "control-plane", binaries=binaries, crds=[crd]))
        _say(
            f"control plane up in {plane.startup_seconds:.1f}s (kube-apiserver {k8s_build.KUBERNETES_VERSION}, 127.0.0.1)"
        )
        client = Client(KubeConfig.from_file(plane.kubeconfig), field_manager="llmgw-demo")
        try:
            client.create(Namespace(metadata={"name": NAMESPACE}))  # type: ignore[arg-type]
            http = FakeProvider("vllm-http", api_key=OPENAI_KEY)
            engine = FakeProvider("vllm")
            for fake in (http, engine):
                loop.run(fake.start())
                fake.faults.update({"latency_ms": 20, "token_delay_ms": 2})
                fakes.append(fake)
            _say(f"fake vLLM fleet: OpenAI server {http.base_url}, engine gRPC {engine.target}")
            kubelet = LocalKubelet(
                plane.kubeconfig,
                NAMESPACE,
                Path(tmp) / "kubelet",
                llmgw_executable=str(Path(sys.executable).parent / "llmgw"),
            )
            loop.run(kubelet.start())
            env = {
                **os.environ,
                "KUBECONFIG": str(plane.kubeconfig),
                "LLMGW_NAMESPACES": NAMESPACE,
                "LLMGW_MIGRATION_TICK_SECONDS": "0.5",
                "LLMGW_LOG_LEVEL": "warning",
                "LLMGW_PROXY_IMAGE": "llmgw-proxy:demo",
            }
            with open(Path(tmp) / "operator.log", "wb") as log:
                operator = subprocess.Popen(
                    [str(Path(sys.executable).parent / "llmgw"), "operator"],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            secret = {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "llm-keys", "namespace": NAMESPACE},
                "data": {"vllm": base64.b64encode(OPENAI_KEY.encode()).decode()},
            }
            client.create(codecs.from_dict(secret))
            client.create(codecs.from_dict(_gateway(http, engine)))
            _say(f"LLMGateway {NAMESPACE}/{GATEWAY} created: steps {STEPS}, {INTERVAL_S}s per step\n")
            load = _Load(client)
            load_task = asyncio.run_coroutine_threadsafe(load.run(), loop.loop)
            screen = status_view.Screen(in_place=True)
            started = time.monotonic()
            failing = False
            while time.monotonic() - started < TIME_LIMIT_S:
                load.ips = _ready_pod_ips(kubelet)
                gateway = client.get(LLMGateway, GATEWAY, namespace=NAMESPACE).to_dict()
                screen.show(status_view.read(client, NAMESPACE, GATEWAY))
                state = (gateway.get("status") or {}).get("migration") or {}
                if fail_grpc_at is not None and not failing and state.get("weight") == fail_grpc_at:
                    engine.faults.update({"error_rate": 1.0, "error_status": 503})
                    failing = True
                    _say(f"\n>>> the gRPC provider now fails every request (at {fail_grpc_at}%)\n")
                if state.get("phase") in FINAL_PHASES:
                    break
                time.sleep(0.5)
            took = time.monotonic() - started
            time.sleep(1)
            load.stop.set()
            load_task.result(30)
            figures = _path_figures(_ready_pod_ips(kubelet))
            _summary(
                client.get(LLMGateway, GATEWAY, namespace=NAMESPACE).to_dict(), load.codes, figures, took
            )
            phase = (
                (client.get(LLMGateway, GATEWAY, namespace=NAMESPACE).to_dict().get("status") or {})
                .get("migration", {})
                .get("phase")
            )
            expected = "RolledBack" if fail_grpc_at is not None else "Succeeded"
            return 0 if phase == expected else 1
        finally:
            if operator is not None:
                operator.terminate()
                operator.wait(30)
            if kubelet is not None:
                loop.run(kubelet.stop(), timeout=90)  # SIGTERM to every proxy: they drain and exit
            for fake in fakes:
                loop.run(fake.stop())
            loop.close()
            _say("stopped: operator, proxies, fake providers, control plane; files removed")
