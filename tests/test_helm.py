"""The Helm chart ``helm/llm-gateway-operator``: lint, render, schema, validation, RBAC on a real API server.

- ``helm lint --strict`` and ``helm template`` over several value sets, each rendered manifest checked for
  what the chart promises, and validated with ``kubernetes-validate --strict`` against Kubernetes 1.36's
  schemas (the prometheus-operator monitors are not core kinds: their shape is asserted here instead);
- bad values refused by ``values.schema.json`` (or the chart's own rules) with a message naming the value;
- the chart's CRD is ``crds/`` as ``hack/sync_chart_crd.py`` wraps it;
- the RBAC is enough and no more: the chart's ServiceAccount and roles are applied to the session's local API
  server (not the Deployment: no kubelet runs it), and ``llmgw operator`` runs as a process with that
  ServiceAccount's token and the Deployment's environment, serving a gateway from a missing Secret to
  converged, with no 403 in its log; ``kubectl auth can-i`` then shows what the account may not do.

``helm`` is no PyPI wheel: unless ``$LLMGW_HELM`` names a binary, it is built once from its Go module
(``go install helm.sh/helm/v4/cmd/helm@<version>``) into ``~/.cache/llmgw/helm/<version>/bin/helm``, with
the version stamped in as helm's Makefile does, and reused while there.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from k8s import Kubectl, poll
from test_operator import condition, gateway, secret

from conftest import LLMGW, ROOT
from llmgw_dev.cluster import ControlPlane

sys.path.insert(0, str(ROOT / "hack"))
import sync_chart_crd

HELM_VERSION = "v4.3.1"
HELM_MODULE = "helm.sh/helm/v4"
CHART = ROOT / "helm" / "llm-gateway-operator"
KUBE_VERSION = "1.36.0"  # the local control plane's minor; kubernetes-validate has its schemas
KUBERNETES_VALIDATE = str(Path(sys.executable).parent / "kubernetes-validate")
NOT_CORE = {"monitoring.coreos.com/v1"}  # prometheus-operator's kinds: no schema in kubernetes-validate


# ------------------------------------------------------------------------------------------------------------
# helm: found or built once
# ------------------------------------------------------------------------------------------------------------


class HelmBuildError(RuntimeError):
    """Building helm failed; the message carries go's own error."""


def helm_cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "llmgw" / "helm" / HELM_VERSION


def find_helm() -> Path | None:
    """``$LLMGW_HELM`` (a helm binary a user supplies), else the cached build, else None."""
    if os.environ.get("LLMGW_HELM"):
        return Path(os.environ["LLMGW_HELM"])
    cached = helm_cache_dir() / "bin" / "helm"
    return cached if cached.is_file() else None


def build_helm(log: Callable[[str], None] = print) -> Path:
    """``go install`` helm at HELM_VERSION into the cache; return the binary. Go's caches are private to
    the build and removed after it, so only the binary (about 60 MB) stays."""
    go = next((c for c in (shutil.which("go"), "/usr/local/go/bin/go") if c and Path(c).is_file()), None)
    if go is None:
        raise HelmBuildError("no Go toolchain to build helm with: install Go 1.26+ or set $LLMGW_HELM")
    root = helm_cache_dir()
    staging, bin_dir = root / "bin.tmp", root / "bin"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    env = {
        **os.environ,
        "CGO_ENABLED": "0",
        "GOFLAGS": "-buildvcs=false",
        "GOTOOLCHAIN": "local",
        "GOBIN": str(staging),
        "GOCACHE": str(root / "go-build"),
        "GOMODCACHE": str(root / "go-mod"),
    }
    version_pkg = f"{HELM_MODULE}/internal/version"
    ldflags = f"-s -w -X {version_pkg}.version={HELM_VERSION} -X {version_pkg}.gitTreeState=clean"
    argv = [go, "install", "-trimpath", "-ldflags", ldflags, f"{HELM_MODULE}/cmd/helm@{HELM_VERSION}"]
    log(f"building helm {HELM_VERSION} from its Go module (first use only)")
    started = time.monotonic()
    try:
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=root)
        if proc.returncode != 0:
            raise HelmBuildError(f"{' '.join(argv)} failed:\n{proc.stderr.strip()[-4000:]}")
        shutil.rmtree(bin_dir, ignore_errors=True)
        staging.rename(bin_dir)  # last: an interrupted build never leaves a binary that looks complete
    finally:
        subprocess.run([go, "clean", "-modcache"], env=env, capture_output=True, cwd=root)
        for scratch in (root / "go-mod", root / "go-build", staging):
            shutil.rmtree(scratch, ignore_errors=True)
    elapsed = time.monotonic() - started
    (root / "build-seconds").write_text(f"{elapsed:.0f}\n")
    log(f"helm {HELM_VERSION} built in {elapsed:.0f}s: {bin_dir / 'helm'}")
    return bin_dir / "helm"


# A first build takes minutes on 2 shared cores: give this module's tests room for it then, and only then.
pytestmark = pytest.mark.timeout(240 if find_helm() else 1800)


@pytest.fixture(scope="session")
def helm(pytestconfig: pytest.Config) -> Path:
    found = find_helm()
    if found is None:
        reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
        capture = pytestconfig.pluginmanager.get_plugin("capturemanager")
        try:
            with capture.global_and_fixture_disabled():
                found = build_helm(lambda line: reporter.write_line(line))
        except HelmBuildError as exc:
            pytest.fail(f"could not build helm:\n{exc}", pytrace=False)
    if not found.is_file():
        pytest.fail(f"$LLMGW_HELM={found} is not a file", pytrace=False)
    version = subprocess.run([found, "version", "--short"], capture_output=True, text=True).stdout
    if not version.startswith(HELM_VERSION):
        # Schema messages and lint rules differ between helm releases; the tests expect this one's.
        pytest.fail(f"{found} is helm {version.strip()!r}, the tests need {HELM_VERSION}", pytrace=False)
    return found


# ------------------------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------------------------

RELEASE, RELEASE_NAMESPACE = "llmgw", "llmgw-system"
FULLNAME = "llmgw-llm-gateway-operator"

VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "namespace-scope": {"rbac": {"scope": "namespace"}, "watchNamespaces": ["team-a", "team-b"]},
    "monitors": {
        "podMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "serviceMonitor": {
            "enabled": True,
            "namespace": "monitoring",
            "interval": "30s",
            "scrapeTimeout": "10s",
        },
    },
    "no-crds": {"crds": {"enabled": False}},
    "custom": {
        "image": {
            "repository": "registry.example.com/llmgw-operator",
            "tag": "0.1.0-rc1",
            "pullPolicy": "Always",
        },
        "imagePullSecrets": [{"name": "regcred"}],
        "proxyImage": "registry.example.com/llmgw-proxy:0.1.0-rc1",
        "logLevel": "debug",
        "resyncSeconds": 60,
        "migrationTickSeconds": 2.5,
        "prometheusUrl": "http://prometheus-operated.monitoring:9090",
        "resources": {"requests": {"cpu": "200m", "memory": "256Mi"}, "limits": {"cpu": 1, "memory": "1Gi"}},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}],
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["ops"]}]}
                    ]
                }
            }
        },
        "priorityClassName": "system-cluster-critical",
        "podAnnotations": {"example.com/team": "platform"},
        "podLabels": {"team": "platform", "app.kubernetes.io/name": "not-the-selector"},
        "serviceAccount": {"annotations": {"example.com/role": "llmgw"}},
        "crds": {"keep": False},
    },
}


def write_values(tmp_path: Path, values: dict[str, Any]) -> Path:
    path = tmp_path / f"values-{len(list(tmp_path.glob('values-*')))}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def helm_run(helm: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=60)


def render(
    helm: Path,
    tmp_path: Path,
    values: dict[str, Any],
    release: str = RELEASE,
    namespace: str = RELEASE_NAMESPACE,
) -> list[dict[str, Any]]:
    """``helm template`` of the chart with ``values``: the manifests, in order."""
    proc = helm_run(
        helm, "template", release, str(CHART), "--namespace", namespace, "--kube-version", KUBE_VERSION,
        "--include-crds", "-f", str(write_values(tmp_path, values)),
    )  # fmt: skip
    assert proc.returncode == 0, f"helm template failed:\n{proc.stderr}"
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def of_kind(manifests: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [m for m in manifests if m["kind"] == kind]


def one(manifests: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = of_kind(manifests, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def operator_container(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    containers = one(manifests, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"]}


def rules_grant(rules: list[dict[str, Any]], group: str, resource: str) -> set[str]:
    """The verbs ``rules`` grant on ``group/resource``."""
    return {
        verb
        for rule in rules
        if group in rule["apiGroups"] and resource in rule["resources"]
        for verb in rule["verbs"]
    }


# What the operator does in a namespace it serves, and in the cluster (the RBAC tests prove it is enough).
NAMESPACED_GRANTS = {
    ("llmgateway.io", "llmgateways"): {"get", "list", "watch", "patch"},
    ("llmgateway.io", "llmgateways/status"): {"patch"},
    ("", "secrets"): {"get", "list", "watch"},
    # Server-side apply is a PATCH, authorized as create too when the object does not exist yet.
    ("", "configmaps"): {"get", "list", "watch", "create", "patch"},
    ("", "services"): {"get", "list", "watch", "create", "patch"},
    ("", "serviceaccounts"): {"get", "list", "watch", "create", "patch"},
    ("apps", "deployments"): {"get", "list", "watch", "create", "patch"},
    ("policy", "poddisruptionbudgets"): {"get", "list", "watch", "create", "patch", "delete"},
    ("", "pods"): {"list"},
    ("", "events"): {"create"},
}
CRD_GRANTS = {("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"}}
NAMESPACE_LIST_GRANTS = {("", "namespaces"): {"list", "watch"}}


def grants(rules: list[dict[str, Any]]) -> dict[tuple[str, str], set[str]]:
    """Every (group, resource) ``rules`` name, with its verbs; wildcards and resourceNames are refused."""
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], rule
        assert "resourceNames" not in rule and "nonResourceURLs" not in rule, rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    return granted


# ------------------------------------------------------------------------------------------------------------
# Lint, template, validate
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", VALUE_SETS)
def test_lint_strict(helm: Path, tmp_path: Path, name: str) -> None:
    proc = helm_run(
        helm, "lint", "--strict", str(CHART), "--namespace", RELEASE_NAMESPACE,
        "--kube-version", KUBE_VERSION, "-f", str(write_values(tmp_path, VALUE_SETS[name])),
    )  # fmt: skip
    assert proc.returncode == 0, f"helm lint --strict ({name}):\n{proc.stdout}\n{proc.stderr}"
    assert "0 chart(s) failed" in proc.stdout, proc.stdout
    assert "[WARNING]" not in proc.stdout and "[ERROR]" not in proc.stdout, proc.stdout


@pytest.mark.parametrize("name", VALUE_SETS)
def test_rendered_manifests_pass_kubernetes_validate_strict(helm: Path, tmp_path: Path, name: str) -> None:
    manifests = render(helm, tmp_path, VALUE_SETS[name])
    core = [m for m in manifests if m["apiVersion"] not in NOT_CORE]
    path = tmp_path / "rendered.yaml"
    path.write_text(yaml.safe_dump_all(core))
    proc = subprocess.run(
        [KUBERNETES_VALIDATE, "--kubernetes-version", KUBE_VERSION, "--strict", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"kubernetes-validate --strict ({name}):\n{proc.stdout}\n{proc.stderr}"
    # One "passed" line per manifest: nothing was skipped for want of a schema.
    assert proc.stdout.count("passed for resource") == len(core), proc.stdout


def test_defaults(helm: Path, tmp_path: Path) -> None:
    manifests = render(helm, tmp_path, {})
    kinds = sorted(m["kind"] for m in manifests)
    assert kinds == [
        "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "Deployment", "Pod",
        "ServiceAccount",
    ]  # fmt: skip
    for m in manifests:
        if m["kind"] not in ("CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"):
            assert m["metadata"]["namespace"] == RELEASE_NAMESPACE, m["kind"]

    deployment = one(manifests, "Deployment")
    assert deployment["metadata"]["name"] == FULLNAME
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    assert pod["serviceAccountName"] == FULLNAME == one(manifests, "ServiceAccount")["metadata"]["name"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}

    container = operator_container(manifests)
    assert container["image"] == "ghcr.io/llm-gateway/llmgw-operator:0.1.0"
    assert "command" not in container, "the image's entry point (llmgw) runs the operator"
    assert container["args"] == ["operator"]
    assert env_of(container) == {
        "LLMGW_NAMESPACES": "",
        "LLMGW_PROXY_IMAGE": "ghcr.io/llm-gateway/llmgw-proxy:0.1.0",
        "LLMGW_LOG_LEVEL": "info",
        "LLMGW_RESYNC_SECONDS": "300",
        "LLMGW_MIGRATION_TICK_SECONDS": "5",
        "LLMGW_PROMETHEUS_URL": "",
        "LLMGW_HEALTH_LISTEN": "0.0.0.0:8080",
    }
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False and security["readOnlyRootFilesystem"] is True
    assert security["capabilities"] == {"drop": ["ALL"]} and security["runAsUser"] == 10001
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["ports"] == [{"name": "health", "containerPort": 8080, "protocol": "TCP"}]
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}, probe
    assert container["resources"]["limits"]["memory"] == "512Mi"
    for absent in ("nodeSelector", "tolerations", "affinity", "priorityClassName", "imagePullSecrets"):
        assert absent not in pod, absent

    crd = one(manifests, "CustomResourceDefinition")
    assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}

    # Cluster scope: one ClusterRole with everything, bound to the ServiceAccount; no namespace reads.
    assert not of_kind(manifests, "Role") and not of_kind(manifests, "RoleBinding")
    assert grants(one(manifests, "ClusterRole")["rules"]) == {**NAMESPACED_GRANTS, **CRD_GRANTS}
    binding = one(manifests, "ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": FULLNAME,
    }  # fmt: skip
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": FULLNAME, "namespace": RELEASE_NAMESPACE}
    ]

    test_pod = one(manifests, "Pod")
    assert test_pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert test_pod["spec"]["serviceAccountName"] == FULLNAME


def test_namespace_scope(helm: Path, tmp_path: Path) -> None:
    manifests = render(helm, tmp_path, VALUE_SETS["namespace-scope"])
    assert env_of(operator_container(manifests))["LLMGW_NAMESPACES"] == "team-a,team-b"
    roles, bindings = of_kind(manifests, "Role"), of_kind(manifests, "RoleBinding")
    assert [r["metadata"]["namespace"] for r in roles] == ["team-a", "team-b"]
    assert [b["metadata"]["namespace"] for b in bindings] == ["team-a", "team-b"]
    for role, binding in zip(roles, bindings, strict=True):
        assert grants(role["rules"]) == NAMESPACED_GRANTS
        assert binding["roleRef"]["kind"] == "Role" and binding["roleRef"]["name"] == role["metadata"]["name"]
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": FULLNAME, "namespace": RELEASE_NAMESPACE}
        ]
    # The cluster-wide part is read-only and names neither Secrets nor any object of the gateways.
    assert grants(one(manifests, "ClusterRole")["rules"]) == {**CRD_GRANTS, **NAMESPACE_LIST_GRANTS}
    assert one(manifests, "ClusterRoleBinding")["roleRef"]["kind"] == "ClusterRole"
    assert one(manifests, "Pod")["spec"]["containers"][0]["command"][3:] == ["team-a", "team-b"]


def test_monitors(helm: Path, tmp_path: Path) -> None:
    manifests = render(helm, tmp_path, VALUE_SETS["monitors"])
    pod_monitor, service_monitor = one(manifests, "PodMonitor"), one(manifests, "ServiceMonitor")
    for monitor in (pod_monitor, service_monitor):
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["spec"]["selector"] == {"matchLabels": {"app.kubernetes.io/name": "llm-gateway-proxy"}}
        # Series get llmgateway_io_gateway (and namespace): what the migration's PromQL selects by.
        assert monitor["spec"]["podTargetLabels"] == ["llmgateway.io/gateway"]
        assert monitor["spec"]["namespaceSelector"] == {"any": True}
    assert pod_monitor["metadata"]["namespace"] == RELEASE_NAMESPACE
    assert pod_monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert pod_monitor["spec"]["podMetricsEndpoints"] == [
        {"port": "metrics", "path": "/metrics", "interval": "15s"}
    ]
    assert service_monitor["metadata"]["namespace"] == "monitoring"
    assert service_monitor["spec"]["endpoints"] == [
        {"port": "metrics", "path": "/metrics", "interval": "30s", "scrapeTimeout": "10s"}
    ]
    # Monitors of a namespace-scoped operator look where it serves.
    scoped = render(helm, tmp_path, {**VALUE_SETS["namespace-scope"], "podMonitor": {"enabled": True}})
    assert one(scoped, "PodMonitor")["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}
    assert not of_kind(render(helm, tmp_path, {}), "PodMonitor")


def test_proxy_labels_match_the_monitors() -> None:
    """The monitors select the labels the operator puts on proxy pods and Services."""
    from llmgw_operator import manifests

    labels = manifests.labels("chat")
    assert labels["app.kubernetes.io/name"] == "llm-gateway-proxy"
    assert labels["llmgateway.io/gateway"] == "chat"


def test_crds_disabled(helm: Path, tmp_path: Path) -> None:
    manifests = render(helm, tmp_path, VALUE_SETS["no-crds"])
    assert not of_kind(manifests, "CustomResourceDefinition")
    assert of_kind(manifests, "Deployment")


def test_custom_values(helm: Path, tmp_path: Path) -> None:
    values = VALUE_SETS["custom"]
    manifests = render(helm, tmp_path, values)
    container = operator_container(manifests)
    assert container["image"] == "registry.example.com/llmgw-operator:0.1.0-rc1"
    assert container["imagePullPolicy"] == "Always"
    assert container["resources"] == {
        "requests": {"cpu": "200m", "memory": "256Mi"}, "limits": {"cpu": 1, "memory": "1Gi"},
    }  # fmt: skip
    env = env_of(container)
    assert env["LLMGW_PROXY_IMAGE"] == values["proxyImage"]
    assert env["LLMGW_LOG_LEVEL"] == "debug"
    assert env["LLMGW_RESYNC_SECONDS"] == "60" and env["LLMGW_MIGRATION_TICK_SECONDS"] == "2.5"
    assert env["LLMGW_PROMETHEUS_URL"] == values["prometheusUrl"]
    deployment = one(manifests, "Deployment")
    template = deployment["spec"]["template"]
    pod = template["spec"]
    for key in ("nodeSelector", "tolerations", "affinity", "priorityClassName", "imagePullSecrets"):
        assert pod[key] == values[key], key
    assert template["metadata"]["annotations"] == values["podAnnotations"]
    assert template["metadata"]["labels"]["team"] == "platform"
    # podLabels cannot break the selector.
    assert deployment["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    assert one(manifests, "ServiceAccount")["metadata"]["annotations"] == {"example.com/role": "llmgw"}
    assert "annotations" not in one(manifests, "CustomResourceDefinition")["metadata"]  # crds.keep: false

    by_digest = render(helm, tmp_path, {"image": {"digest": "sha256:" + "ab" * 32}})
    assert operator_container(by_digest)["image"] == "ghcr.io/llm-gateway/llmgw-operator@sha256:" + "ab" * 32


def test_existing_service_account(helm: Path, tmp_path: Path) -> None:
    manifests = render(helm, tmp_path, {"serviceAccount": {"create": False, "name": "ops-operator"}})
    assert not of_kind(manifests, "ServiceAccount")
    assert one(manifests, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "ops-operator"
    assert one(manifests, "ClusterRoleBinding")["subjects"][0]["name"] == "ops-operator"
    no_rbac = render(helm, tmp_path, {"rbac": {"create": False}})
    assert not {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"} & {m["kind"] for m in no_rbac}


BAD_VALUES: list[tuple[str, dict[str, Any], list[str]]] = [
    ("unknown top-level key", {"replicas": 2}, ["at '': additional properties 'replicas' not allowed"]),
    (
        "unknown nested key",
        {"image": {"name": "x"}},
        ["at '/image': additional properties 'name' not allowed"],
    ),
    (
        "scope not in the enum",
        {"rbac": {"scope": "everywhere"}},
        ["at '/rbac/scope': value must be one of 'cluster', 'namespace'"],
    ),
    ("a number as text", {"resyncSeconds": "fast"}, ["at '/resyncSeconds': got string, want number"]),
    ("a non-positive period", {"migrationTickSeconds": 0}, ["at '/migrationTickSeconds': exclusiveMinimum"]),
    (
        "a log level kopf has not",
        {"logLevel": "verbose"},
        ["at '/logLevel': value must be one of 'debug', 'info', 'warning', 'error'"],
    ),
    (
        "a namespace that is no DNS label",
        {"watchNamespaces": ["Team_A"]},
        ["at '/watchNamespaces/0': 'Team_A' does not match pattern"],
    ),
    (
        "a monitor interval that is no duration",
        {"podMonitor": {"interval": "often"}},
        ["at '/podMonitor/interval': 'often' does not match pattern"],
    ),
    (
        "namespace scope without namespaces",
        {"rbac": {"scope": "namespace"}},
        ["rbac.scope is namespace: list the namespaces to serve in watchNamespaces"],
    ),
    (
        "cluster scope with namespaces",
        {"watchNamespaces": ["team-a"]},
        ["rbac.scope is cluster", "leave watchNamespaces empty", '["team-a"]'],
    ),
    (
        "an existing ServiceAccount without a name",
        {"serviceAccount": {"create": False}},
        ["serviceAccount.name: name an existing ServiceAccount"],
    ),
]


@pytest.mark.parametrize(("what", "values", "expected"), BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_bad_values_are_refused_with_a_clear_message(
    helm: Path, tmp_path: Path, what: str, values: dict[str, Any], expected: list[str]
) -> None:
    proc = helm_run(helm, "template", RELEASE, str(CHART), "-f", str(write_values(tmp_path, values)))
    assert proc.returncode != 0, f"{what}: rendered anyway:\n{proc.stdout[:2000]}"
    for text in expected:
        assert text in proc.stderr, f"{what}: {text!r} not in helm's message:\n{proc.stderr}"


def _keys_with_comments(text: str) -> Iterator[tuple[tuple[str, ...], bool]]:
    """(path, commented) of every key in a values file: commented when a comment line is right above it."""
    stack: list[tuple[int, str]] = []
    previous = ""
    for line in text.splitlines():
        match = re.match(r"^(\s*)([A-Za-z][\w.-]*):", line)
        if match:
            indent, key = len(match[1]), match[2]
            stack = [(i, k) for i, k in stack if i < indent] + [(indent, key)]
            yield tuple(k for _, k in stack), previous.strip().startswith("#")
        if line.strip():
            previous = line


def test_every_value_is_commented_and_in_the_schema() -> None:
    values_text = (CHART / "values.yaml").read_text()
    schema = json.loads((CHART / "values.schema.json").read_text())
    for path, commented in _keys_with_comments(values_text):
        if path[0] == "resources" and len(path) > 1:
            continue  # the default requests and limits themselves, described by `resources`
        assert commented, f"values.yaml: {'.'.join(path)} has no comment"
        node = schema
        for key in path:
            assert key in node.get("properties", {}), f"values.schema.json has no {'.'.join(path)}"
            node = node["properties"][key]
    assert set(yaml.safe_load(values_text)) == set(schema["properties"])


def test_schema_is_closed_at_every_object_level() -> None:
    """Every object in values.schema.json refuses unknown keys, or is a map of strings (labels), or is a
    Kubernetes object the chart passes through to the API server (affinity's three parts)."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    passed_through = []

    def walk(node: dict[str, Any], path: str) -> None:
        assert node.get("description") or path == "", f"{path}: no description"
        if node.get("type") == "object":
            extra = node.get("additionalProperties")
            if "properties" in node:
                assert extra is False, f"{path}: additionalProperties must be false"
            elif extra != {"type": "string"}:
                assert "Kubernetes object" in node["description"], f"{path}: an open object"
                passed_through.append(path)
        for key, child in node.get("properties", {}).items():
            walk(child, f"{path}.{key}")
        if isinstance(node.get("items"), dict):
            walk({"description": "item", **node["items"]}, f"{path}[]")

    walk(schema, "")
    assert passed_through == [".affinity.nodeAffinity", ".affinity.podAffinity", ".affinity.podAntiAffinity"]


def test_chart_crd_is_generated_from_crds(helm: Path, tmp_path: Path) -> None:
    template = CHART / "templates" / "crd-llmgateways.yaml"
    wanted = sync_chart_crd.generate(sync_chart_crd.SOURCE.read_text())
    assert template.read_text() == wanted, "the chart's CRD is stale: run python hack/sync_chart_crd.py"
    assert (
        subprocess.run([sys.executable, str(ROOT / "hack" / "sync_chart_crd.py"), "--check"]).returncode == 0
    )

    source = yaml.safe_load(sync_chart_crd.SOURCE.read_text())
    rendered = one(render(helm, tmp_path, {}), "CustomResourceDefinition")
    assert rendered["metadata"].pop("annotations") == {"helm.sh/resource-policy": "keep"}
    assert rendered == source
    assert one(render(helm, tmp_path, {"crds": {"keep": False}}), "CustomResourceDefinition") == source


def test_sync_escapes_template_actions() -> None:
    generated = sync_chart_crd.generate(
        "apiVersion: v1\nmetadata:\n  name: x\nspec: {description: '{{ a }}'}"
    )
    assert '{{ "{{" }} a {{ "}}" }}' in generated
    assert generated.startswith(sync_chart_crd.HEADER) and generated.endswith("{{- end }}\n")


def test_notes_tell_what_to_apply_next(helm: Path, tmp_path: Path) -> None:
    notes = render_notes(helm, tmp_path, VALUE_SETS["namespace-scope"])
    for text in (
        "kubectl -n team-a create secret generic llm-keys",
        "kind: LLMGateway",
        "kubectl -n team-a get llmgw -w",
        "llmgw status chat -n team-a --watch",
        "It serves LLMGateways in: team-a, team-b.",
    ):
        assert text in notes, f"{text!r} not in NOTES:\n{notes}"
    assert "WARNING" not in notes
    both = render_notes(helm, tmp_path, VALUE_SETS["monitors"])
    assert "WARNING: both podMonitor and serviceMonitor are enabled" in both


def render_notes(helm: Path, tmp_path: Path, values: dict[str, Any]) -> str:
    proc = helm_run(
        helm, "install", RELEASE, str(CHART), "--dry-run=client", "--namespace", RELEASE_NAMESPACE,
        "-f", str(write_values(tmp_path, values)),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split("NOTES:", 1)[1]


def notes_gateway(notes: str) -> dict[str, Any]:
    """The LLMGateway example in NOTES.txt."""
    block = notes.split("<<'YAML'\n", 1)[1].split("\nYAML\n", 1)[0]
    loaded: dict[str, Any] = yaml.safe_load(block)
    return loaded


# ------------------------------------------------------------------------------------------------------------
# RBAC on the real API server
# ------------------------------------------------------------------------------------------------------------

RBAC_KINDS = ("ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")
# How the API server words an RBAC denial, and kopf a missing permission it works around.
# "403" as a status code, not the milliseconds of a log timestamp ("17:56:38,403").
DENIED = re.compile(r"(?<![,.])\b403\b|forbidden|not enough permissions", re.IGNORECASE)
# A namespace being deleted refuses new objects with a 403 too; with rbac.scope cluster the operator serves
# the leftovers of other tests' namespaces while the namespace controller empties them. That is no RBAC.
TERMINATING = re.compile(r"because it is being terminated|NamespaceTerminating")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ChartOperator:
    """``llmgw operator`` run as the chart's Deployment would run it: its args and environment, with the
    token of the chart's ServiceAccount instead of a mounted one, and its liveness endpoint on loopback."""

    def __init__(self, manifests: list[dict[str, Any]], kubeconfig: Path, log_path: Path) -> None:
        container = operator_container(manifests)
        self.health = f"127.0.0.1:{free_port()}"
        self.argv = [LLMGW, *container["args"]]
        self.env = {
            **os.environ,
            **env_of(container),
            "KUBECONFIG": str(kubeconfig),
            "LLMGW_HEALTH_LISTEN": self.health,
        }
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ChartOperator:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def healthy(self) -> bool:
        url = f"http://{self.health}/healthz"
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
        return False

    def denials(self) -> list[str]:
        return [
            line for line in self.log().splitlines() if DENIED.search(line) and not TERMINATING.search(line)
        ]


def get(kubectl: Kubectl, namespace: str, kind: str, name: str) -> dict[str, Any] | None:
    proc = kubectl("get", "-n", namespace, kind, name, "-o", "json", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def can_i(kubectl: Kubectl, account: str, verb: str, resource: str, *args: str) -> bool:
    """``kubectl auth can-i VERB RESOURCE ARGS --as=system:serviceaccount:NS:NAME``, with the groups its
    token carries; ``RESOURCE`` may name a subresource (``serviceaccounts/token``)."""
    namespace = account.split(":")[2]
    resource, _, subresource = resource.partition("/")
    proc = kubectl(
        "auth", "can-i", verb, resource, *([f"--subresource={subresource}"] if subresource else []), *args,
        f"--as={account}", "--as-group=system:serviceaccounts",
        f"--as-group=system:serviceaccounts:{namespace}", "--as-group=system:authenticated", check=False,
    )  # fmt: skip
    assert proc.stdout.strip() in ("yes", "no"), proc.stdout + proc.stderr
    return proc.stdout.strip() == "yes"


def serve_a_gateway(kubectl: Kubectl, operator: ChartOperator, namespace: str) -> None:
    """Take a gateway through what the operator does: a missing Secret (watched, read), then converged
    (every child applied, status patched, events created), scaled to one replica (PDB deleted), a child
    deleted (watched, recreated); with no permission refused on the way."""

    def wait_for(what: str, probe: Callable[[], Any], timeout: float = 45.0) -> Any:
        return poll(what, probe, timeout, diagnose=lambda: f"--- operator log ---\n{operator.log()[-4000:]}")

    def status() -> dict[str, Any]:
        return (get(kubectl, namespace, "llmgw", "gw") or {}).get("status") or {}

    wait_for("kopf's liveness endpoint", operator.healthy)
    kubectl.apply(gateway(), namespace)
    wait_for("SecretsResolved=False", lambda: condition(status(), "SecretsResolved").get("status") == "False")
    kubectl.apply(secret(), namespace)
    for kind, name in [
        ("configmap", "gw-config"),
        ("serviceaccount", "gw-proxy"),
        ("service", "gw"),
        ("poddisruptionbudget", "gw-proxy"),
        ("deployment", "gw-proxy"),
    ]:
        wait_for(f"{kind} {name}", lambda k=kind, n=name: get(kubectl, namespace, k, n))
    converged = wait_for(
        "the status of a converged gateway",
        lambda: (
            condition(status(), "SecretsResolved").get("status") == "True" and status().get("replicas") == 2
        ),
    )
    assert converged
    final = status()
    assert condition(final, "ConfigValid")["status"] == "True"
    assert condition(final, "Ready")["status"] == "False"  # no kubelet runs the proxies here
    assert final["phase"] == "Pending" and final["observedGeneration"] == 1
    reasons = {e["reason"] for e in kubectl.json("get", "events", "-n", namespace)["items"]}
    assert {"SecretNotFound", "Created"} <= reasons, reasons

    kubectl.apply(gateway(replicas=1), namespace)
    wait_for(
        "the PDB to be deleted", lambda: get(kubectl, namespace, "poddisruptionbudget", "gw-proxy") is None
    )
    kubectl("delete", "-n", namespace, "service", "gw")
    wait_for("the deleted Service to be recreated", lambda: get(kubectl, namespace, "service", "gw"))
    assert "Traceback" not in operator.log()
    assert not operator.denials(), "the operator was refused something:\n" + "\n".join(operator.denials())


def run_test_pod_script(manifests: list[dict[str, Any]], kubeconfig: Path) -> str:
    """The chart's `helm test` Pod's command, run here under the operator's ServiceAccount token."""
    command = one(manifests, "Pod")["spec"]["containers"][0]["command"]
    assert command[:2] == ["python", "-c"]
    proc = subprocess.run(
        [sys.executable, *command[1:]],
        env={**os.environ, "KUBECONFIG": str(kubeconfig)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


NEVER = [
    ("delete", "namespaces"),
    ("create", "clusterroles"),
    ("create", "clusterrolebindings"),
    ("escalate", "clusterroles"),
    ("bind", "clusterroles"),
    ("impersonate", "serviceaccounts"),
    ("get", "nodes"),
    ("create", "customresourcedefinitions"),
    ("delete", "customresourcedefinitions"),
]
NEVER_IN_NAMESPACE = [
    ("create", "pods"),
    ("delete", "pods"),
    ("create", "pods/exec"),
    ("create", "serviceaccounts/token"),
    ("update", "secrets"),
    ("patch", "secrets"),
    ("delete", "secrets"),
    ("create", "roles"),
    ("create", "rolebindings"),
    ("escalate", "roles"),
    ("bind", "roles"),
    ("delete", "deployments"),
    ("delete", "llmgateways"),
    ("update", "llmgateways"),
    ("delete", "configmaps"),
]


@contextlib.contextmanager
def another_namespace(kubectl: Kubectl, namespace: str, suffix: str) -> Iterator[str]:
    name = f"{namespace[:50]}-{suffix}"
    kubectl("create", "namespace", name)
    try:
        yield name
    finally:
        kubectl("delete", "namespace", name, "--wait=false")


def run_chart_operator(
    helm: Path,
    control_plane: ControlPlane,
    kubectl: Kubectl,
    tmp_path: Path,
    values: dict[str, Any],
    home: str,
    served: str,
) -> tuple[list[dict[str, Any]], str, Path]:
    """Render the chart into namespace ``home``, apply its ServiceAccount and RBAC, run the operator with
    that account's token and serve a gateway in ``served``; (the manifests, the account, its kubeconfig)."""
    manifests = render(helm, tmp_path, {"fullnameOverride": f"llmgw-{home}"[:63], **values}, namespace=home)
    account_name = one(manifests, "ServiceAccount")["metadata"]["name"]
    kubectl("apply", "-f", "-", input=yaml.safe_dump_all([m for m in manifests if m["kind"] in RBAC_KINDS]))
    token = kubectl("create", "token", "-n", home, account_name, "--duration=1h").stdout.strip()
    token_kubeconfig = control_plane.token_kubeconfig(tmp_path / "operator.kubeconfig", token)
    with ChartOperator(manifests, token_kubeconfig, tmp_path / "operator.log") as operator:
        assert operator.env["LLMGW_NAMESPACES"] == ",".join(values.get("watchNamespaces", []))
        serve_a_gateway(kubectl, operator, served)
    return manifests, f"system:serviceaccount:{home}:{account_name}", token_kubeconfig


@contextlib.contextmanager
def cluster_objects_deleted(kubectl: Kubectl, home: str) -> Iterator[None]:
    """The chart's ClusterRole and ClusterRoleBinding outlive the test's namespace: delete them after."""
    try:
        yield
    finally:
        name = f"llmgw-{home}"[:63]
        kubectl("delete", "--ignore-not-found", "clusterrolebinding", name)
        kubectl("delete", "--ignore-not-found", "clusterrole", name)


def test_rbac_namespace_scope_is_enough_and_no_more(
    helm: Path, control_plane: ControlPlane, kubectl: Kubectl, namespace: str, tmp_path: Path
) -> None:
    """The operator lives in one namespace and serves the test's: it needs nothing in its own."""
    with another_namespace(kubectl, namespace, "op") as home, cluster_objects_deleted(kubectl, home):
        values = {"rbac": {"scope": "namespace"}, "watchNamespaces": [namespace]}
        manifests, account, token_kubeconfig = run_chart_operator(
            helm, control_plane, kubectl, tmp_path, values, home=home, served=namespace
        )
        assert f"namespace {namespace}: 1 LLMGateway(s)" in run_test_pod_script(manifests, token_kubeconfig)

        assert can_i(kubectl, account, "patch", "deployments", "-n", namespace)  # the check itself works
        assert can_i(kubectl, account, "list", "namespaces")  # kopf's namespace scan
        for verb, resource in NEVER:
            assert not can_i(kubectl, account, verb, resource), f"{account} may {verb} {resource}"
        for verb, resource in NEVER_IN_NAMESPACE:
            assert not can_i(kubectl, account, verb, resource, "-n", namespace), f"{verb} {resource}"
        for other in (home, "kube-system", "default"):
            for verb, resource in [
                ("get", "secrets"), ("list", "secrets"), ("patch", "deployments"), ("list", "llmgateways"),
            ]:  # fmt: skip
                assert not can_i(kubectl, account, verb, resource, "-n", other), (
                    f"{verb} {resource} in {other}"
                )
        assert not can_i(kubectl, account, "list", "secrets", "--all-namespaces")


def test_rbac_cluster_scope_is_enough_and_no_more(
    helm: Path, control_plane: ControlPlane, kubectl: Kubectl, namespace: str, tmp_path: Path
) -> None:
    """The operator lives in the test's namespace and serves a gateway in another one it was never told of."""
    with another_namespace(kubectl, namespace, "gw") as served:
        with cluster_objects_deleted(kubectl, namespace):
            manifests, account, token_kubeconfig = run_chart_operator(
                helm, control_plane, kubectl, tmp_path, {}, home=namespace, served=served
            )
            assert "namespace *:" in run_test_pod_script(manifests, token_kubeconfig)

            assert can_i(kubectl, account, "patch", "deployments", "-n", served)
            assert not can_i(kubectl, account, "list", "namespaces")  # kopf does not scan them cluster-wide
            for verb, resource in NEVER:
                assert not can_i(kubectl, account, verb, resource), f"{account} may {verb} {resource}"
            for verb, resource in NEVER_IN_NAMESPACE:
                assert not can_i(kubectl, account, verb, resource, "-n", served), f"{verb} {resource}"
                assert not can_i(kubectl, account, verb, resource, "--all-namespaces"), f"{verb} {resource}"

        # The ClusterRole and its binding went with the test: no later test runs with them.
        for kind in ("clusterrole", "clusterrolebinding"):
            assert kubectl("get", kind, f"llmgw-{namespace}"[:63], check=False).returncode != 0
        assert not can_i(kubectl, account, "list", "llmgateways", "--all-namespaces")


def test_notes_gateway_is_valid(helm: Path, kubectl: Kubectl, namespace: str, tmp_path: Path) -> None:
    """The LLMGateway NOTES.txt suggests is accepted by the real CRD (server-side dry run)."""
    example = notes_gateway(render_notes(helm, tmp_path, {}))
    assert example["kind"] == "LLMGateway"
    kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-", input=yaml.safe_dump(example))
