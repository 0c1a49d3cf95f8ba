"""Failures the operator can see are on the gateway (issue 14): a Deployment whose ReplicaSet cannot create
pods, a rollout past its progress deadline, names a lax CRD let through, migration commands with no
migration, replicas 0, and a Prometheus that cannot be reached.

Against the real API server with the operator as a process (see ``test_operator``), except the last test,
which runs the reconciler in-process against a Prometheus URL nothing listens on.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from k8s import Kubectl, poll
from test_operator import Operator, condition, events, gateway, get, operator, secret, wait_for

from llmgw_operator import migration
from llmgw_operator.analysis import PrometheusSource
from llmgw_operator.reconcile import Reconciler
from llmgw_operator.settings import Settings

__all__ = ["operator"]  # the fixture, used by name

CRD_FILE = Path(__file__).resolve().parent.parent / "crds" / "llmgateways.llmgateway.io.yaml"


@pytest.fixture
def fast(operator: Operator) -> Operator:
    """The operator with a drift check every 2 s: the Deployment's conditions reach the gateway even where
    no watch event says they changed."""
    operator.stop()
    operator.env["LLMGW_RESYNC_SECONDS"] = "2"
    operator.env["LLMGW_MIGRATION_TICK_SECONDS"] = "1"  # the periodic loop's clock
    operator.start()
    return operator


def status_of(kubectl: Kubectl, namespace: str, name: str = "gw") -> dict[str, Any]:
    status: dict[str, Any] = (get(kubectl, namespace, "llmgw", name) or {}).get("status") or {}
    return status


def degraded(kubectl: Kubectl, namespace: str, reason: str, name: str = "gw") -> dict[str, Any] | None:
    cond = condition(status_of(kubectl, namespace, name), "Degraded")
    return cond if (cond.get("status"), cond.get("reason")) == ("True", reason) else None


def warnings(kubectl: Kubectl, namespace: str, reason: str, name: str = "gw") -> list[dict[str, Any]]:
    return [
        e
        for e in events(kubectl, namespace)
        if e["involvedObject"]["name"] == name and e["reason"] == reason and e["type"] == "Warning"
    ]


def test_a_replica_set_that_cannot_create_pods_is_on_the_gateway(
    fast: Operator, kubectl: Kubectl, namespace: str
) -> None:
    """A LimitRange the proxy pods do not satisfy (a memory limit per pod, which they do not set): the API
    server refuses every pod, the ReplicaSet controller's FailedCreate reaches the Deployment as ReplicaFailure, and
    the gateway says so (Degraded=True, reason ReplicaFailure, with the refusal) in its status and an event."""
    limits = {
        "apiVersion": "v1", "kind": "LimitRange", "metadata": {"name": "big-pods-only"},
        "spec": {"limits": [{"type": "Pod", "max": {"memory": "1Mi"}}]},
    }  # fmt: skip
    kubectl.apply(limits, namespace)
    kubectl.apply(secret(), namespace)
    kubectl.apply(gateway(replicas=1), namespace)
    cond = wait_for(
        "Degraded=True reason ReplicaFailure",
        lambda: degraded(kubectl, namespace, "ReplicaFailure"),
        timeout=45,
        operator=fast,
    )
    assert "Deployment gw-proxy cannot create proxy pods: FailedCreate" in cond["message"], cond
    assert "maximum memory usage per Pod is 1Mi" in cond["message"], cond
    status = status_of(kubectl, namespace)
    assert status["phase"] == "Degraded"
    assert condition(status, "Ready")["reason"] == "ReplicaFailure"
    (event,) = warnings(kubectl, namespace, "ReplicaFailure")
    assert "cannot create proxy pods" in event["message"]
    assert "Traceback" not in fast.log()


def test_a_rollout_past_its_progress_deadline_is_on_the_gateway(
    fast: Operator, kubectl: Kubectl, namespace: str
) -> None:
    """Progressing=False with ProgressDeadlineExceeded (what the Deployment controller sets when pods never
    become ready, e.g. an image that cannot be pulled; written here through the status subresource, as no
    kubelet runs pods) gives Degraded=True, reason RolloutStalled, and an event."""
    kubectl.apply(secret(), namespace)
    kubectl.apply(gateway(replicas=1), namespace)
    deployment = wait_for(
        "the Deployment, seen by its controller",
        lambda: (
            (d := get(kubectl, namespace, "deployment", "gw-proxy"))
            and d.get("status", {}).get("observedGeneration") == d["metadata"]["generation"]
            and d
        ),
        operator=fast,
    )
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    message = 'ReplicaSet "gw-proxy-x" has timed out progressing.'
    stalled = {
        "type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded", "message": message,
        "lastUpdateTime": now, "lastTransitionTime": now,
    }  # fmt: skip
    patch = {"status": {"conditions": [stalled]}}
    kubectl("patch", "-n", namespace, "deployment", "gw-proxy", "--subresource=status", "--type=strategic",
            "-p", json.dumps(patch))  # fmt: skip
    cond = wait_for(
        "Degraded=True reason RolloutStalled",
        lambda: degraded(kubectl, namespace, "RolloutStalled"),
        timeout=30,
        operator=fast,
    )
    assert "exceeded its progress deadline (ProgressDeadlineExceeded)" in cond["message"]
    assert message in cond["message"]
    assert warnings(kubectl, namespace, "RolloutStalled")
    assert deployment["metadata"]["name"] == "gw-proxy"


def test_an_image_that_cannot_be_pulled_is_on_the_gateway(
    fast: Operator, kubectl: Kubectl, namespace: str
) -> None:
    """A proxy container waiting in ImagePullBackOff (what the kubelet reports; written here through the pod's
    status subresource, as no kubelet runs) gives Degraded=True, reason ImagePullFailed, with the kubelet's
    message, long before the Deployment's progress deadline."""
    kubectl.apply(secret(), namespace)
    kubectl.apply(gateway(replicas=1, proxy={"replicas": 1, "image": "llmgw-proxy:nope"}), namespace)
    pod = wait_for(
        "a proxy pod",
        lambda: kubectl.json("get", "pods", "-n", namespace, "-l", "llmgateway.io/gateway=gw")["items"],
        operator=fast,
    )[0]
    waiting = {"reason": "ImagePullBackOff", "message": 'Back-off pulling image "llmgw-proxy:nope"'}
    container = {
        "name": "proxy", "image": "llmgw-proxy:nope", "imageID": "", "ready": False, "restartCount": 0,
        "state": {"waiting": waiting},
    }  # fmt: skip
    kubectl("patch", "-n", namespace, "pod", pod["metadata"]["name"], "--subresource=status", "--type=merge",
            "-p", json.dumps({"status": {"containerStatuses": [container]}}))  # fmt: skip
    cond = wait_for(
        "Degraded=True reason ImagePullFailed",
        lambda: degraded(kubectl, namespace, "ImagePullFailed"),
        timeout=30,
        operator=fast,
    )
    assert cond["message"] == (
        f"proxy pod {pod['metadata']['name']} container proxy cannot run: ImagePullBackOff: "
        'Back-off pulling image "llmgw-proxy:nope"'
    )
    assert warnings(kubectl, namespace, "ImagePullFailed")


@pytest.fixture
def lax_crd(kubectl: Kubectl) -> Iterator[None]:
    """The CRD without the gateway-name rules nor the Secret-name pattern, as a CRD from before them had it;
    restored afterwards (and waited for: the API server takes a moment to use a changed schema)."""
    crd = yaml.safe_load(CRD_FILE.read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    del schema["x-kubernetes-validations"]
    ref = schema["properties"]["spec"]["properties"]["providers"]["items"]["properties"]["apiKeySecretRef"]
    del ref["properties"]["name"]["pattern"]
    kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=json.dumps(crd))
    try:
        yield
    finally:
        kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_FILE))
        probe = json.dumps({**gateway("probe"), "metadata": {"name": "probe.dotted"}})
        poll(
            "the CRD's name rules to be back",
            lambda: kubectl("apply", "--dry-run=server", "-f", "-", input=probe, check=False).returncode != 0,
        )


def test_stored_bad_names_are_config_valid_false_not_retried(
    lax_crd: None, operator: Operator, kubectl: Kubectl, namespace: str
) -> None:
    """Gateways a lax CRD stored with a dotted name, a 64-character name or a Secret name that leaves the
    namespace: each gets ConfigValid=False with reason InvalidName naming the field, a Warning event, no
    child object, and is not retried (one event, one log line)."""
    kubectl.apply(secret(), namespace)
    long_name = "g" * 64
    cases = {
        "dotted.gateway": (gateway("dotted.gateway"), "metadata.name: 'dotted.gateway' has a dot"),
        long_name: (gateway(long_name), f"metadata.name: '{long_name}' has 64 characters"),
        "traversal": (
            gateway("traversal", secret="../../other/secrets/x"),
            "spec.providers[0].apiKeySecretRef.name: '../../other/secrets/x' is not a valid Kubernetes name",
        ),
    }
    for manifest, _ in cases.values():
        text = json.dumps(manifest)
        poll(
            "the lax CRD to store the gateway",
            lambda t=text: kubectl("apply", "-n", namespace, "-f", "-", input=t, check=False).returncode == 0,
        )
    for name, (_, message) in cases.items():
        cond = wait_for(
            f"ConfigValid=False InvalidName on {name[:20]}",
            lambda n=name: (
                condition(status_of(kubectl, namespace, n), "ConfigValid").get("reason") == "InvalidName"
                and condition(status_of(kubectl, namespace, n), "ConfigValid")
            ),
            operator=operator,
        )
        assert cond["status"] == "False" and cond["message"].startswith(message), cond
        assert degraded(kubectl, namespace, "InvalidName", name)
        reported = sorted(
            e["message"].split("=")[0] for e in warnings(kubectl, namespace, "InvalidName", name)
        )
        assert reported == ["ConfigValid", "Degraded"]  # one event per condition
    assert kubectl.json("get", "deployments,configmaps,services", "-n", namespace, "-l",
                        "app.kubernetes.io/managed-by=llmgw-operator")["items"] == []  # fmt: skip
    time.sleep(2)  # no retry: no new event, no new log line
    assert len(warnings(kubectl, namespace, "InvalidName", "traversal")) == 2
    log = operator.log()
    assert log.count("has a dot") == 1 and log.count("is not a valid Kubernetes name") == 1, log[-3000:]
    assert "Traceback" not in log


def test_commands_without_a_migration_and_replicas_zero(
    operator: Operator, kubectl: Kubectl, namespace: str
) -> None:
    kubectl.apply(secret(), namespace)
    manifest = gateway(replicas=0)
    manifest["metadata"]["annotations"] = {"llmgateway.io/promote": "p" * 5000}
    kubectl.apply(manifest, namespace)
    status = wait_for(
        "phase ScaledToZero",
        lambda: (s := status_of(kubectl, namespace)).get("phase") == "ScaledToZero" and s,
        operator=operator,
    )
    ready = condition(status, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "ScaledToZero")
    assert condition(status, "Degraded")["status"] == "False"
    ignored = wait_for(
        "a CommandIgnored event",
        lambda: warnings(kubectl, namespace, "CommandIgnored"),
        operator=operator,
    )
    assert "ignored: spec.migration is not set" in ignored[0]["message"]
    assert len(ignored[0]["message"]) < 600  # the 5000-character value quoted cut
    assert status["ignoredCommands"]["llmgateway.io/promote"].startswith("sha256:")
    # Another pass (a change of the gateway) reports nothing again; a new value is reported once.
    kubectl("label", "-n", namespace, "llmgw", "gw", "touched=1")
    kubectl("annotate", "-n", namespace, "--overwrite", "llmgw", "gw", "llmgateway.io/abort=now")
    wait_for(
        "the abort reported",
        lambda: any(
            "llmgateway.io/abort=now" in e["message"] for e in warnings(kubectl, namespace, "CommandIgnored")
        ),
        operator=operator,
    )
    assert len(warnings(kubectl, namespace, "CommandIgnored")) == 2


# --- Prometheus unreachable: in-process ---------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class _Kube:
    """Just enough of :class:`llmgw_operator.kube.Kube` for a migrating gateway's passes, in memory."""

    def __init__(self, gateway: dict[str, Any], secrets: dict[str, dict[str, Any]]) -> None:
        self.gateway = gateway
        self.objects: dict[tuple[str, str], dict[str, Any]] = {("Secret", k): v for k, v in secrets.items()}
        self.events: list[tuple[str, str, str]] = []

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self.gateway if kind == "LLMGateway" else self.objects.get((kind, name))

    async def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        if manifest["kind"] == "Deployment":  # its controller rolls it out at once
            generation = 1
            manifest = {
                **manifest,
                "metadata": {**manifest["metadata"], "generation": generation},
                "status": {"observedGeneration": generation, "updatedReplicas": 1, "readyReplicas": 1},
            }
        self.objects[(manifest["kind"], manifest["metadata"]["name"])] = manifest
        return manifest

    async def delete(self, kind: str, namespace: str, name: str) -> None:
        self.objects.pop((kind, name), None)

    async def list_pods(self, namespace: str, labels: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            {
                "metadata": {"name": "gw-proxy-1"},
                "status": {"podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]},
            }
        ]

    async def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.gateway = {**self.gateway, "status": status}

    async def event(self, gateway: dict[str, Any], type_: str, reason: str, message: str) -> None:
        self.events.append((type_, reason, message))


async def test_prometheus_unreachable_is_the_checks_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check of a step whose Prometheus cannot be reached is inconclusive with the reason "cannot reach
    Prometheus at URL: error", in lastAnalysis, the migration's message and the CheckInconclusive event,
    never the bearer token."""
    url = f"http://127.0.0.1:{_closed_port()}"
    token = "s3cr3t-token-value"
    manifest = gateway(
        replicas=1,
        migration={
            "steps": [50, 100], "interval": "1s", "progressDeadline": "1h",
            "prometheus": {"url": url, "bearerTokenSecretRef": {"name": "prom"}},
        },
    )  # fmt: skip
    manifest["metadata"].update(namespace="team-a", uid="u1", generation=1)
    secrets = {
        "llm-keys": {"metadata": {"resourceVersion": "1"}, "data": {"api-key": "eA=="}},
        "prom": {"metadata": {"resourceVersion": "2"}, "data": {"token": "czNjcjN0LXRva2VuLXZhbHVl"}},
    }
    kube = _Kube(manifest, secrets)

    async def live(self: PrometheusSource, targets: Any) -> migration.Proxies:
        # The one proxy runs whatever the operator last rendered.
        status = kube.gateway.get("status") or {}
        weight = (status.get("migration") or {}).get("weight", 0)
        return migration.Proxies(1, (weight,), (status.get("configGeneration", 0),))

    monkeypatch.setattr(PrometheusSource, "proxies", live)
    reconciler = Reconciler(kube, Settings())  # type: ignore[arg-type]
    try:
        for _ in range(40):
            await reconciler.sync("team-a", "gw")
            state = (kube.gateway.get("status") or {}).get("migration") or {}
            if state.get("lastAnalysis"):
                break
            await asyncio.sleep(0.2)
    finally:
        await reconciler.close()
    analysis = state["lastAnalysis"]
    assert analysis["verdict"] == "inconclusive", state
    assert analysis["reason"].startswith(f"cannot reach Prometheus at {url}: "), analysis
    assert f"cannot reach Prometheus at {url}" in state["message"]
    (inconclusive,) = [m for _, r, m in kube.events if r == "CheckInconclusive"]
    assert f"cannot reach Prometheus at {url}" in inconclusive
    assert token not in json.dumps(kube.gateway["status"]) + json.dumps(kube.events)
