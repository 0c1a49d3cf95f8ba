"""The operator against a real API server: create, update, delete, Secrets, self-healing, idleness, restarts.

Each test runs ``llmgw operator`` as a process watching only the test's namespace, as a user would run it.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from k8s import Kubectl, poll

from conftest import LLMGW
from llmgw_dev.cluster import ControlPlane

OPERATOR_ACCOUNT = "llmgw-operator"


class Operator:
    """``llmgw operator`` in a child process, logging to a file."""

    def __init__(self, kubeconfig: Path, namespace: str, log_path: Path, resync_seconds: float = 300) -> None:
        self.env = {
            **os.environ,
            "KUBECONFIG": str(kubeconfig),
            "LLMGW_NAMESPACES": namespace,
            "LLMGW_RESYNC_SECONDS": str(resync_seconds),
            "LLMGW_PROXY_IMAGE": "llmgw-proxy:test",
            "LLMGW_LOG_LEVEL": "debug",
        }
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [LLMGW, "operator"], env=self.env, stdout=log, stderr=subprocess.STDOUT
            )

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def operator(
    control_plane: ControlPlane, kubectl: Kubectl, namespace: str, tmp_path: Path
) -> Iterator[Operator]:
    """The operator, under a ServiceAccount of its own, so the audit log tells its requests apart.
    (Bound to cluster-admin here; the Helm chart's least-privilege RBAC is tested with the chart.)"""
    kubectl("create", "serviceaccount", "-n", namespace, OPERATOR_ACCOUNT)
    kubectl(
        "create", "clusterrolebinding", f"{namespace}-operator",
        "--clusterrole=cluster-admin", f"--serviceaccount={namespace}:{OPERATOR_ACCOUNT}",
    )  # fmt: skip
    token = kubectl("create", "token", "-n", namespace, OPERATOR_ACCOUNT, "--duration=1h").stdout.strip()
    op = Operator(
        control_plane.token_kubeconfig(tmp_path / "operator.kubeconfig", token),
        namespace,
        tmp_path / "operator.log",
    )
    op.start()
    yield op
    op.stop()
    kubectl("delete", "clusterrolebinding", f"{namespace}-operator")


def wait_for(
    what: str, probe: Callable[[], Any], timeout: float = 30.0, operator: Operator | None = None
) -> Any:
    """``poll`` with the operator's log tail in the failure message."""
    return poll(
        what,
        probe,
        timeout,
        diagnose=lambda: f"--- operator log ---\n{operator.log()[-3000:] if operator else ''}",
    )


def get(kubectl: Kubectl, namespace: str, kind: str, name: str) -> dict[str, Any] | None:
    proc = kubectl("get", "-n", namespace, kind, name, "-o", "json", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def gateway(name: str = "gw", replicas: int = 2, secret: str = "llm-keys", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "llmgateway.io/v1alpha1",
        "kind": "LLMGateway",
        "metadata": {"name": name},
        "spec": {
            "providers": [
                {
                    "name": "openai",
                    "openai": {"baseURL": "http://127.0.0.1:18001/v1"},
                    "apiKeySecretRef": {"name": secret},
                },
                {"name": "vllm", "llmgateway": {"target": "127.0.0.1:18003"}},
            ],
            "routes": [{"model": "demo-model", "rest": "openai", "grpc": "vllm"}],
            "proxy": {"replicas": replicas},
            **spec,
        },
    }


def secret(name: str = "llm-keys", value: str = "sk-test-123", key: str = "api-key") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name},
        "data": {key: base64.b64encode(value.encode()).decode()},
    }


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions", []) if c["type"] == type_), {})


def events(kubectl: Kubectl, namespace: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = kubectl.json("get", "events", "-n", namespace)["items"]
    return items


def test_create_update_delete_round_trip(operator: Operator, kubectl: Kubectl, namespace: str) -> None:
    kubectl.apply(secret(), namespace)
    created = kubectl.apply(gateway(), namespace)
    uid = created["metadata"]["uid"]

    deployment = wait_for(
        "the proxy Deployment", lambda: get(kubectl, namespace, "deployment", "gw-proxy"), operator=operator
    )
    for kind, name in [
        ("configmap", "gw-config"),
        ("serviceaccount", "gw-proxy"),
        ("service", "gw"),
        ("pdb", "gw-proxy"),
    ]:
        obj = wait_for(
            f"{kind} {name}", lambda k=kind, n=name: get(kubectl, namespace, k, n), operator=operator
        )
        assert obj["metadata"]["ownerReferences"][0]["uid"] == uid, kind
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "llmgw-proxy:test"
    env = {e["name"]: e for e in container["env"]}
    assert env["LLMGW_API_KEY_OPENAI"]["valueFrom"]["secretKeyRef"] == {"name": "llm-keys", "key": "api-key"}

    config_map = get(kubectl, namespace, "configmap", "gw-config")
    assert config_map is not None
    assert "sk-test-123" not in json.dumps(config_map)
    service = get(kubectl, namespace, "service", "gw")
    assert service is not None
    assert [p["name"] for p in service["spec"]["ports"]] == ["grpc", "http", "metrics"]

    status = wait_for(
        "status with conditions",
        lambda: (
            (get(kubectl, namespace, "llmgw", "gw") or {}).get("status", {}).get("conditions")
            and get(kubectl, namespace, "llmgw", "gw")["status"]
        ),  # type: ignore[index]
        operator=operator,
    )
    assert status["observedGeneration"] == created["metadata"]["generation"]
    assert status["phase"] == "Pending"  # no kubelet runs the pods here
    assert condition(status, "ConfigValid")["status"] == "True"
    assert condition(status, "SecretsResolved")["status"] == "True"
    assert status["readyReplicasText"] == "0/2"
    assert status["configGeneration"] == 1

    # Update: one replica (the PDB goes away) and another model (the config changes, hot-reloaded).
    updated = gateway(replicas=1)
    updated["spec"]["routes"].append({"model": "gpt-*", "rest": "openai"})
    kubectl.apply(updated, namespace)
    wait_for(
        "the PDB to be deleted", lambda: get(kubectl, namespace, "pdb", "gw-proxy") is None, operator=operator
    )
    wait_for(
        "replicas 1",
        lambda: (
            (get(kubectl, namespace, "deployment", "gw-proxy") or {}).get("spec", {}).get("replicas") == 1
        ),
        operator=operator,
    )
    config_text = wait_for(
        "the new route in the config",
        lambda: (
            "gpt-*"
            in (
                (get(kubectl, namespace, "configmap", "gw-config") or {})
                .get("data", {})
                .get("config.yaml", "")
            )
            and get(kubectl, namespace, "configmap", "gw-config")["data"]["config.yaml"]
        ),  # type: ignore[index]
        operator=operator,
    )
    assert "generation: 2" in config_text
    reasons = {e["reason"] for e in events(kubectl, namespace)}
    assert {"Created", "ConfigUpdated"} <= reasons

    # Delete: the garbage collector removes every child through its owner reference. It learns of a new
    # CRD at its next discovery pass (every 30 s), hence the long wait.
    kubectl("delete", "-n", namespace, "llmgw", "gw")
    for kind, name in [
        ("deployment", "gw-proxy"),
        ("configmap", "gw-config"),
        ("service", "gw"),
        ("serviceaccount", "gw-proxy"),
    ]:
        wait_for(
            f"{kind} {name} to be garbage-collected",
            lambda k=kind, n=name: get(kubectl, namespace, k, n) is None,
            timeout=90,
            operator=operator,
        )
    assert "Traceback" not in operator.log()


def test_missing_secret_then_created(operator: Operator, kubectl: Kubectl, namespace: str) -> None:
    kubectl.apply(gateway(secret="late-keys"), namespace)
    status = wait_for(
        "SecretsResolved=False",
        lambda: (
            condition(
                (get(kubectl, namespace, "llmgw", "gw") or {}).get("status", {}), "SecretsResolved"
            ).get("status")
            == "False"
            and get(kubectl, namespace, "llmgw", "gw")["status"]
        ),  # type: ignore[index]
        operator=operator,
    )
    message = condition(status, "SecretsResolved")["message"]
    assert "late-keys" in message and "openai" in message
    assert status["phase"] == "Degraded"
    warning = [e for e in events(kubectl, namespace) if e["reason"] == "SecretNotFound"]
    assert warning and warning[0]["type"] == "Warning" and "late-keys" in warning[0]["message"]
    assert (
        get(kubectl, namespace, "deployment", "gw-proxy") is None
    )  # never a Deployment whose pods cannot start

    kubectl.apply(secret("late-keys"), namespace)  # the Secret watch notices it at once: no resync needed
    wait_for(
        "the Deployment after the Secret appears",
        lambda: get(kubectl, namespace, "deployment", "gw-proxy"),
        timeout=15,
        operator=operator,
    )
    wait_for(
        "SecretsResolved=True",
        lambda: (
            condition(
                (get(kubectl, namespace, "llmgw", "gw") or {}).get("status", {}), "SecretsResolved"
            ).get("status")
            == "True"
        ),
        timeout=15,
        operator=operator,
    )


def _secrets_hash(kubectl: Kubectl, namespace: str) -> str | None:
    deployment = get(kubectl, namespace, "deployment", "gw-proxy") or {}
    annotations = deployment.get("spec", {}).get("template", {}).get("metadata", {}).get("annotations", {})
    return annotations.get("llmgateway.io/secrets-hash")  # type: ignore[no-any-return]


def test_secret_rotation_rolls_the_proxies(operator: Operator, kubectl: Kubectl, namespace: str) -> None:
    kubectl.apply(secret(), namespace)
    kubectl.apply(gateway(), namespace)
    before = wait_for("the secrets hash", lambda: _secrets_hash(kubectl, namespace), operator=operator)
    kubectl.apply(secret(value="sk-rotated-456"), namespace)
    after = wait_for(
        "a new secrets hash",
        lambda: (h := _secrets_hash(kubectl, namespace)) != before and h,
        timeout=15,
        operator=operator,
    )
    assert after != before
    deployment = get(kubectl, namespace, "deployment", "gw-proxy")
    assert "sk-rotated-456" not in json.dumps(deployment) and "sk-test-123" not in json.dumps(deployment)
    assert "sk-rotated-456" not in operator.log() and "sk-test-123" not in operator.log()


def test_deleted_deployment_is_recreated(operator: Operator, kubectl: Kubectl, namespace: str) -> None:
    kubectl.apply(secret(), namespace)
    kubectl.apply(gateway(), namespace)
    first = wait_for(
        "the Deployment", lambda: get(kubectl, namespace, "deployment", "gw-proxy"), operator=operator
    )
    kubectl("delete", "-n", namespace, "deployment", "gw-proxy", "--wait=true")
    second = wait_for(
        "the Deployment to come back",
        lambda: (
            (d := get(kubectl, namespace, "deployment", "gw-proxy"))
            and d["metadata"]["uid"] != first["metadata"]["uid"]
            and d
        ),
        timeout=15,
        operator=operator,
    )
    assert second["spec"]["template"]["spec"]["containers"][0]["image"] == "llmgw-proxy:test"


def test_operator_restart_converges(operator: Operator, kubectl: Kubectl, namespace: str) -> None:
    kubectl.apply(secret(), namespace)
    kubectl.apply(gateway(), namespace)
    wait_for("the Deployment", lambda: get(kubectl, namespace, "deployment", "gw-proxy"), operator=operator)
    operator.stop(signal.SIGKILL)  # no clean shutdown: nothing may depend on memory
    changed = gateway(replicas=3)
    changed["spec"]["routes"][0]["upstreamModel"] = "served-model"
    kubectl.apply(changed, namespace)
    kubectl("delete", "-n", namespace, "service", "gw")
    operator.start()
    wait_for(
        "replicas 3 after the restart",
        lambda: (
            (get(kubectl, namespace, "deployment", "gw-proxy") or {}).get("spec", {}).get("replicas") == 3
        ),
        operator=operator,
    )
    wait_for("the Service recreated", lambda: get(kubectl, namespace, "service", "gw"), operator=operator)
    wait_for(
        "the config with the new upstream model",
        lambda: (
            "served-model"
            in (get(kubectl, namespace, "configmap", "gw-config") or {})
            .get("data", {})
            .get("config.yaml", "")
        ),
        operator=operator,
    )
    status = wait_for(
        "status for generation 2",
        lambda: (
            (s := (get(kubectl, namespace, "llmgw", "gw") or {}).get("status", {})).get("observedGeneration")
            == 2
            and s
        ),
        operator=operator,
    )
    assert status["replicas"] == 3


def operator_writes(control_plane: ControlPlane, namespace: str, since: str) -> list[str]:
    """Write requests the operator's account made since ``since`` (RFC 3339), from the audit log."""
    user = f"system:serviceaccount:{namespace}:{OPERATOR_ACCOUNT}"
    return [
        f"{e['verb']} {e['objectRef'].get('resource')}/{e['objectRef'].get('name', '')}"
        for e in control_plane.audit_events()
        if e["user"]["username"] == user
        and e["verb"] in ("create", "update", "patch", "delete", "deletecollection")
        and e["stageTimestamp"] >= since
    ]


def test_no_api_writes_while_idle(
    operator: Operator, kubectl: Kubectl, namespace: str, control_plane: ControlPlane
) -> None:
    operator.stop()
    operator.env["LLMGW_RESYNC_SECONDS"] = "5"  # a dozen drift checks during the idle minute
    operator.start()
    kubectl.apply(secret(), namespace)
    kubectl.apply(gateway(), namespace)
    wait_for(
        "the gateway's status",
        lambda: (
            (get(kubectl, namespace, "llmgw", "gw") or {}).get("status", {}).get("observedGeneration") == 1
        ),
        operator=operator,
    )
    time.sleep(3)  # let the last events of the creation settle (the Deployment controller's status updates)
    started = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    assert operator_writes(control_plane, namespace, "0000"), "the audit log shows no operator writes at all"
    time.sleep(60)
    time.sleep(2)  # the audit log is written in batches of at most 1 s
    assert operator_writes(control_plane, namespace, started) == []
    reads = [
        e for e in control_plane.audit_events()
        if e["user"]["username"].endswith(f":{OPERATOR_ACCOUNT}") and e["verb"] == "list" and e["stageTimestamp"] >= started
    ]  # fmt: skip
    assert len(reads) >= 5, "the drift check did not run during the idle minute"


EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples" / "gateways").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_is_accepted_and_reconciled(
    path: Path, operator: Operator, kubectl: Kubectl, namespace: str
) -> None:
    kubectl("apply", "-n", namespace, "-f", str(path))
    name = next(
        d["metadata"]["name"] for d in yaml.safe_load_all(path.read_text()) if d["kind"] == "LLMGateway"
    )
    status = wait_for(
        f"{name}'s status",
        lambda: (
            (s := (get(kubectl, namespace, "llmgw", name) or {}).get("status", {})).get("observedGeneration")
            == 1
            and s
        ),
        operator=operator,
    )
    assert condition(status, "ConfigValid")["status"] == "True", condition(status, "ConfigValid")
    assert condition(status, "SecretsResolved")["status"] == "True", condition(status, "SecretsResolved")
    assert get(kubectl, namespace, "deployment", f"{name}-proxy") is not None
