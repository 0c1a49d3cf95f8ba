"""The migration end to end: real everything but the LLM.

A real API server (tests/k8s.py); ``llmgw operator`` as a process; the proxy pods of the Deployment it
writes run by the local kubelet as ``llmgw proxy`` processes with the ConfigMap it renders and the env from
the Secret; fake REST and gRPC providers; a real Prometheus scraping the proxies (file-based discovery of
the pods); a bounded load on 127.0.0.1 through the pods' REST fronts. Two runs: a healthy one reaches 100%
(``Succeeded``); in the other the gRPC provider starts failing at the 25% step and the operator rolls back
to 0% within two analysis intervals. In both, every request the load sent got an answer (fallback).
"""

from __future__ import annotations

import base64
import json
import os
import random
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from k8s import Kubectl, poll
from lightkube import ApiError, Client
from lightkube.resources.core_v1 import Pod
from prometheus import PrometheusServer, Target
from test_local_kubelet import LoopThread

from conftest import LLMGW
from llmgw_dev.fakes import FakeProvider
from llmgw_dev.local_kubelet import LocalKubelet
from llmgw_operator.kube import LLMGateway

# Each test's own waits (pods 60 s, the migration 150 s) must end before pytest's timeout, so that a slow
# run fails with the gateway's status and the operator's log, not a stack dump.
pytestmark = pytest.mark.timeout(300)

INTERVAL_S = 4
OPENAI_KEY, GRPC_KEY = "sk-e2e-openai", "sk-e2e-grpc"


class Load:
    """Chat completions through the ready pods' REST fronts from a few threads, bounded in time and count."""

    def __init__(self, pods: Callable[[], list[str]], workers: int = 4, pause_s: float = 0.08) -> None:
        self.pods, self.pause_s = pods, pause_s
        self.codes: Counter[int | str] = Counter()
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._work, daemon=True) for _ in range(workers)]

    def _work(self, limit_s: float = 240, limit_requests: int = 20_000) -> None:
        deadline = time.monotonic() + limit_s
        body = json.dumps({"model": "demo-model", "messages": [{"role": "user", "content": "hi"}]}).encode()
        while (
            not self.stop.is_set()
            and time.monotonic() < deadline
            and sum(self.codes.values()) < limit_requests
        ):
            ips = self.pods()
            if not ips:
                time.sleep(0.1)
                continue
            request = urllib.request.Request(
                f"http://{random.choice(ips)}:8080/v1/chat/completions",
                body,
                {"content-type": "application/json"},
            )
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    code: int | str = response.status
            except urllib.error.HTTPError as exc:
                code = exc.code
            except OSError as exc:  # a pod going away between listing and sending
                code = type(exc).__name__
            with self.lock:
                self.codes[code] += 1
            time.sleep(self.pause_s)

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def finish(self) -> Counter[int | str]:
        self.stop.set()
        for thread in self.threads:
            thread.join(15)
        return self.codes


class World:
    def __init__(self, kubectl: Kubectl, client: Client, namespace: str, tmp: Path) -> None:
        self.kubectl, self.client, self.namespace, self.tmp = kubectl, client, namespace, tmp
        self.loop = LoopThread()
        self.fakes = {
            "openai": FakeProvider("openai", api_key=OPENAI_KEY),
            "grpc": FakeProvider("grpc", api_key=GRPC_KEY),
        }
        for fake in self.fakes.values():
            self.loop.run(fake.start())
            fake.faults.update({"latency_ms": 5})
        self.kubelet: LocalKubelet | None = None
        self.prometheus: PrometheusServer | None = None
        self.operator: subprocess.Popen[bytes] | None = None

    def gateway(self) -> dict[str, Any]:
        gateway: dict[str, Any] = self.client.get(LLMGateway, "gw", namespace=self.namespace).to_dict()
        return gateway

    def pod_ips(self) -> list[str]:
        # The kubelet's own snapshot, not the API: the load threads call this, and lightkube's decoders
        # must not be first used from two threads at once (msgspec builds them lazily, not thread-safely).
        assert self.kubelet is not None
        return [pod.ip for pod in self.kubelet.pods if pod.ready and pod.ip]

    def diagnose(self) -> str:
        gateways = [g.to_dict() for g in self.client.list(LLMGateway, namespace=self.namespace)]
        status = json.dumps([g.get("status", {}) for g in gateways], indent=1)[-6000:]
        return f"status: {status}\noperator log:\n{(self.tmp / 'operator.log').read_text()[-4000:]}"

    def wait(self, what: str, probe: Callable[[], Any], timeout: float) -> Any:
        return poll(what, probe, timeout, diagnose=self.diagnose)

    def start(self, kubeconfig: Path) -> None:
        self.prometheus = PrometheusServer(prometheus_binary(), self.tmp / "prometheus", [], "1s")
        self.loop.run(self.prometheus.wait_ready())
        self.kubelet = LocalKubelet(
            kubeconfig,
            self.namespace,
            self.tmp / "kubelet",
            node_name=f"e2e-{self.namespace}"[:63],
            llmgw_executable=LLMGW,
        )
        self.loop.run(self.kubelet.start())
        env = {
            **os.environ,
            "KUBECONFIG": str(kubeconfig),
            "LLMGW_NAMESPACES": self.namespace,
            "LLMGW_MIGRATION_TICK_SECONDS": "0.5",
            "LLMGW_PROXY_IMAGE": "llmgw-proxy:e2e",
        }
        with open(self.tmp / "operator.log", "wb") as log:
            self.operator = subprocess.Popen(
                [LLMGW, "operator"], env=env, stdout=log, stderr=subprocess.STDOUT
            )

    def create(self) -> None:
        secret = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "llm-keys"},
            "data": {
                key: base64.b64encode(value.encode()).decode()
                for key, value in (("openai", OPENAI_KEY), ("grpc", GRPC_KEY))
            },
        }
        self.kubectl.apply(secret, self.namespace)
        assert self.prometheus is not None
        gateway = {
            "apiVersion": "llmgateway.io/v1alpha1",
            "kind": "LLMGateway",
            "metadata": {"name": "gw"},
            "spec": {
                "providers": [
                    {
                        "name": "openai",
                        "openai": {"baseURL": self.fakes["openai"].base_url},
                        "apiKeySecretRef": {"name": "llm-keys", "key": "openai"},
                    },
                    {
                        "name": "vllm",
                        "llmgateway": {"target": self.fakes["grpc"].target},
                        "apiKeySecretRef": {"name": "llm-keys", "key": "grpc"},
                    },
                ],
                "routes": [{"model": "demo-model", "rest": "openai", "grpc": "vllm"}],
                "proxy": {"replicas": 2},
                "migration": {
                    "steps": [10, 25, 50, 100],
                    "interval": f"{INTERVAL_S}s",
                    "analysis": {"maxErrorRate": 0.02, "maxP99Latency": "2s", "minRequests": 8},
                    "failureLimit": 1,
                    "progressDeadline": "90s",
                    "prometheus": {"url": self.prometheus.url},
                },
            },
        }
        self.kubectl.apply(gateway, self.namespace)
        ips = self.wait("2 ready proxy pods", lambda: len(ips := self.pod_ips()) == 2 and ips, timeout=60)
        pods = {
            p.to_dict()["status"]["podIP"]: p.to_dict()["metadata"]["name"]
            for p in self.client.list(Pod, namespace=self.namespace)
        }
        labels = {"namespace": self.namespace, "llmgateway_io_gateway": "gw"}
        self.prometheus.set_targets([Target(f"{ip}:9090", {**labels, "pod": pods[ip]}) for ip in ips])

    def close(self) -> None:
        """Stop everything, each step even when an earlier one failed (a leaked Prometheus eats a core)."""
        try:
            if self.operator is not None:
                self.operator.terminate()
                self.operator.wait(30)
            self.kubectl(
                "delete", "llmgw,deployments,pods", "--all", "-n", self.namespace, "--wait=false", check=False
            )
            if self.kubelet is not None:
                self.wait(
                    "the pods to be gone",
                    lambda: not list(self.client.list(Pod, namespace=self.namespace)),
                    timeout=90,
                )
        finally:
            try:
                if self.kubelet is not None:
                    self.loop.run(self.kubelet.stop(), timeout=90)
            finally:
                if self.prometheus is not None:
                    self.prometheus.stop()
                for fake in self.fakes.values():
                    self.loop.run(fake.stop())
                self.loop.close()


_PROMETHEUS: list[str] = []


def prometheus_binary() -> str:
    return _PROMETHEUS[0]


@pytest.fixture
def world(
    kubectl: Kubectl,
    kube_client: Client,
    kubeconfig: Path,
    namespace: str,
    tmp_path: Path,
    prometheus_binary: str,
) -> Iterator[World]:
    _PROMETHEUS[:] = [prometheus_binary]
    environment = World(kubectl, kube_client, namespace, tmp_path)
    try:
        environment.start(kubeconfig)
        yield environment
    finally:
        environment.close()


def migration(world: World) -> dict[str, Any]:
    state: dict[str, Any] = world.gateway().get("status", {}).get("migration", {})
    return state


def events(world: World) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = world.kubectl.json("get", "events", "-n", world.namespace)["items"]
    return sorted(items, key=lambda e: e.get("lastTimestamp") or "")


class WeightLag:
    """How long after the operator writes a new weight every ready proxy serves it (polled every 50 ms)."""

    def __init__(self, world: World) -> None:
        self.world, self.lags = world, []
        # The LLMGateway decoders are built on first use, not thread-safely (see World.pod_ips): first here,
        # before the thread polls the gateway beside the test's own polls.
        world.gateway()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _live(self, weight: int) -> bool:
        for ip in self.world.pod_ips():
            with urllib.request.urlopen(f"http://{ip}:9090/metrics", timeout=5) as response:
                text = response.read().decode()
            if f'llmgw_route_grpc_weight{{route="demo-model"}} {float(weight)}' not in text:
                return False
        return True

    def _run(self) -> None:
        written = 0
        deadline = time.monotonic() + 240
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                weight = int(self.world.gateway().get("status", {}).get("grpcWeight", 0))
            except ApiError:  # the gateway is gone: the test has ended
                return
            if weight != written:
                since, written = time.monotonic(), weight
                while not self._live(weight) and time.monotonic() - since < 30:
                    time.sleep(0.05)
                self.lags.append(time.monotonic() - since)
            time.sleep(0.05)

    def finish(self) -> list[float]:
        self.stop.set()
        self.thread.join(40)
        return self.lags


def test_healthy_migration_reaches_100_percent(world: World) -> None:
    world.create()
    load = Load(world.pod_ips)
    load.start()
    lag = WeightLag(world)
    started = time.monotonic()
    phase = world.wait(
        "a final phase",
        lambda: (
            migration(world).get("phase") in ("Succeeded", "RolledBack", "Failed")
            and migration(world)["phase"]
        ),
        timeout=150,
    )
    took = time.monotonic() - started
    codes = load.finish()
    lags = lag.finish()

    status = world.gateway()["status"]
    assert phase == "Succeeded", f"the migration ended {phase}, not Succeeded\n{world.diagnose()}"
    assert status["grpcWeight"] == 100
    history = status["migration"]["history"]
    assert [(h["weight"], h["result"]) for h in history] == [
        (10, "passed"),
        (25, "passed"),
        (50, "passed"),
        (100, "passed"),
    ]
    assert set(codes) == {200}, f"requests that got no answer: {codes}"
    assert world.fakes["grpc"].stats["requests"] > 0
    reasons = [e["reason"] for e in events(world)]
    for reason in ("MigrationStarted", "WeightLive", "CheckPassed", "StepAdvanced", "Succeeded"):
        assert reason in reasons, reason
    print(
        f"\nhealthy run: 0 -> 100% in {took:.1f}s, {sum(codes.values())} requests, all answered; weight written "
        f"-> served by every proxy: {', '.join(f'{x:.2f}s' for x in lags)} (status read to /metrics, 50 ms polls)"
    )


def test_failing_grpc_provider_rolls_back_within_two_intervals(world: World) -> None:
    world.create()
    load = Load(world.pod_ips)
    load.start()
    world.wait("the 25% step", lambda: migration(world).get("weight") == 25, timeout=90)
    world.fakes["grpc"].faults.update({"error_rate": 1.0, "error_status": 503})
    failing_since = time.monotonic()
    world.wait(
        "phase RolledBack", lambda: migration(world).get("phase") == "RolledBack", timeout=4 * INTERVAL_S + 10
    )
    took = time.monotonic() - failing_since
    time.sleep(2)  # requests keep flowing after the rollback
    codes = load.finish()

    status = world.gateway()["status"]
    assert took <= 2 * INTERVAL_S + 3, f"rolled back {took:.1f}s after the provider began failing"
    assert status["grpcWeight"] == 0 and status["phase"] == "RolledBack"
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert (
        degraded["status"] == "True"
        and "error rate" in degraded["message"]
        and "maxErrorRate" in degraded["message"]
    )
    rolled_back = [e for e in events(world) if e["reason"] == "RolledBack"]
    assert rolled_back and rolled_back[0]["type"] == "Warning"
    assert set(codes) == {200}, f"requests that got no answer: {codes}"
    print(
        f"\nfailing run: rolled back {took:.1f}s after the gRPC provider began failing; {sum(codes.values())} requests, all answered"
    )


def test_abort_then_retry_by_annotation(world: World) -> None:
    world.create()
    load = Load(world.pod_ips)
    load.start()
    world.wait("the 10% step to be live", lambda: migration(world).get("weightLiveAt"), timeout=60)
    world.kubectl("annotate", "-n", world.namespace, "llmgw", "gw", "llmgateway.io/abort=1")
    world.wait("the abort", lambda: migration(world).get("phase") == "RolledBack", timeout=15)
    state = migration(world)
    assert state["weight"] == 0 and state["observedCommands"]["llmgateway.io/abort"] == "1"
    world.kubectl("annotate", "-n", world.namespace, "llmgw", "gw", "llmgateway.io/retry=1")
    world.wait("the retry to start over", lambda: migration(world).get("phase") == "Progressing", timeout=15)
    world.kubectl("annotate", "-n", world.namespace, "llmgw", "gw", "llmgateway.io/promote=1")
    world.wait("the promotion", lambda: migration(world).get("phase") == "Succeeded", timeout=15)
    codes = load.finish()
    assert world.gateway()["status"]["grpcWeight"] == 100
    reasons = {e["reason"] for e in events(world)}
    assert {"Aborted", "Retried", "Promoted"} <= reasons
    assert set(codes) == {200}, f"requests that got no answer: {codes}"
