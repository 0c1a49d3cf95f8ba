"""The LLMGateway CRD against a real kube-apiserver.

Every sample in ``crds/testdata/valid`` must be stored as written plus the schema's defaults - the same
defaults :func:`llmgw_operator.spec.with_defaults` applies - and every sample in ``crds/testdata/invalid``
must be refused with the message its ``# expect:`` line names. Then the parts of the CRD that are not
validation: defaults, printer columns, the short name, the status and scale subresources, ``kubectl explain``.

The samples share one namespace per module (each sample has its own name): a namespace per sample would
triple the kubectl calls, and no operator acts on these objects.
"""

from __future__ import annotations

import json
import pathlib
import re
import secrets
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from k8s import Kubectl

from llmgw_operator.spec import with_defaults

ROOT = pathlib.Path(__file__).resolve().parent.parent
CRD_FILE = ROOT / "crds" / "llmgateways.llmgateway.io.yaml"
CRD_NAME = "llmgateways.llmgateway.io"
TESTDATA = ROOT / "crds" / "testdata"
VALID = sorted((TESTDATA / "valid").glob("*.yaml"))
INVALID = sorted((TESTDATA / "invalid").glob("*.yaml"))
EXPECT = re.compile(r"^# expect: (?P<text>\S.*?)\s*$")


def load(path: pathlib.Path) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(path.read_text())
    return loaded


def expectation(path: pathlib.Path) -> str:
    """The substring of the API server's error that the ``# expect:`` first line of an invalid sample names."""
    match = EXPECT.match(path.read_text().split("\n", 1)[0])
    assert match, f"{path.name}: the first line must be '# expect: <part of the API server's error>'"
    return match["text"]


def differences(want: Any, got: Any, path: str = "spec") -> list[str]:
    """Where two JSON values differ, one line per difference, by field path."""
    if isinstance(want, dict) and isinstance(got, dict):
        lines = []
        for key in sorted(want.keys() | got.keys()):
            if key not in got:
                lines.append(f"{path}.{key}: only in want: {want[key]!r}")
            elif key not in want:
                lines.append(f"{path}.{key}: only in got: {got[key]!r}")
            else:
                lines += differences(want[key], got[key], f"{path}.{key}")
        return lines
    if isinstance(want, list) and isinstance(got, list) and len(want) == len(got):
        return [
            line
            for i, (w, g) in enumerate(zip(want, got, strict=True))
            for line in differences(w, g, f"{path}[{i}]")
        ]
    return [] if want == got else [f"{path}: want {want!r}, got {got!r}"]


def contained(sample: Any, stored: Any, path: str = "spec") -> list[str]:
    """Fields of ``sample`` that ``stored`` lacks or changed (defaults may add, never alter).

    A null is the exception: the API server drops it, then applies the field's default if it has one.
    """
    if isinstance(sample, dict) and isinstance(stored, dict):
        return [
            line
            for key, value in sample.items()
            if value is not None
            for line in contained(value, stored.get(key), f"{path}.{key}")
        ]
    if isinstance(sample, list) and isinstance(stored, list) and len(sample) == len(stored):
        return [line for i, item in enumerate(sample) for line in contained(item, stored[i], f"{path}[{i}]")]
    return [] if sample == stored else [f"{path}: wrote {sample!r}, stored {stored!r}"]


@pytest.fixture(scope="session")
def llmgateway_crd(kubectl: Kubectl) -> str:
    """The CRD, installed (idempotently: other tests may install it too) and Established. Never deleted."""
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_FILE))
    kubectl("wait", "--for=condition=Established", "--timeout=30s", f"crd/{CRD_NAME}")
    return CRD_NAME


@pytest.fixture(scope="module")
def ns(kubectl: Kubectl, llmgateway_crd: str) -> Iterator[str]:
    name = f"test-crd-{secrets.token_hex(3)}"
    kubectl("create", "namespace", name)
    yield name
    kubectl("delete", "namespace", name, "--wait=false")


def test_table_is_well_formed() -> None:
    assert len(VALID) >= 8 and len(INVALID) >= 20
    for path in VALID + INVALID:
        sample = load(path)
        assert (sample["apiVersion"], sample["kind"]) == ("llmgateway.io/v1alpha1", "LLMGateway"), path.name
        assert sample["metadata"]["name"] == path.stem, path.name
    for path in VALID:
        assert not EXPECT.match(path.read_text().split("\n", 1)[0]), f"{path.name} is valid: no '# expect:'"
    for path in INVALID:
        expectation(path)


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.stem)
def test_valid_sample(path: pathlib.Path, kubectl: Kubectl, ns: str) -> None:
    sample = load(path)
    stored = json.loads(kubectl("apply", "-n", ns, "-o", "json", "-f", str(path)).stdout)
    assert stored["metadata"]["name"] == path.stem
    assert stored["metadata"]["generation"] == 1
    assert "status" not in stored
    changed = contained(sample["spec"], stored["spec"])
    assert not changed, "the API server changed fields the sample set:\n" + "\n".join(changed)
    # The operator's defaulting must give exactly what the API server stores.
    diff = differences(stored["spec"], with_defaults(sample["spec"]))
    assert not diff, "with_defaults(spec) differs from the API server's (want = server):\n" + "\n".join(diff)


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_sample(path: pathlib.Path, kubectl: Kubectl, ns: str) -> None:
    expected = expectation(path)
    proc = kubectl("apply", "-n", ns, "-f", str(path), check=False)
    assert proc.returncode != 0, f"the API server accepted {path.name}:\n{proc.stdout}"
    assert expected in proc.stderr, f"expected {expected!r} in the API server's error:\n{proc.stderr}"


def renamed(path: pathlib.Path, name: str) -> dict[str, Any]:
    sample = load(path)
    sample["metadata"]["name"] = name
    return sample


def test_defaults(kubectl: Kubectl, ns: str) -> None:
    both = [
        renamed(TESTDATA / "valid" / "minimal.yaml", "defaults"),
        renamed(TESTDATA / "valid" / "migration-defaults.yaml", "defaults-migration"),
    ]
    # Two YAML documents rather than a v1 List: for a List kubectl loads the core API's OpenAPI (~2 s).
    proc = kubectl("apply", "-n", ns, "-o", "json", "-f", "-", input=yaml.safe_dump_all(both))
    minimal, migration = (item["spec"] for item in json.loads(proc.stdout)["items"])

    proxy = minimal["proxy"]
    assert proxy["replicas"] == 2
    assert proxy["ports"] == {"grpc": 50051, "rest": 8080, "admin": 9090}
    assert proxy["serviceType"] == "ClusterIP"
    assert proxy["logLevel"] == "info"
    assert proxy["requestTimeout"] == "60s"
    assert proxy["maxConcurrentRequests"] == 256
    assert proxy["maxRequestBytes"] == 1048576
    assert "cache" not in proxy and "image" not in proxy  # no default: the operator decides
    (provider,) = minimal["providers"]
    assert provider["timeout"] == "120s"
    assert provider["connectTimeout"] == "5s"
    # Defaults inside the type's block; the other members stay unset.
    assert provider["openai"] == {"baseURL": "https://api.openai.com/v1", "maxConnections": 256}
    assert "retries" not in provider
    assert "anthropic" not in provider and "llmgateway" not in provider
    assert "migration" not in minimal and "grpcWeight" not in minimal
    # An llmgateway block gets no tls default (the proxy's is false); it has no maxConnections.
    assert migration["providers"][1]["llmgateway"] == {"target": "llm-grpc:50051"}

    assert migration["migration"] == {
        "steps": [10, 25, 50, 100],
        "interval": "5m",
        "analysis": {"maxErrorRate": 0.01, "maxP99Latency": "10s", "minRequests": 20},
        "failureLimit": 2,
        "progressDeadline": "30m",
        "paused": False,
    }


def test_printer_columns_and_short_name(kubectl: Kubectl, ns: str) -> None:
    kubectl.apply(renamed(TESTDATA / "valid" / "minimal.yaml", "columns"), ns)
    status = {"status": {"phase": "Ready", "grpcWeight": 25, "readyReplicasText": "2/2"}}
    kubectl(
        "patch",
        "llmgw",
        "columns",
        "-n",
        ns,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(status),
    )
    header, row = kubectl("get", "llmgw", "columns", "-n", ns).stdout.splitlines()
    assert re.split(r"\s{2,}", header.strip()) == ["NAME", "PHASE", "GRPC WEIGHT", "READY", "AGE"]
    assert re.split(r"\s{2,}", row.strip())[:4] == ["columns", "Ready", "25", "2/2"]


def test_status_subresource(kubectl: Kubectl, ns: str) -> None:
    created = kubectl.apply(renamed(TESTDATA / "valid" / "fixed-weight.yaml", "status"), ns)
    assert created["metadata"]["generation"] == 1

    # Through the status subresource: status changes, spec and generation do not.
    patch = {
        "spec": {"grpcWeight": 99},
        "status": {"phase": "Ready", "grpcWeight": 30, "observedGeneration": 1},
    }
    args = ("patch", "llmgateway", "status", "-n", ns, "--type=merge", "-o", "json")
    after = json.loads(kubectl(*args, "--subresource=status", "-p", json.dumps(patch)).stdout)
    assert after["status"] == {"phase": "Ready", "grpcWeight": 30, "observedGeneration": 1}
    assert after["spec"]["grpcWeight"] == 30
    assert after["metadata"]["generation"] == 1

    # Through the main resource: spec changes (a new generation), status does not.
    patch = {"spec": {"grpcWeight": 50}, "status": {"phase": "Failed"}}
    after = json.loads(kubectl(*args, "-p", json.dumps(patch)).stdout)
    assert after["spec"]["grpcWeight"] == 50
    assert after["metadata"]["generation"] == 2
    assert after["status"] == {"phase": "Ready", "grpcWeight": 30, "observedGeneration": 1}


def test_scale_subresource(kubectl: Kubectl, ns: str) -> None:
    kubectl.apply(renamed(TESTDATA / "valid" / "minimal.yaml", "scale"), ns)
    kubectl("scale", "llmgw/scale", "-n", ns, "--replicas=5")
    assert kubectl.json("get", "llmgw", "scale", "-n", ns)["spec"]["proxy"]["replicas"] == 5


def explain(kubectl: Kubectl, field: str) -> str:
    """``kubectl explain field``, its descriptions unwrapped."""
    # The OpenAPI document is published a moment after the CRD is Established.
    deadline = time.monotonic() + 20
    while True:
        proc = kubectl("explain", field, check=False)
        if proc.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert proc.returncode == 0, proc.stderr
    return " ".join(proc.stdout.split())  # explain wraps descriptions


def test_explain(kubectl: Kubectl, llmgateway_crd: str) -> None:
    text = explain(kubectl, "llmgateway.spec.providers")
    assert "The LLM providers the proxies call. Names are unique." in text
    assert "exactly one of openai, anthropic, llmgateway, vllm, sglang or trtllm" in text
    for member in ("openai", "anthropic", "llmgateway", "apiKeySecretRef"):
        assert f"{member} <Object>" in text
    assert "baseURL <string>" not in text  # in the type's block now

    text = explain(kubectl, "llmgateway.spec.providers.openai")
    assert "baseURL <string> -required-" in text
    assert "The API's base URL, e.g. https://api.openai.com/v1." in text
    text = explain(kubectl, "llmgateway.spec.providers.llmgateway")
    assert "target <string> -required-" in text
    assert "tls <boolean>" in text


def test_explain_limits(kubectl: Kubectl, llmgateway_crd: str) -> None:
    text = explain(kubectl, "llmgateway.spec.proxy.limits")
    for block in ("restServer", "grpcServer", "restClient", "grpcClient"):
        assert f"{block} <Object>" in text
    text = explain(kubectl, "llmgateway.spec.proxy.limits.grpcClient")
    assert "keepAliveProbes <integer>" in text and "unackedDataTimeoutSeconds <number>" in text
    assert "give up after this many unanswered probes. Default 3." in text


EXAMPLES = sorted((ROOT / "examples" / "gateways").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_the_examples_are_accepted_and_their_proxy_configs_parse(
    path: pathlib.Path, kubectl: Kubectl, ns: str
) -> None:
    """Every example of the README applies as it is (the API server's dry run, its Secrets too), and the
    proxy configuration the operator would render from it parses with the proxy's own parser."""
    from llmgw_common import config as proxy_config
    from llmgw_operator import manifests

    kubectl("apply", "--dry-run=server", "-n", ns, "-f", str(path))
    for document in yaml.safe_load_all(path.read_text()):
        if document["kind"] == "LLMGateway":
            stored = json.loads(
                kubectl(
                    "apply",
                    "--dry-run=server",
                    "-n",
                    ns,
                    "-o",
                    "json",
                    "-f",
                    "-",
                    input=yaml.safe_dump(document),
                ).stdout
            )
            proxy_config.parse(manifests.build_proxy_config(stored["spec"], 0, 1))
