#!/usr/bin/env python3
"""How fast the operator turns LLMGateway resources into running objects, what it costs the API server,
and how much memory it needs: measured against a real local control plane.

One run starts its own control plane (etcd, kube-apiserver, kube-controller-manager; see
``llmgw cluster``), one namespace, a provider Secret, and ``llmgw operator`` as a separate process under a
ServiceAccount of its own (so the API server's audit log tells its requests apart). Then:

1. **Latency**: ``--samples`` gateways (default 50), one at a time: create the ``LLMGateway`` (the API
   call ``kubectl apply`` makes) and take the time until a watch sees its Deployment ``ADDED``. p50/p99.
2. **Throughput**: ``--gateways`` more (default 300) created back to back; the time until every one has
   its Deployment and a status for its generation; the operator's API requests in that window, by verb
   (from the audit log); requests per gateway.
3. **Idle**: the operator's requests during ``--idle`` seconds (default 30) with everything converged.
4. The operator process's peak resident memory (VmHWM from /proc) with all gateways loaded.

Usage::

    .venv/bin/python bench/operator_reconcile.py             # ~2-3 minutes on 2 cores
    .venv/bin/python bench/operator_reconcile.py --quick     # 10 + 30 gateways, 5 s idle: a smoke run

Tables go to stdout (markdown), progress to stderr. Everything it starts is stopped at the end.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from lightkube import Client, KubeConfig, codecs
from lightkube.resources.apps_v1 import Deployment

from llmgw_dev import k8s_build
from llmgw_dev.cluster import ControlPlane
from llmgw_operator.kube import LLMGateway

ROOT = Path(__file__).resolve().parent.parent
LLMGW = str(Path(sys.executable).parent / "llmgw")
NAMESPACE = "bench"
ACCOUNT = "llmgw-operator"
WRITE_VERBS = {"create", "update", "patch", "delete", "deletecollection"}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def gateway(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "llmgateway.io/v1alpha1",
        "kind": "LLMGateway",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "providers": [
                {
                    "name": "openai",
                    "openai": {"baseURL": "http://127.0.0.1:18001/v1"},
                    "apiKeySecretRef": {"name": "llm-keys"},
                },
                {"name": "vllm", "llmgateway": {"target": "127.0.0.1:18003"}},
            ],
            "routes": [{"model": "demo-model", "rest": "openai", "grpc": "vllm"}],
        },
    }


class DeploymentWatch:
    """Records when each Deployment of the namespace is first seen (a watch in a thread)."""

    def __init__(self, client: Client) -> None:
        self.seen: dict[str, float] = {}
        self.cond = threading.Condition()
        self._client = client
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                for _, obj in self._client.watch(Deployment, namespace=NAMESPACE):
                    name = obj.metadata.name if obj.metadata else None
                    with self.cond:
                        if name and name not in self.seen:
                            self.seen[name] = time.monotonic()
                            self.cond.notify_all()
            except Exception:  # the watch ends when the control plane stops, or times out: restart it
                time.sleep(0.5)

    def wait(self, name: str, timeout: float = 60) -> float:
        with self.cond:
            if not self.cond.wait_for(lambda: name in self.seen, timeout=timeout):
                raise TimeoutError(f"no Deployment {name} after {timeout}s")
            return self.seen[name]


def operator_requests(plane: ControlPlane, since: str) -> collections.Counter[str]:
    user = f"system:serviceaccount:{NAMESPACE}:{ACCOUNT}"
    return collections.Counter(
        e["verb"]
        for e in plane.audit_events()
        if e["user"]["username"] == user and e["stageTimestamp"] >= since
    )


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def run(samples: int, gateways: int, idle: float) -> None:
    binaries = k8s_build.ensure(log)
    with (
        tempfile.TemporaryDirectory(prefix="llmgw-bench-") as tmp,
        ControlPlane(
            Path(tmp) / "cp", binaries=binaries, crds=sorted((ROOT / "crds").glob("*.yaml"))
        ) as plane,
    ):
        log(f"control plane up in {plane.startup_seconds:.1f}s")
        venv_kubectl = Path(sys.executable).parent / "kubectl"
        kubectl = [
            str(venv_kubectl) if venv_kubectl.exists() else "kubectl",
            "--kubeconfig",
            str(plane.kubeconfig),
        ]

        def k(*args: str) -> str:
            return subprocess.run([*kubectl, *args], check=True, capture_output=True, text=True).stdout

        k("create", "namespace", NAMESPACE)
        k("create", "secret", "generic", "llm-keys", "-n", NAMESPACE, "--from-literal=api-key=sk-bench")
        k("create", "serviceaccount", ACCOUNT, "-n", NAMESPACE)
        k(
            "create",
            "clusterrolebinding",
            "bench-operator",
            "--clusterrole=cluster-admin",
            f"--serviceaccount={NAMESPACE}:{ACCOUNT}",
        )
        token = k("create", "token", ACCOUNT, "-n", NAMESPACE, "--duration=2h").strip()
        operator_kubeconfig = plane.token_kubeconfig(Path(tmp) / "operator.kubeconfig", token)
        env = {
            **os.environ,
            "KUBECONFIG": str(operator_kubeconfig),
            "LLMGW_NAMESPACES": NAMESPACE,
            "LLMGW_LOG_LEVEL": "warning",
        }
        with open(Path(tmp) / "operator.log", "wb") as out:
            operator = subprocess.Popen([LLMGW, "operator"], env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            client = Client(KubeConfig.from_file(plane.kubeconfig), field_manager="bench")
            watch = DeploymentWatch(client)
            time.sleep(2)  # the operator's watches start

            log(f"latency: {samples} gateways, one at a time")
            latencies = []
            for i in range(samples):
                name = f"lat-{i}"
                started = time.monotonic()
                client.create(codecs.from_dict(gateway(name)))
                latencies.append(watch.wait(f"{name}-proxy") - started)

            log(f"throughput: {gateways} gateways back to back")
            since = utc_now()
            time.sleep(1)  # audit timestamps have 1 s resolution at this comparison
            started = time.monotonic()
            for i in range(gateways):
                client.create(codecs.from_dict(gateway(f"bulk-{i}")))
            created = time.monotonic() - started
            for i in range(gateways):
                watch.wait(f"bulk-{i}-proxy", timeout=300)
            deployments_done = time.monotonic() - started
            deadline = time.monotonic() + 300
            while True:
                pending = [
                    g for g in client.list(LLMGateway, namespace=NAMESPACE)
                    if (g.get("status") or {}).get("observedGeneration") != g["metadata"]["generation"]
                ]  # fmt: skip
                if not pending or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            converged = time.monotonic() - started
            time.sleep(2)  # the audit log is flushed in batches
            bulk_calls = operator_requests(plane, since)

            log("settling: until the operator makes no request for 3 s (the Deployment controller finishes)")
            settle_deadline = time.monotonic() + 120
            while time.monotonic() < settle_deadline:
                quiet_since = utc_now()
                time.sleep(4)
                if not operator_requests(plane, quiet_since):
                    break
            log(f"idle: {idle:.0f}s")
            idle_since = utc_now()
            time.sleep(1 + idle)
            idle_calls = operator_requests(plane, idle_since)
            peak = peak_rss_mib(operator.pid)
        finally:
            operator.terminate()
            operator.wait(timeout=30)

    total = samples + gateways
    print(f"\n### Operator: {total} LLMGateways on a local kube-apiserver {k8s_build.KUBERNETES_VERSION}\n")
    print("| measure | value |")
    print("|---|---|")
    print(
        f"| create → Deployment exists, p50 (n={samples}, one at a time) | {statistics.median(latencies) * 1000:.0f} ms |"
    )
    print(f"| create → Deployment exists, p99 | {percentile(latencies, 0.99) * 1000:.0f} ms |")
    print(f"| {gateways} gateways: all created (API calls by the client) | {created:.1f} s |")
    print(
        f"| {gateways} gateways: every Deployment exists | {deployments_done:.1f} s ({gateways / deployments_done:.0f} gateways/s) |"
    )
    print(
        f"| {gateways} gateways: every status up to date{' (NOT ALL)' if pending else ''} | {converged:.1f} s |"
    )
    writes = sum(n for verb, n in bulk_calls.items() if verb in WRITE_VERBS)
    reads = sum(n for verb, n in bulk_calls.items() if verb not in WRITE_VERBS)
    print(
        f"| operator API requests for the {gateways} (reads / writes) | {reads} / {writes} ({(reads + writes) / gateways:.1f} per gateway) |"
    )
    print(f"| by verb | {', '.join(f'{v} {n}' for v, n in sorted(bulk_calls.items()))} |")
    print(
        f"| operator API requests in {idle:.0f} s idle with {total} gateways | {sum(idle_calls.values())} ({', '.join(f'{v} {n}' for v, n in sorted(idle_calls.items())) or 'none'}) |"
    )
    print(f"| operator peak memory (VmHWM) with {total} gateways | {peak:.0f} MiB |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--samples", type=int, default=50, help="gateways for the latency measurement")
    parser.add_argument("--gateways", type=int, default=300, help="gateways for the throughput measurement")
    parser.add_argument("--idle", type=float, default=30.0, help="seconds of idle observation")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 10 + 30 gateways, 5 s idle")
    args = parser.parse_args()
    if args.quick:
        args.samples, args.gateways, args.idle = 10, 30, 5.0
    run(args.samples, args.gateways, args.idle)


if __name__ == "__main__":
    main()
