"""A real, local Kubernetes control plane on 127.0.0.1: etcd, kube-apiserver and kube-controller-manager.

This is the *envtest* idea (controller-runtime's ``envtest``): test an operator against the real API server
(real validation, defaulting, RBAC, watches, owner references) without nodes. There are no kubelets, no
scheduler and no container runtime, so Pods are created but stay Pending; what an operator needs from a
cluster is the API and a few controllers:

* **etcd** stores the objects; its data lives in the state directory and skips fsync (throwaway data).
* **kube-apiserver** serves HTTPS on a free 127.0.0.1 port with RBAC authorization, client-certificate
  authentication (a throwaway CA; the admin certificate is ``O=system:masters``) and service-account tokens
  signed by its own key, so ``kubectl create token`` and bearer-token clients work as in a real cluster.
* **kube-controller-manager** runs only the controllers that mean something without kubelets: the garbage
  collector (deleting an owner deletes its dependents), deployment and replicaset (a Deployment gets a
  ReplicaSet, the ReplicaSet gets Pods), namespace (deleting a namespace empties it), serviceaccount and
  serviceaccount-token (each namespace gets its ``default`` ServiceAccount), disruption and endpointslice.
  Node lifecycle and everything else that expects kubelets or a cloud stays off.

One state directory holds it all: ``pki/`` (CA, certificates and the service-account key pair, made with
the ``openssl`` CLI), ``etcd/`` (data), one ``<process>.log`` per process, ``cluster.json`` (ports and pids)
and the admin ``kubeconfig``. :class:`ControlPlane` runs one from Python (``tests/k8s.py`` shares one per
test session); :func:`up`, :func:`down` and :func:`status` back ``llmgw cluster up|down|status``, which
keep one running in the background under ``.llmgw/`` of the current directory.

Binaries come from :mod:`llmgw_dev.k8s_build`: built from source on first use, or ``$LLMGW_K8S_BIN``.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from llmgw_dev import k8s_build

LOOPBACK = "127.0.0.1"
# Metadata of every request (user, verb, resource, response code), never bodies: Secrets stay out of it.
_AUDIT_POLICY = """apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: Metadata
"""
DEFAULT_DIR = Path(".llmgw")
STATE_FILE = "cluster.json"
CONTEXT = "llmgw-local"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
# Controllers that work without kubelets. Node lifecycle, scheduling-related and cloud controllers would
# only mark things unhealthy or wait forever.
CONTROLLERS = (
    "garbage-collector-controller",
    "deployment-controller",
    "replicaset-controller",
    "namespace-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "disruption-controller",
    "endpointslice-controller",
)
# Stop order: etcd only once the API server is gone. Stopped together, the API server's graceful shutdown
# hangs on the dead etcd and etcd's waits for the API server's open watch streams, until SIGKILL.
STOP_STAGES = (("kube-controller-manager", "kube-apiserver"), ("etcd",))
_HAVE_PROC = Path("/proc/self/cmdline").exists()

_OPENSSL_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1,DNS:localhost
[client]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = clientAuth
"""
# name -> (subject, extensions section). system:masters is the group RBAC always lets do everything.
_CERTIFICATES = {
    "apiserver": ("/CN=kube-apiserver", "server"),
    "admin": ("/O=system:masters/CN=admin", "client"),
    # With --use-service-account-credentials=false every controller acts as this one identity, so it
    # needs every controller's permissions: the garbage collector alone may delete anything.
    "controller-manager": ("/O=system:masters/CN=system:kube-controller-manager", "client"),
}


class ControlPlaneError(RuntimeError):
    """The control plane failed to start; the message carries the failing process's log tail."""


def _free_ports(count: int) -> list[int]:
    """Ports the OS considers free; all sockets stay bound until all are chosen, so the ports differ."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind((LOOPBACK, 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


def _openssl(args: list[str], cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ControlPlaneError(f"openssl {' '.join(args)} failed:\n{proc.stderr.strip()}")


def _make_pki(pki: Path) -> None:
    """A CA, the certificates in ``_CERTIFICATES`` and the service-account key pair (all P-256: fast)."""
    pki.mkdir(parents=True, exist_ok=True)
    (pki / "openssl.cnf").write_text(_OPENSSL_CONFIG)
    new_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    key = [*new_key, "-days", "365", "-config", "openssl.cnf"]
    ca = ["-subj", "/CN=llmgw-local-ca", "-keyout", "ca.key", "-out", "ca.crt"]
    _openssl(["req", "-x509", *key, "-extensions", "ca", *ca], pki)
    sign = ["-CA", "ca.crt", "-CAkey", "ca.key"]
    for name, (subject, extensions) in _CERTIFICATES.items():
        out = ["-keyout", f"{name}.key", "-out", f"{name}.crt"]
        _openssl(["req", "-x509", *key, "-extensions", extensions, "-subj", subject, *sign, *out], pki)
    _openssl(["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "sa.key"], pki)
    _openssl(["pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub"], pki)


def _write_kubeconfig(path: Path, server: str, pki: Path, user: str) -> None:
    """A self-contained kubeconfig (certificates inline), readable only by its owner: it is a master key."""

    def inline(name: str) -> str:
        return base64.b64encode((pki / name).read_bytes()).decode()

    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": CONTEXT, "cluster": {"server": server, "certificate-authority-data": inline("ca.crt")}}
        ],
        "users": [
            {
                "name": user,
                "user": {
                    "client-certificate-data": inline(f"{user}.crt"),
                    "client-key-data": inline(f"{user}.key"),
                },
            }
        ],
        "contexts": [{"name": CONTEXT, "context": {"cluster": CONTEXT, "user": user}}],
        "current-context": CONTEXT,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.chmod(0o600)  # in case the file was already there
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def _is_ours(pid: int, marker: str) -> bool:
    """Whether ``pid`` is alive and is one of our processes (its command line names our state directory).

    Pids come back from a file written by another ``llmgw`` run, and pids get reused: never signal a process
    only because it has a recorded pid. Zombies have an empty command line, so they count as gone.
    """
    if not _HAVE_PROC:  # macOS: trust the pid
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True
    try:
        return marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # gone, possibly between open and read
        return False


class ControlPlane:
    """etcd + kube-apiserver (+ kube-controller-manager when available) on 127.0.0.1, state in ``state_dir``.

    ``crds`` are CustomResourceDefinition manifests to create before the controllers start. ``detached``
    processes get their own session, so they outlive the Python process that started them (``llmgw cluster
    up``); otherwise they share its process group, and Ctrl-C (or ``timeout``) stops them too.
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        binaries: k8s_build.Binaries | None = None,
        kubeconfig: Path | None = None,
        crds: Sequence[Path] = (),
        detached: bool = False,
    ) -> None:
        self.state_dir = state_dir.resolve()
        self.kubeconfig = (kubeconfig or self.state_dir / "kubeconfig").resolve()
        self.binaries = binaries
        self.crds = tuple(crds)
        self.detached = detached
        self.pki = self.state_dir / "pki"
        self.apiserver_port = 0
        self.etcd_port = 0
        self.pids: dict[str, int] = {}
        self.startup_seconds = 0.0
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self._ssl: ssl.SSLContext | None = None

    @property
    def server(self) -> str:
        return f"https://{LOOPBACK}:{self.apiserver_port}"

    def log_path(self, process: str) -> Path:
        return self.state_dir / f"{process}.log"

    def token_kubeconfig(self, path: Path, token: str, user: str = "token-user") -> Path:
        """A kubeconfig that authenticates with a bearer token (e.g. a ServiceAccount's, from
        ``kubectl create token``): how to run a client with exactly that account's permissions."""
        ca = base64.b64encode((self.pki / "ca.crt").read_bytes()).decode()
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {"name": CONTEXT, "cluster": {"server": self.server, "certificate-authority-data": ca}}
            ],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": CONTEXT, "context": {"cluster": CONTEXT, "user": user}}],
            "current-context": CONTEXT,
        }
        path.touch(mode=0o600)
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    @property
    def audit_log(self) -> Path:
        """The API server's audit log: one JSON line per request (who, verb, resource), no bodies."""
        return self.state_dir / "audit.log"

    def audit_events(self) -> list[dict[str, Any]]:
        """The audit log's entries so far (for tests and benchmarks that count API calls)."""
        if not self.audit_log.exists():
            return []
        return [json.loads(line) for line in self.audit_log.read_text().splitlines() if line.strip()]

    # -- lifecycle ---------------------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> None:
        """Start every process and return once the API server is ready and controllers run.

        On failure everything started so far is stopped, and the error carries the failing process's log.
        """
        started = time.monotonic()
        deadline = started + timeout
        binaries = self.binaries = self.binaries or k8s_build.ensure()
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            _make_pki(self.pki)
            self.etcd_port, peer_port, self.apiserver_port = _free_ports(3)
            self._save()
            self._start_etcd(binaries.etcd, peer_port, deadline)
            self._start_apiserver(binaries.kube_apiserver, deadline)
            _write_kubeconfig(self.kubeconfig, self.server, self.pki, "admin")
            self._install_crds(deadline)
            if binaries.kube_controller_manager is not None:
                self._start_controller_manager(binaries.kube_controller_manager, deadline)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started

    def _start_etcd(self, etcd: Path, peer_port: int, deadline: float) -> None:
        client, peer = f"http://{LOOPBACK}:{self.etcd_port}", f"http://{LOOPBACK}:{peer_port}"
        self._spawn(
            "etcd",
            [
                str(etcd),
                "--name=llmgw",
                f"--data-dir={self.state_dir / 'etcd'}",
                f"--listen-client-urls={client}",
                f"--advertise-client-urls={client}",
                # The peer port must be set even for one member: the default (2380) would clash between two
                # control planes on one machine.
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=llmgw={peer}",
                "--unsafe-no-fsync=true",  # throwaway data; fsync dominates write latency on slow disks
                # A lone member needs no failure detection: elect it at once (0.05 s, not 0.5 s).
                "--heartbeat-interval=10",
                "--election-timeout=100",
                "--log-level=warn",
            ],
        )
        self._wait("etcd", lambda: self._get(f"{client}/health") == 200, deadline)

    def _start_apiserver(self, apiserver: Path, deadline: float) -> None:
        pki = self.pki
        policy = self.state_dir / "audit-policy.yaml"
        policy.write_text(_AUDIT_POLICY)
        self._spawn(
            "kube-apiserver",
            [
                str(apiserver),
                f"--etcd-servers=http://{LOOPBACK}:{self.etcd_port}",
                f"--bind-address={LOOPBACK}",
                f"--advertise-address={LOOPBACK}",
                f"--secure-port={self.apiserver_port}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                "--authorization-mode=RBAC",
                f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                "--service-cluster-ip-range=10.96.0.0/16",  # room for thousands of Services (benchmarks)
                "--allow-privileged=true",
                f"--audit-policy-file={policy}",
                f"--audit-log-path={self.audit_log}",
                "--audit-log-format=json",
                "--audit-log-maxsize=200",
                "--audit-log-mode=batch",
                "--audit-log-batch-max-wait=1s",
                *self._admission_flags(),
            ],
        )
        self._wait("kube-apiserver", lambda: self._get(f"{self.server}/readyz") == 200, deadline)

    def _admission_flags(self) -> list[str]:
        """ServiceAccount admission rejects Pods until their namespace's ``default`` ServiceAccount exists.

        The serviceaccount controller creates it, so keep the admission (Pods then look as in a real cluster)
        only when kube-controller-manager runs.
        """
        assert self.binaries is not None
        if self.binaries.kube_controller_manager is None:
            return ["--disable-admission-plugins=ServiceAccount"]
        return []

    def _install_crds(self, deadline: float) -> None:
        """Create the CustomResourceDefinitions in ``crds`` and wait until they are established.

        This happens before kube-controller-manager starts because its garbage collector rediscovers
        resources only every 30 s: for a CRD created later, deleting a custom resource leaves its dependents
        in place for up to that long.
        """
        url = f"{self.server}/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
        names: list[str] = []
        for path in self.crds:
            for crd in yaml.safe_load_all(path.read_text()):
                if crd is None:
                    continue
                status, body = self._request(url, crd)
                if status != 201:
                    raise ControlPlaneError(f"creating the CRD in {path} failed ({status}): {body.decode()}")
                names.append(crd["metadata"]["name"])
        for name in names:
            established = functools.partial(self._crd_established, f"{url}/{name}")
            self._wait("kube-apiserver", established, deadline, what=f"CRD {name}")

    def _crd_established(self, url: str) -> bool:
        status, body = self._request(url)
        if status != 200:
            return False
        # A new CRD's status starts out as conditions: null.
        conditions = (json.loads(body).get("status") or {}).get("conditions") or []
        return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)

    def _start_controller_manager(self, kcm: Path, deadline: float) -> None:
        kubeconfig = self.pki / "controller-manager.kubeconfig"
        _write_kubeconfig(kubeconfig, self.server, self.pki, "controller-manager")
        self._spawn(
            "kube-controller-manager",
            [
                str(kcm),
                f"--kubeconfig={kubeconfig}",
                f"--controllers={','.join(CONTROLLERS)}",
                "--use-service-account-credentials=false",
                "--leader-elect=false",
                f"--service-account-private-key-file={self.pki / 'sa.key'}",
                f"--root-ca-file={self.pki / 'ca.crt'}",
                "--secure-port=0",  # no health endpoint needed, and no third port to pick
            ],
        )
        # The serviceaccount controller creating default/default proves controllers run and have synced.
        self._wait("kube-controller-manager", lambda: self.has_default_service_account("default"), deadline)

    def _spawn(self, name: str, argv: list[str]) -> None:
        with self.log_path(name).open("ab") as log:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=self.detached,
            )
        self._children[proc.pid] = proc
        self.pids[name] = proc.pid
        self._save()

    def _wait(self, name: str, ready: Callable[[], bool], deadline: float, what: str = "") -> None:
        """Poll ``ready`` until ``deadline``; on failure show the log of the dead process, or of ``name``."""
        while not ready():
            for process, pid in self.pids.items():
                if not self._alive(pid):
                    log = self.log_path(process)
                    raise ControlPlaneError(f"{process} exited while starting; {log}:\n{_tail(log)}")
            if time.monotonic() > deadline:
                log = self.log_path(name)
                raise ControlPlaneError(f"{what or name} not ready in time; {log}:\n{_tail(log)}")
            time.sleep(0.1)

    def stop(self, remove_data: bool = False, timeout: float = 15.0) -> None:
        """SIGTERM the processes stage by stage, SIGKILL what is left after ``timeout``.

        ``remove_data`` deletes etcd's data; certificates, logs and the kubeconfig stay.
        """
        for stage in STOP_STAGES:
            pids = [self.pids[name] for name in stage if name in self.pids and self._alive(self.pids[name])]
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):  # it may exit on its own meanwhile
                    os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while any(self._alive(pid) for pid in pids) and time.monotonic() < deadline:
                time.sleep(0.05)
            for pid in pids:
                if self._alive(pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        for child in self._children.values():
            child.wait()
        self._children.clear()
        self.pids.clear()
        if self.state_dir.is_dir():
            self._save()
        if remove_data:
            shutil.rmtree(self.state_dir / "etcd", ignore_errors=True)

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop(remove_data=True)

    # -- state -------------------------------------------------------------------------------------------

    def _save(self) -> None:
        state = {
            "apiserver_port": self.apiserver_port,
            "etcd_port": self.etcd_port,
            "kubeconfig": str(self.kubeconfig),
            "pids": self.pids,
        }
        (self.state_dir / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")

    @classmethod
    def load(cls, state_dir: Path) -> ControlPlane | None:
        """The control plane recorded in ``state_dir`` (running or not), or None if there is none."""
        try:
            state = json.loads((state_dir / STATE_FILE).read_text())
        except FileNotFoundError:
            return None
        plane = cls(state_dir, kubeconfig=Path(state["kubeconfig"]))
        plane.apiserver_port, plane.etcd_port = state["apiserver_port"], state["etcd_port"]
        plane.pids = {name: int(pid) for name, pid in state["pids"].items()}
        return plane

    # -- health ------------------------------------------------------------------------------------------

    def _alive(self, pid: int) -> bool:
        child = self._children.get(pid)
        if child is not None:  # our child: poll() also reaps it once it exits
            return child.poll() is None
        return _is_ours(pid, str(self.state_dir))

    def dead_processes(self) -> list[str]:
        """Recorded processes that are no longer running."""
        return [name for name, pid in self.pids.items() if not self._alive(pid)]

    def ready(self) -> bool:
        """Whether all recorded processes run and the API server answers ``/readyz`` with 200."""
        return bool(self.pids) and not self.dead_processes() and self._get(f"{self.server}/readyz") == 200

    def has_default_service_account(self, namespace: str) -> bool:
        return self._get(f"{self.server}/api/v1/namespaces/{namespace}/serviceaccounts/default") == 200

    def _get(self, url: str) -> int:
        return self._request(url)[0]

    def _request(self, url: str, body: Any = None) -> tuple[int, bytes]:
        """GET, or POST ``body`` as JSON, as admin for the API server; status 0 when nothing answers."""
        if url.startswith("https:") and self._ssl is None:
            self._ssl = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
            self._ssl.load_cert_chain(self.pki / "admin.crt", self.pki / "admin.key")
        request = urllib.request.Request(url)
        if body is not None:
            request.data = json.dumps(body).encode()
            request.add_header("Content-Type", "application/json")
        context = self._ssl if url.startswith("https:") else None
        try:
            with urllib.request.urlopen(request, timeout=5, context=context) as response:
                return int(response.status), response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except OSError:
            return 0, b""


# -- llmgw cluster up|down|status -------------------------------------------------------------------------


def _cluster_dir(directory: Path) -> Path:
    return directory / "cluster"


def up(directory: Path = DEFAULT_DIR) -> int:
    """Start a control plane in the background under ``directory`` (building binaries on first use)."""
    state_dir, kubeconfig = _cluster_dir(directory), directory / "kubeconfig"
    existing = ControlPlane.load(state_dir)
    if existing is not None and existing.ready():
        print(f"control plane already running at {existing.server}")
        _print_usage(existing.kubeconfig)
        return 0
    if existing is not None:
        print(f"cleaning up a control plane that is no longer running in {existing.state_dir}")
        existing.stop()
    shutil.rmtree(state_dir, ignore_errors=True)
    binaries = k8s_build.ensure(lambda line: print(line, flush=True))
    plane = ControlPlane(state_dir, binaries=binaries, kubeconfig=kubeconfig, detached=True)
    print(f"starting the control plane on {LOOPBACK} (logs in {plane.state_dir})", flush=True)
    plane.start()
    print(f"control plane ready at {plane.server} in {plane.startup_seconds:.1f}s")
    _print_usage(plane.kubeconfig)
    return 0


def _print_usage(kubeconfig: Path) -> None:
    print(f"kubeconfig: {kubeconfig}")
    print(f"  export KUBECONFIG={kubeconfig}")


def down(directory: Path = DEFAULT_DIR) -> int:
    """Stop the background control plane and delete its state (data, certificates, logs, kubeconfig)."""
    state_dir = _cluster_dir(directory)
    plane = ControlPlane.load(state_dir)
    if plane is None:
        print(f"no control plane in {state_dir}")
        return 0
    plane.stop()
    shutil.rmtree(state_dir, ignore_errors=True)
    plane.kubeconfig.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # keep the directory if anything else lives there
        directory.rmdir()
    print(f"control plane stopped; removed {plane.state_dir} and {plane.kubeconfig}")
    return 0


def status(directory: Path = DEFAULT_DIR) -> int:
    """Print whether the background control plane runs; non-zero exit when it does not."""
    plane = ControlPlane.load(_cluster_dir(directory))
    if plane is None:
        print(f"not running: no control plane in {_cluster_dir(directory)}")
        return 1
    if plane.ready():
        pids = ", ".join(f"{name} {pid}" for name, pid in plane.pids.items())
        print(f"running at {plane.server} (pids: {pids})")
        _print_usage(plane.kubeconfig)
        return 0
    dead = plane.dead_processes()
    if not plane.pids:
        reason = "stopped"
    elif dead:
        reason = f"{', '.join(dead)} exited"
    else:
        reason = "the API server is not ready"
    print(f"not running: {reason} (logs in {plane.state_dir}; `llmgw cluster down` cleans up)")
    return 1


def run(action: str, directory: Path = DEFAULT_DIR) -> int:
    """Entry point of ``llmgw cluster <action>``."""
    actions = {"up": up, "down": down, "status": status}
    try:
        return actions[action](directory)
    except (ControlPlaneError, k8s_build.BuildError) as exc:
        print(f"llmgw cluster {action}: {exc}", file=sys.stderr)
        return 1
