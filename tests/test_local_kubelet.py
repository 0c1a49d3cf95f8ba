"""The local kubelet: the operator's Deployment runs as ``llmgw proxy`` processes against the real control plane.

The operator is not started: the tests create what it would (Secret, ServiceAccount, ConfigMap, Deployment,
from :mod:`llmgw_operator.manifests`) with kubectl, and the kube-controller-manager's Deployment and
ReplicaSet controllers make the Pods that :class:`LocalKubelet` runs. The kubelet and the fake providers
run on an event loop of their own thread, so the tests may block (kubectl, polling) without stalling them.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import stat
import threading
import time
import urllib.request
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import openai
import pytest
from k8s import Kubectl, poll
from lightkube import Client
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.core_v1 import Pod

from conftest import LLMGW
from llmgw_dev.fakes import FakeProvider
from llmgw_dev.local_kubelet import (
    LocalKubelet,
    LoopbackIPs,
    PodError,
    parse_probe,
    rewrite_arg,
    unsupported,
    write_volume,
)
from llmgw_operator import manifests
from llmgw_operator.spec import with_defaults

T = TypeVar("T")
GATEWAY = "gw"
OPENAI_KEY = "sk-local-kubelet-openai"
GRPC_KEY = "sk-local-kubelet-grpc"


# ------------------------------------------------------------------------------------- no cluster needed


def test_write_volume_is_atomic_and_kubelet_shaped(tmp_path: Path) -> None:
    target = tmp_path / "config"
    assert write_volume(target, {"config.yaml": (b"a: 1\n", 0o644), "sub/x": (b"x", 0o600)})
    assert os.readlink(target / "config.yaml") == "..data/config.yaml"
    assert os.readlink(target / "sub") == "..data/sub"
    first = os.readlink(target / "..data")
    assert first.startswith("..20") and (target / first).is_dir()
    assert (target / "config.yaml").read_text() == "a: 1\n"
    assert stat.S_IMODE((target / "sub" / "x").stat().st_mode) == 0o600
    # The same payload again: nothing is touched.
    assert not write_volume(target, {"config.yaml": (b"a: 1\n", 0o644), "sub/x": (b"x", 0o600)})
    assert os.readlink(target / "..data") == first
    # A change: a new directory behind ..data, the old one and the vanished name are gone.
    assert write_volume(target, {"config.yaml": (b"a: 2\n", 0o644)})
    second = os.readlink(target / "..data")
    assert second != first and not (target / first).exists()
    assert (target / "config.yaml").read_text() == "a: 2\n"
    assert not (target / "sub").exists() and not (target / "sub").is_symlink()
    assert sorted(p.name for p in target.iterdir()) == sorted(["..data", second, "config.yaml"])


def test_rewrite_arg_maps_paths_under_mounts() -> None:
    mounts = {"/etc/llmgw": "/w/volumes/config", "/etc/llmgw/tls": "/w/volumes/tls", "/tmp": "/w/volumes/tmp"}
    assert rewrite_arg("/etc/llmgw/config.yaml", mounts) == "/w/volumes/config/config.yaml"
    assert rewrite_arg("/etc/llmgw/tls/tls.crt", mounts) == "/w/volumes/tls/tls.crt"
    assert rewrite_arg("--config=/etc/llmgw/config.yaml", mounts) == "--config=/w/volumes/config/config.yaml"
    assert rewrite_arg("/etc/llmgwx/config.yaml", mounts) == "/etc/llmgwx/config.yaml"
    assert rewrite_arg("proxy", mounts) == "proxy"
    assert rewrite_arg("/etc/llmgw", mounts) == "/w/volumes/config"


def test_loopback_ips_are_unique_reused_and_skip_taken_ports() -> None:
    import socket

    ips = LoopbackIPs("127.0.1.")
    with socket.socket() as busy:
        busy.bind(("127.0.1.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        first = ips.allocate("a", [port])
        assert first == "127.0.1.2"  # 127.0.1.1 has a listener on the pod's port
    assert ips.allocate("a", [port]) == first  # the same pod keeps its IP
    assert ips.allocate("b", [port]) == "127.0.1.1"
    ips.release("a")
    assert ips.allocate("c", [port]) == "127.0.1.2"
    with pytest.raises(ValueError, match="pod_ip_base"):
        LoopbackIPs("10.0.0.")


def test_unsupported_pods_are_named_and_probes_resolved() -> None:
    spec = with_defaults(gateway_spec("http://127.0.0.1:1/v1", "127.0.0.1:2"))
    deployment = manifests.build_deployment(meta("ns"), spec, "img", "digest")
    pod = {"spec": deployment["spec"]["template"]["spec"]}
    assert unsupported(pod) is None
    container = pod["spec"]["containers"][0]
    probe = parse_probe(container["readinessProbe"], container, "127.0.1.9", 1.0)
    assert probe is not None and probe.url == "http://127.0.1.9:9090/readyz" and probe.period_s == 1.0
    liveness = parse_probe(container["livenessProbe"], container, "127.0.1.9", None)
    assert liveness is not None and liveness.period_s == 10 and liveness.failure_threshold == 3
    with pytest.raises(PodError, match="not a loopback"):
        parse_probe({"httpGet": {"host": "10.0.0.1", "port": 80}}, container, "127.0.1.9", 1.0)
    pod["spec"]["volumes"].append({"name": "x", "projected": {"sources": []}})
    assert "only configMap, secret, emptyDir" in (unsupported(pod) or "")
    pod["spec"]["volumes"].pop()
    container["command"] = ["/bin/sh"]
    assert "command must start with llmgw" in (unsupported(pod) or "")


# ------------------------------------------------------------------------------------------- harness


def meta(namespace: str) -> dict[str, Any]:
    return {"name": GATEWAY, "namespace": namespace, "uid": "00000000-0000-0000-0000-000000000000"}


def gateway_spec(openai_url: str, grpc_target: str, replicas: int = 2) -> dict[str, Any]:
    return {
        "providers": [
            {
                "name": "openai",
                "openai": {"baseURL": openai_url},
                "apiKeySecretRef": {"name": "llm-keys"},
            },
            {
                "name": "vllm",
                "llmgateway": {"target": grpc_target},
                "apiKeySecretRef": {"name": "llm-keys", "key": "grpc-key"},
            },
        ],
        "routes": [{"model": "demo-model", "rest": "openai", "grpc": "vllm"}],
        "proxy": {"replicas": replicas},
    }


def without_owner(manifest: dict[str, Any]) -> dict[str, Any]:
    """No LLMGateway exists here: an ownerReference to a missing owner would let the GC delete the object."""
    manifest["metadata"].pop("ownerReferences", None)
    return manifest


class LoopThread:
    """An event loop on its own thread, for the kubelet and the fakes."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="kubelet-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class Env:
    def __init__(
        self,
        kubectl: Kubectl,
        client: Client,
        namespace: str,
        loop: LoopThread,
        kubelet: LocalKubelet,
        fakes: dict[str, FakeProvider],
    ) -> None:
        self.kubectl, self.client, self.namespace = kubectl, client, namespace
        self.loop, self.kubelet, self.fakes = loop, kubelet, fakes
        self.spec = with_defaults(gateway_spec(fakes["openai"].base_url, fakes["grpc"].target))

    def apply(self, manifest: dict[str, Any]) -> Any:
        return self.kubectl.apply(without_owner(manifest), self.namespace)

    def create_gateway_objects(self, weight: int = 0, generation: int = 1) -> dict[str, Any]:
        """What the operator makes for gateway ``gw`` (Secret first); returns the applied Deployment manifest."""
        secret = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "llm-keys"},
            "data": {
                "api-key": base64.b64encode(OPENAI_KEY.encode()).decode(),
                "grpc-key": base64.b64encode(GRPC_KEY.encode()).decode(),
            },
        }
        version = self.apply(secret)["metadata"]["resourceVersion"]
        self.apply(manifests.build_service_account(meta(self.namespace)))
        self.set_config(weight, generation)
        deployment = manifests.build_deployment(
            meta(self.namespace), self.spec, "llmgw-proxy:test", manifests.secrets_hash({"llm-keys": version})
        )
        return deployment

    def set_config(self, weight: int, generation: int) -> None:
        config = manifests.build_proxy_config(self.spec, weight, generation)
        self.apply(manifests.build_config_map(meta(self.namespace), manifests.render_config(config)))

    def pods(self) -> list[dict[str, Any]]:
        return [p.to_dict() for p in self.client.list(Pod, namespace=self.namespace)]

    def ready_pods(self) -> list[dict[str, Any]]:
        """Pods reporting Ready=True and not being deleted."""
        return [p for p in self.pods() if is_ready(p) and not p["metadata"].get("deletionTimestamp")]

    def deployment(self) -> dict[str, Any]:
        deployment: dict[str, Any] = self.client.get(
            Deployment, manifests.proxy_name(GATEWAY), namespace=self.namespace
        ).to_dict()
        return deployment

    def log_tail(self) -> str:
        out = []
        for pod in self.kubelet.pods:
            if pod.log_path.exists():
                out.append(f"--- {pod.name} ---\n{pod.log_path.read_text()[-1500:]}")
        return "\n".join(out)

    def wait(self, what: str, probe: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05) -> Any:
        def diagnose() -> str:
            pods = "\n".join(
                f"{p['metadata']['name']}: {p.get('status', {}).get('phase')} "
                f"{p.get('status', {}).get('containerStatuses')}"
                for p in self.pods()
            )
            return f"{pods}\n{self.log_tail()}"

        return poll(what, probe, timeout, interval, diagnose)


def is_ready(pod: dict[str, Any]) -> bool:
    conditions = pod.get("status", {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def metrics(ip: str, port: int = 9090) -> str:
    with urllib.request.urlopen(f"http://{ip}:{port}/metrics", timeout=5) as response:
        text: str = response.read().decode()
        return text


def metric(text: str, name: str, labels: str = "") -> float | None:
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


def chat(ip: str, prompt: str = "hello") -> str:
    client = openai.OpenAI(
        base_url=f"http://{ip}:8080/v1", api_key="no-client-auth", max_retries=0, timeout=10
    )
    reply = client.chat.completions.create(model="demo-model", messages=[{"role": "user", "content": prompt}])
    return reply.choices[0].message.content or ""


@pytest.fixture
def env(
    kubectl: Kubectl, kube_client: Client, kubeconfig: Path, namespace: str, tmp_path: Path
) -> Iterator[Env]:
    loop = LoopThread()

    async def start_fakes() -> dict[str, FakeProvider]:
        fakes = {
            "openai": FakeProvider("openai", api_key=OPENAI_KEY),
            "grpc": FakeProvider("grpc", api_key=GRPC_KEY),
        }
        for fake in fakes.values():
            await fake.start()
        return fakes

    fakes = loop.run(start_fakes())
    node = f"llmgw-{namespace}"[:63]
    kubelet = LocalKubelet(
        kubeconfig, namespace, tmp_path / "kubelet", node_name=node, llmgw_executable=LLMGW
    )
    loop.run(kubelet.start())
    environment = Env(kubectl, kube_client, namespace, loop, kubelet, fakes)
    try:
        yield environment
        # Leave nothing running: pods are deleted the way a kubelet finishes them, with it still running.
        kubectl("delete", "deployments,pods", "--all", "-n", namespace, "--wait=false")
        environment.wait("every pod to be gone", lambda: not environment.pods(), timeout=60)
    finally:
        loop.run(kubelet.stop(), timeout=90)

        async def stop_fakes() -> None:
            for fake in fakes.values():
                await fake.stop()

        loop.run(stop_fakes())
        loop.close()
        kubectl("delete", "node", node, "--wait=false", check=False)


def start_deployment(env: Env) -> tuple[list[dict[str, Any]], float]:
    """Create the gateway's objects and wait for 2 Ready pods; the pods and the seconds it took."""
    deployment = env.create_gateway_objects()
    began = time.monotonic()
    env.apply(deployment)
    pods = env.wait("2 Ready pods", lambda: len(env.ready_pods()) == 2 and env.ready_pods(), timeout=60)
    return pods, time.monotonic() - began


# ------------------------------------------------------------------------------------------------ tests


def test_deployment_pods_run_serve_and_hot_reload(env: Env) -> None:
    pods, to_ready = start_deployment(env)
    print(f"\nDeployment create -> 2 Ready pods: {to_ready:.2f}s")
    deployment = env.wait(
        "the Deployment to count 2 ready replicas",
        lambda: env.deployment()["status"].get("readyReplicas") == 2 and env.deployment(),
    )
    assert deployment["status"]["availableReplicas"] == 2

    node = env.kubectl.json("get", "node", env.kubelet.node_name)
    assert {"type": "InternalIP", "address": "127.0.0.1"} in node["status"]["addresses"]
    assert any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"]["conditions"])

    ips = sorted(p["status"]["podIP"] for p in pods)
    assert len(set(ips)) == 2 and all(ip.startswith("127.0.1.") for ip in ips)
    for pod in pods:
        status = pod["status"]
        assert pod["spec"]["nodeName"] == env.kubelet.node_name
        assert status["phase"] == "Running" and status["hostIP"] == "127.0.0.1"
        assert status["podIPs"] == [{"ip": status["podIP"]}]
        (container,) = status["containerStatuses"]
        assert container["ready"] and container["started"] and container["restartCount"] == 0
        assert "startedAt" in container["state"]["running"]
        types = {c["type"]: c["status"] for c in status["conditions"]}
        assert {t: types.get(t) for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")} == {
            "PodScheduled": "True",
            "Initialized": "True",
            "ContainersReady": "True",
            "Ready": "True",
        }

    # The config volume has the kubelet's layout; the Secret reached the process as env only.
    local = {p.name: p for p in env.kubelet.pods}
    some = local[pods[0]["metadata"]["name"]]
    volume = some.directory / "volumes" / "config"
    assert os.readlink(volume / "config.yaml") == "..data/config.yaml"
    assert not any(OPENAI_KEY.encode() in p.read_bytes() for p in some.directory.rglob("*") if p.is_file())
    assert stat.S_IMODE(some.directory.stat().st_mode) == 0o700

    # Real requests through each pod's REST front; the fakes only answer with the Secret's keys.
    for ip in ips:
        assert chat(ip, f"hello {ip}")
    openai_stats = env.fakes["openai"].stats
    assert openai_stats["completed"] == 2 and openai_stats["unauthorized"] == 0

    # Idle: probes keep running, but the pods' status is not rewritten.
    versions = {p["metadata"]["name"]: p["metadata"]["resourceVersion"] for p in env.pods()}
    time.sleep(3)
    assert {p["metadata"]["name"]: p["metadata"]["resourceVersion"] for p in env.pods()} == versions

    # Hot reload: all traffic to gRPC, live in both proxies without a restart.
    began = time.monotonic()
    env.set_config(weight=100, generation=2)

    def live() -> bool:
        for ip in ips:
            text = metrics(ip)
            if metric(text, "llmgw_route_grpc_weight", '{route="demo-model"}') != 100:
                return False
            if metric(text, "llmgw_config_generation") != 2:
                return False
        return True

    env.wait("weight 100 and generation 2 in both proxies", live, timeout=30)
    to_live = time.monotonic() - began
    print(f"ConfigMap edit -> weight live in both proxies: {to_live:.2f}s")
    for ip in ips:
        assert chat(ip, f"grpc {ip}")
    grpc_stats = env.fakes["grpc"].stats
    assert grpc_stats["completed"] == 2 and grpc_stats["unauthorized"] == 0
    assert all(p["status"]["containerStatuses"][0]["restartCount"] == 0 for p in env.pods())
    assert not env.kubelet.terminations


def test_deleted_pod_gets_sigterm_and_a_replacement(env: Env) -> None:
    pods, _ = start_deployment(env)
    victim = pods[0]["metadata"]
    local = next(p for p in env.kubelet.pods if p.uid == victim["uid"])
    assert local.pid is not None
    began = time.monotonic()
    env.kubectl("delete", "pod", victim["name"], "-n", env.namespace, "--wait=false")
    env.wait(
        "the deleted pod to disappear",
        lambda: all(p["metadata"]["uid"] != victim["uid"] for p in env.pods()),
    )
    gone = time.monotonic() - began
    (ended,) = env.kubelet.terminations
    assert (ended.uid, ended.pid, ended.reason) == (victim["uid"], local.pid, "PodDeleted")
    assert ended.signals == ("SIGTERM",) and ended.returncode == 0  # drained and exited on its own
    with pytest.raises(ProcessLookupError):
        os.kill(local.pid, 0)
    kept_log = env.kubelet.workdir / "logs" / f"{victim['name']}_{victim['uid']}.log"
    assert "drained; exiting" in kept_log.read_text()
    assert not local.directory.exists()  # volumes (and anything secret) removed

    replacements = env.wait(
        "a Ready replacement",
        lambda: len(env.ready_pods()) == 2 and env.ready_pods(),
    )
    assert victim["uid"] not in {p["metadata"]["uid"] for p in replacements}
    env.wait("2 ready replicas", lambda: env.deployment()["status"].get("readyReplicas") == 2)
    print(f"\npod delete -> gone from the API: {gone:.2f}s (SIGTERM to exit {ended.seconds:.3f}s)")


def test_rolling_update_never_drops_ready_pods(env: Env) -> None:
    pods, _ = start_deployment(env)
    old = {p["metadata"]["uid"] for p in pods}
    samples: list[int] = []
    done = threading.Event()

    def watch_ready() -> None:
        while not done.is_set():
            samples.append(len(env.ready_pods()))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch_ready, daemon=True)
    watcher.start()
    began = time.monotonic()
    try:
        env.kubectl(
            "patch", "deployment", manifests.proxy_name(GATEWAY), "-n", env.namespace, "--type=merge",
            "-p", '{"spec":{"template":{"metadata":{"annotations":{"test/rollout":"1"}}}}}',
        )  # fmt: skip

        def rolled() -> bool:
            deployment = env.deployment()
            status = deployment["status"]
            return bool(
                status.get("observedGeneration") == deployment["metadata"]["generation"]
                and status.get("updatedReplicas") == 2
                and status.get("readyReplicas") == 2
                and status.get("replicas") == 2
                and len(env.pods()) == 2
            )

        env.wait("the rollout to finish", rolled, timeout=90)
    finally:
        done.set()
        watcher.join(5)
    took = time.monotonic() - began
    new = env.ready_pods()
    assert len(new) == 2 and not old & {p["metadata"]["uid"] for p in new}
    assert all(p["metadata"]["annotations"]["test/rollout"] == "1" for p in new)
    # maxUnavailable 0: never fewer Ready pods than replicas, let alone none.
    assert samples and min(samples) >= 2, samples
    stopped = [t for t in env.kubelet.terminations if t.uid in old]
    assert len(stopped) == 2 and all(t.reason == "PodDeleted" and t.signals == ("SIGTERM",) for t in stopped)
    for pod in new:
        assert chat(pod["status"]["podIP"])
    print(f"\nrolling update of 2 pods: {took:.2f}s, {len(samples)} samples, min Ready {min(samples)}")


def bare_pod(name: str, **container: Any) -> dict[str, Any]:
    """A Pod shaped like the operator's, outside any Deployment."""
    spec = with_defaults(gateway_spec("http://127.0.0.1:1/v1", "127.0.0.1:2"))
    template = manifests.build_deployment(meta("ns"), spec, "llmgw-proxy:test", "digest")["spec"]["template"]
    pod_spec = template["spec"]
    pod_spec.pop("serviceAccountName")
    pod_spec["terminationGracePeriodSeconds"] = 5
    pod_spec["containers"][0].update(container)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": pod_spec}


def test_restarts_after_a_crash_a_failed_liveness_probe_and_a_missing_secret(env: Env) -> None:
    env.set_config(weight=0, generation=1)

    def status(name: str) -> dict[str, Any]:
        pod = next((p for p in env.pods() if p["metadata"]["name"] == name), {})
        container_statuses = pod.get("status", {}).get("containerStatuses") or [{}]
        container: dict[str, Any] = container_statuses[0]
        return container

    # No Secret yet: the container waits with the kubelet's reason, then starts once it exists.
    env.apply(bare_pod("crash"))
    waiting = env.wait(
        "CreateContainerConfigError",
        lambda: (
            status("crash").get("state", {}).get("waiting", {}).get("reason") == "CreateContainerConfigError"
            and status("crash")
        ),
    )
    assert 'secret "llm-keys" not found' in waiting["state"]["waiting"]["message"]
    env.create_gateway_objects()
    env.wait("pod crash Ready", lambda: status("crash").get("ready"))

    # A crash (SIGKILL from outside): restarted with restartCount 1 and lastState showing the signal.
    pid = next(p.pid for p in env.kubelet.pods if p.name == "crash")
    assert pid is not None
    os.kill(pid, 9)
    restarted = env.wait(
        "pod crash restarted and Ready",
        lambda: status("crash").get("restartCount") == 1 and status("crash").get("ready") and status("crash"),
    )
    assert restarted["restartCount"] == 1
    assert restarted["lastState"]["terminated"]["exitCode"] == 137
    assert restarted["lastState"]["terminated"]["signal"] == 9
    crash = next(t for t in env.kubelet.terminations if t.pod == "crash")
    assert crash.reason == "Exited" and crash.returncode == -9 and crash.signals == ()

    # A liveness probe that always fails: SIGTERM, then a restart.
    probe = {"httpGet": {"path": "/nope", "port": "metrics"}, "periodSeconds": 1, "failureThreshold": 2}
    env.apply(bare_pod("unhealthy", livenessProbe=probe))
    env.wait("pod unhealthy restarted", lambda: status("unhealthy").get("restartCount", 0) >= 1, timeout=30)
    killed = next(t for t in env.kubelet.terminations if t.pod == "unhealthy")
    assert killed.reason == "LivenessProbeFailed" and killed.signals == ("SIGTERM",)


def test_stop_ends_processes_gracefully_and_a_restarted_kubelet_adopts_the_pods(env: Env) -> None:
    pods, _ = start_deployment(env)
    uids = {p["metadata"]["uid"] for p in pods}
    env.loop.run(env.kubelet.stop(), timeout=90)
    stopped = list(env.kubelet.terminations)
    assert {t.uid for t in stopped} == uids
    assert all(
        t.reason == "KubeletStopped" and t.signals == ("SIGTERM",) and t.returncode == 0 for t in stopped
    )
    for ended in stopped:
        with pytest.raises(ProcessLookupError):
            os.kill(ended.pid, 0)
    # The pods stay (a node went away), reported as not ready with their container terminated.
    for pod in env.pods():
        assert not is_ready(pod)
        assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 0
    node = env.kubectl.json("get", "node", env.kubelet.node_name)
    assert [c["status"] for c in node["status"]["conditions"] if c["type"] == "Ready"] == ["False"]
    env.wait("the Deployment to see 0 ready", lambda: not env.deployment()["status"].get("readyReplicas"))

    env.loop.run(env.kubelet.start())
    adopted = env.wait("the same 2 pods Ready again", lambda: len(env.ready_pods()) == 2 and env.ready_pods())
    assert {p["metadata"]["uid"] for p in adopted} == uids
    assert all(p["status"]["containerStatuses"][0]["restartCount"] == 1 for p in adopted)
