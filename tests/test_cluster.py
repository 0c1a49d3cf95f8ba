"""The local control plane (llmgw_dev.cluster) is a real cluster: API, RBAC, tokens, controllers, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from k8s import KUBECTL, Kubectl
from lightkube import Client
from lightkube.resources.core_v1 import Namespace

from llmgw_dev import k8s_build
from llmgw_dev.cluster import ControlPlane

LLMGW = str(Path(sys.executable).parent / "llmgw")


def eventually(check: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll ``check`` until it returns something truthy; controllers act asynchronously."""
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, f"{what} not met within {timeout}s"
        time.sleep(0.2)
    return result


def test_server_version(control_plane: ControlPlane, kubectl: Kubectl) -> None:
    version = kubectl.json("version")["serverVersion"]["gitVersion"]
    assert control_plane.binaries is not None
    if control_plane.binaries.source == "cache":  # $LLMGW_K8S_BIN may hold any release
        assert version == k8s_build.KUBERNETES_VERSION


def test_configmap_create_get_delete(kubectl: Kubectl, namespace: str) -> None:
    kubectl("create", "configmap", "settings", "-n", namespace, "--from-literal=model=demo")
    assert kubectl.json("get", "configmap", "settings", "-n", namespace)["data"] == {"model": "demo"}
    kubectl("delete", "configmap", "settings", "-n", namespace)
    gone = kubectl("get", "configmap", "settings", "-n", namespace, check=False)
    assert gone.returncode != 0 and "NotFound" in gone.stderr


def test_rbac_governs_service_account_tokens(
    kubectl: Kubectl, kubeconfig: Path, namespace: str, tmp_path: Path
) -> None:
    kubectl("create", "serviceaccount", "reader", "-n", namespace)
    token = kubectl("create", "token", "reader", "-n", namespace).stdout.strip()
    # Same cluster, but authenticated only by the token (the admin kubeconfig's client cert would win).
    config = yaml.safe_load(kubeconfig.read_text())
    config["users"] = [{"name": config["users"][0]["name"], "user": {"token": token}}]
    reader_kubeconfig = tmp_path / "reader.kubeconfig"
    reader_kubeconfig.write_text(yaml.safe_dump(config))
    as_reader = Kubectl(reader_kubeconfig)

    denied = as_reader("get", "secrets", "-n", namespace, check=False)
    assert denied.returncode != 0
    assert f"system:serviceaccount:{namespace}:reader" in denied.stderr and "forbidden" in denied.stderr

    kubectl("create", "role", "secret-reader", "--verb=get,list", "--resource=secrets", "-n", namespace)
    kubectl(
        "create", "rolebinding", "reader", "--role=secret-reader", f"--serviceaccount={namespace}:reader",
        "-n", namespace,
    )  # fmt: skip
    # The authorizer reads RBAC objects from an informer cache: allow it a moment to see the binding.
    eventually(
        lambda: as_reader("get", "secrets", "-n", namespace, check=False).returncode == 0, 10, "access"
    )
    still_denied = as_reader("get", "configmaps", "-n", namespace, check=False)
    assert still_denied.returncode != 0 and "forbidden" in still_denied.stderr


def test_garbage_collector_deletes_dependents(kubectl: Kubectl, namespace: str) -> None:
    owner = kubectl.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "owner"}}, namespace)
    owner_ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner["metadata"]["uid"]}
    kubectl.apply(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "dependent", "ownerReferences": [owner_ref]},
        },
        namespace,
    )
    kubectl("delete", "configmap", "owner", "-n", namespace)
    eventually(
        lambda: kubectl("get", "configmap", "dependent", "-n", namespace, check=False).returncode != 0,
        30,
        "dependent ConfigMap deleted",
    )


def test_custom_resource_dependents_are_collected_at_once(kubectl: Kubectl, namespace: str) -> None:
    """The CRDs exist before the garbage collector starts, so it watches custom resources from the start."""
    sample = sorted((Path(__file__).resolve().parent.parent / "crds" / "testdata" / "valid").glob("*.yaml"))[
        0
    ]
    owner = kubectl.apply(yaml.safe_load(sample.read_text()), namespace)
    owner_ref = {key: owner[key] for key in ("apiVersion", "kind")} | {
        "name": owner["metadata"]["name"],
        "uid": owner["metadata"]["uid"],
    }
    kubectl.apply(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "dependent", "ownerReferences": [owner_ref]},
        },
        namespace,
    )
    kubectl("delete", owner["kind"], owner["metadata"]["name"], "-n", namespace)
    # Without the CRD known at startup this takes up to 30 s more: the collector's rediscovery period.
    eventually(
        lambda: kubectl("get", "configmap", "dependent", "-n", namespace, check=False).returncode != 0,
        10,
        "dependent of a custom resource deleted",
    )


def test_deployment_gets_replicaset_and_pods(kubectl: Kubectl, namespace: str) -> None:
    kubectl(
        "create", "deployment", "web", "--image=registry.k8s.io/pause:3.10", "--replicas=2", "-n", namespace
    )
    replicasets = eventually(
        lambda: kubectl.json("get", "replicasets", "-n", namespace)["items"], what="ReplicaSet"
    )
    assert [ref["kind"] for ref in replicasets[0]["metadata"]["ownerReferences"]] == ["Deployment"]
    # No kubelets: the Pods exist but stay Pending.
    pods = eventually(
        lambda: len(items := kubectl.json("get", "pods", "-n", namespace)["items"]) == 2 and items,
        what="2 Pods",
    )
    assert {pod["status"]["phase"] for pod in pods} == {"Pending"}


def test_lightkube_client(kube_client: Client, namespace: str) -> None:
    assert kube_client.get(Namespace, namespace).metadata.name == namespace


def _running(pid: int) -> bool:
    """Alive and not a zombie: a zombie (exited, not reaped by whoever inherited it) has no command line."""
    try:
        return bool(Path(f"/proc/{pid}/cmdline").read_bytes())
    except OSError:
        return False


def _llmgw(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LLMGW, *args], cwd=cwd, capture_output=True, text=True, timeout=90)


def test_cli_up_status_down(k8s_binaries: k8s_build.Binaries, tmp_path: Path) -> None:
    env_kubeconfig = tmp_path / ".llmgw" / "kubeconfig"
    up = _llmgw("cluster", "up", cwd=tmp_path)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"export KUBECONFIG={env_kubeconfig}" in up.stdout
        pids = json.loads((tmp_path / ".llmgw" / "cluster" / "cluster.json").read_text())["pids"]
        assert set(pids) == {"etcd", "kube-apiserver", "kube-controller-manager"}

        status = _llmgw("cluster", "status", cwd=tmp_path)
        assert status.returncode == 0 and "running at https://127.0.0.1:" in status.stdout

        again = _llmgw("cluster", "up", cwd=tmp_path)
        assert again.returncode == 0 and "already running" in again.stdout
        assert json.loads((tmp_path / ".llmgw" / "cluster" / "cluster.json").read_text())["pids"] == pids

        namespaces = subprocess.run(
            [KUBECTL, "get", "namespaces", "-o", "name"],
            env={**os.environ, "KUBECONFIG": str(env_kubeconfig)},
            capture_output=True,
            text=True,
            check=True,
        )
        assert "namespace/default" in namespaces.stdout.split()
    finally:
        down = _llmgw("cluster", "down", cwd=tmp_path)
    assert down.returncode == 0, down.stdout + down.stderr
    for name, pid in pids.items():
        assert not _running(pid), f"{name} (pid {pid}) still running after down"
    assert not (tmp_path / ".llmgw").exists()

    stopped = _llmgw("cluster", "status", cwd=tmp_path)
    assert stopped.returncode != 0 and "not running" in stopped.stdout


@pytest.mark.parametrize("action", ["status", "down"])
def test_cli_without_cluster(action: str, tmp_path: Path) -> None:
    result = _llmgw("cluster", action, cwd=tmp_path)
    assert result.returncode == (1 if action == "status" else 0)
    assert "no control plane" in result.stdout
