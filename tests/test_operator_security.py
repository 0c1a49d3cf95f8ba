"""The operator against hostile gateways, on a real API server: it reads Secrets only in the gateway's own
namespace, whatever names a gateway gives, and refuses names that would leave it before any request.

A Secret name went into the API path as it was, and ``..`` segments were normalised away: a gateway naming
``../../victim/secrets/stolen`` made the operator read a Secret of namespace ``victim`` with its own
(cluster-wide) rights, and ``""`` or ``?watch=true`` listed every Secret of the namespace. The CRD now
refuses such names, and :mod:`llmgw_operator.kube` refuses them again before any request; the API server's
audit log shows what the operator's account actually read.
"""

from __future__ import annotations

import base64
import json
import secrets as random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from k8s import Kubectl, poll
from lightkube import AsyncClient, KubeConfig
from test_operator import OPERATOR_ACCOUNT, Operator, condition, gateway, get, operator, secret, wait_for

from llmgw_dev.cluster import ControlPlane
from llmgw_operator.kube import InvalidName, Kube

__all__ = ["operator"]  # the fixture, shared with test_operator

HOSTILE = ["../../victim/secrets/stolen", "", "?watch=true", "..", "x/../../../victim/secrets/stolen"]


@pytest.fixture
def victim(kubectl: Kubectl) -> Iterator[str]:
    """Another tenant's namespace, holding Secrets under the names a gateway of the test's namespace uses."""
    name = f"victim-{random.token_hex(3)}"
    kubectl("create", "namespace", name)
    for secret_name in ("stolen", "llm-keys", "clients", "prom-token"):
        kubectl.apply(secret(secret_name, "victim-value", key="api-key"), name)
    yield name
    kubectl("delete", "namespace", name, "--wait=false")


async def test_kube_refuses_names_that_leave_the_namespace(
    kubeconfig: Path, kubectl: Kubectl, namespace: str, victim: str
) -> None:
    async with AsyncClient(KubeConfig.from_file(kubeconfig)) as client:
        kube = Kube(client)
        for bad in HOSTILE:
            path = bad.replace("victim", victim)
            with pytest.raises(InvalidName, match="not requested"):
                await kube.get("Secret", namespace, path)
            with pytest.raises(InvalidName):
                await kube.get("Secret", path, "stolen")
        assert sum(kube.calls.values()) == 0
        # A good name still reads, and only from the namespace asked.
        assert await kube.get("Secret", namespace, "stolen") is None
        found = await kube.get("Secret", victim, "stolen")
        assert found is not None and found["metadata"]["namespace"] == victim


@pytest.mark.parametrize("bad", HOSTILE, ids=["traversal", "empty", "query", "dotdot", "deep-traversal"])
def test_the_crd_refuses_hostile_secret_names(bad: str, kubectl: Kubectl, namespace: str) -> None:
    for spec_change in (
        {"secret": bad},
        {"proxy": {"tlsSecretName": bad}},
        {"proxy": {"clientAuthSecretRef": {"name": bad}}},
        {"proxy": {"imagePullSecrets": [{"name": bad}]}},
    ):
        manifest = gateway("hostile", **spec_change)
        proc = kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest), check=False)
        assert proc.returncode != 0, f"accepted {spec_change}"
        assert "in body should" in proc.stderr, proc.stderr


def test_the_operator_reads_secrets_only_in_the_gateways_namespace(
    operator: Operator, kubectl: Kubectl, namespace: str, victim: str, control_plane: ControlPlane
) -> None:
    kubectl.apply(secret("llm-keys"), namespace)
    kubectl.apply(secret("clients", "client-key", key="api-keys"), namespace)
    kubectl.apply(secret("prom-token", "token-1", key="token"), namespace)
    tls = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "proxy-tls"},
        "type": "Opaque",
        "data": {k: base64.b64encode(b"x").decode() for k in ("tls.crt", "tls.key")},
    }
    kubectl.apply(tls, namespace)
    started = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    kubectl.apply(
        gateway(
            proxy={"replicas": 1, "clientAuthSecretRef": {"name": "clients"}, "tlsSecretName": "proxy-tls"},
            migration={
                "interval": "1s",
                "prometheus": {"url": "http://127.0.0.1:9", "bearerTokenSecretRef": {"name": "prom-token"}},
            },
        ),
        namespace,
    )
    status = wait_for(
        "the gateway's status",
        lambda: (
            (s := (get(kubectl, namespace, "llmgw", "gw") or {}).get("status", {})).get("observedGeneration")
            == 1
            and s
        ),
        operator=operator,
    )
    assert condition(status, "SecretsResolved")["status"] == "True", status
    assert condition(status, "ConfigValid")["status"] == "True", status
    user = f"system:serviceaccount:{namespace}:{OPERATOR_ACCOUNT}"

    def secret_reads() -> list[dict[str, Any]]:
        return [
            e
            for e in control_plane.audit_events()
            if e["user"]["username"] == user
            and e.get("objectRef", {}).get("resource") == "secrets"
            and e["stageTimestamp"] >= started
        ]

    # The Prometheus token is read when the migration's first tick asks for metrics.
    wait_for(
        "the operator to read the gateway's four Secrets",
        lambda: (
            {e["objectRef"].get("name") for e in secret_reads() if e["verb"] == "get"}
            >= {"llm-keys", "clients", "proxy-tls", "prom-token"}
        ),
        operator=operator,
    )
    time.sleep(2)  # the audit log is written in batches of at most 1 s
    reads = secret_reads()
    elsewhere = [
        f"{e['verb']} {e['requestURI']}" for e in reads if e["objectRef"].get("namespace") != namespace
    ]
    assert not elsewhere, f"the operator touched Secrets outside {namespace}: {elsewhere}"
    lists = [f"{e['verb']} {e['requestURI']}" for e in reads if e["verb"] in ("list", "watch")]
    assert all(f"/namespaces/{namespace}/secrets" in uri for uri in lists), lists
    anywhere_in_victim = [
        e["requestURI"]
        for e in control_plane.audit_events()
        if e["user"]["username"] == user and e.get("objectRef", {}).get("namespace") == victim
    ]
    assert anywhere_in_victim == []


CRD_FILE = Path(__file__).resolve().parent.parent / "crds" / "llmgateways.llmgateway.io.yaml"


@pytest.fixture
def lax_crd(kubectl: Kubectl) -> Iterator[None]:
    """The CRD without the pattern on apiKeySecretRef.name, as a CRD from before the fix had it; restored
    afterwards (and waited for: the API server takes a moment to use a changed schema)."""
    crd = yaml.safe_load(CRD_FILE.read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    name = spec["properties"]["providers"]["items"]["properties"]["apiKeySecretRef"]["properties"]["name"]
    del name["pattern"], name["minLength"]
    kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=json.dumps(crd))
    try:
        yield
    finally:
        kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_FILE))
        probe = json.dumps({**gateway("probe", secret="../x"), "metadata": {"name": "probe"}})
        poll(
            "the CRD's name pattern to be back",
            lambda: kubectl("apply", "--dry-run=server", "-f", "-", input=probe, check=False).returncode != 0,
        )


def test_a_stored_hostile_gateway_reads_nothing_elsewhere(
    lax_crd: None,
    operator: Operator,
    kubectl: Kubectl,
    namespace: str,
    victim: str,
    control_plane: ControlPlane,
) -> None:
    manifest = json.dumps(gateway(secret=f"../../{victim}/secrets/stolen"))
    poll(
        "the lax CRD to store a hostile gateway",
        lambda: kubectl("apply", "-n", namespace, "-f", "-", input=manifest, check=False).returncode == 0,
    )
    wait_for(
        "the operator to refuse the name",
        lambda: "is not a valid Kubernetes name" in operator.log(),
        operator=operator,
    )
    time.sleep(2)  # the audit log is written in batches of at most 1 s
    user = f"system:serviceaccount:{namespace}:{OPERATOR_ACCOUNT}"
    elsewhere = [
        e["requestURI"]
        for e in control_plane.audit_events()
        if e["user"]["username"] == user
        and e.get("objectRef", {}).get("resource") == "secrets"
        and e["objectRef"].get("namespace") != namespace
    ]
    assert elsewhere == []
    assert get(kubectl, namespace, "deployment", "gw-proxy") is None
