"""A local kubelet: runs the proxy pods of one namespace as plain processes on loopback IPs.

What a kubelet does
-------------------
A kubelet is the node agent of Kubernetes. It registers a Node object and keeps its status (conditions,
addresses, capacity) current; it watches the Pods bound to its node (the scheduler binds them); for each
one it asks the container runtime for a sandbox with its own network namespace and IP, pulls the images,
mounts the volumes (ConfigMap and Secret volumes are written with an "atomic writer": a timestamped
directory, a ``..data`` symlink swapped in one ``rename``, and one symlink per key through ``..data``),
resolves the environment (literal values, Secret and ConfigMap keys, the downward API), starts the
containers in cgroups, runs their probes, and reports all of it in the Pod's status (phase, pod IP,
container states, restart counts, the ``Ready`` condition that Services and Deployments act on). It restarts
exited containers by ``restartPolicy`` with a crash-loop backoff, restarts containers whose liveness probe
fails, refreshes ConfigMap and Secret volumes when the objects change (after its sync period and cache
TTL, typically up to 60-90 s), and when a Pod is deleted it sends SIGTERM, waits up to the grace period,
sends SIGKILL, cleans up, and finalizes the deletion (``DELETE`` with ``gracePeriodSeconds=0``).

What this one emulates
----------------------
:class:`LocalKubelet` does the above for the pods of one namespace on this machine, enough for the pods of
the operator's Deployment (:func:`llmgw_operator.manifests.build_deployment`), so that Deployments, rolling
updates, readiness and ConfigMap hot reloads work end to end against a real control plane
(:mod:`llmgw_dev.cluster`), which has no scheduler and no kubelets:

- registers Node ``node_name`` (Ready, InternalIP 127.0.0.1; no node-lifecycle controller runs, so no
  heartbeats), and on :meth:`LocalKubelet.stop` marks it NotReady;
- is its own scheduler: binds unscheduled pods of the default scheduler whose ``nodeSelector`` matches
  the node's labels (``pods/binding``); affinity, taints and resources are not considered;
- gives every pod its own loopback IP (``pod_ip_base`` + 1..254, lowest free first, reused once the pod is
  gone, skipped when another process already listens on one of the pod's ports there) as podIP;
- writes configMap and secret volumes under ``workdir/pods/<pod-uid>/volumes/<volume>/`` with the atomic
  writer layout above (secret files mode 0600, whatever ``defaultMode`` asks; the pod directory is 0700),
  and emptyDir volumes as plain directories;
- resolves ``env``: ``value``, ``valueFrom.secretKeyRef`` and ``configMapKeyRef`` (with ``optional``), and
  ``fieldRef`` (metadata.name/namespace/uid, spec.nodeName/serviceAccountName, status.podIP/hostIP);
- runs the container as a process: the image is ignored, its ENTRYPOINT is taken to be ``llmgw``, so the
  command line is ``llmgw_executable`` + the container's ``args``, where every argument naming a path under
  a volume mount (``/etc/llmgw/config.yaml``, also ``--flag=/etc/llmgw/...``) is rewritten to the
  materialized directory. The environment is the resolved env plus ``HOSTNAME``, ``PATH``,
  ``LLMGW_LISTEN_HOST=<pod IP>`` (the proxy then binds its three ports on the pod IP) and ``TMPDIR`` when a
  volume is mounted at ``/tmp``; stdout and stderr go to ``workdir/pods/<uid>/<container>.log``, kept as
  ``workdir/logs/<pod>_<uid>.log`` after the pod is gone;
- probes: ``httpGet`` and ``tcpSocket`` readiness and liveness probes against the pod IP, named or numbered
  ports, with ``initialDelaySeconds``, ``timeoutSeconds``, ``successThreshold`` and ``failureThreshold``;
  readiness ``periodSeconds`` is capped at ``probe_period_cap`` (1 s) so tests see Ready quickly, liveness
  keeps its period so a slow start is never mistaken for a hang. Liveness failure: the process is stopped
  (SIGTERM, grace period, SIGKILL) and restarted;
- status: phase, podIP(s), hostIP(s), startTime, conditions PodReadyToStartContainers/Initialized/
  ContainersReady/Ready/PodScheduled, and the container's status (ready, started,
  restartCount, state running/waiting/terminated, lastState). The status is patched only when it changes,
  so an idle pod costs no writes;
- restarts: ``restartPolicy`` Always/OnFailure/Never, with a crash-loop backoff from ``restart_backoff``
  doubling to ``max_restart_backoff`` (a real kubelet: 10 s to 5 min), waiting state ``CrashLoopBackOff``;
- ConfigMap and Secret changes: watched in the namespace; the volumes of the pods that mount them are
  rewritten after ``config_sync_delay`` seconds (default 0 for tests; a real kubelet takes up to about a
  minute or more). Unchanged contents are not rewritten. Environment variables are never refreshed in a
  running process, as in Kubernetes: a rotated Secret reaches env only when the pod is replaced (the
  operator rolls the Deployment for that) or the container restarts;
- deletion: SIGTERM to the process group, up to the deletion grace period (at least 2 s), SIGKILL, the pod
  directory removed (Secret files included), then ``DELETE`` with ``gracePeriodSeconds=0``. A force-deleted
  pod is killed the same way. The ReplicaSet controller's replacements are picked up like any new pod.

Every wait is bounded: API requests time out (10 s), watches are re-established every ``watch_timeout``
seconds and relisted with backoff after an error, process kills escalate to SIGKILL, and ``stop`` cancels
what outlives the longest grace period.

What it doesn't do
------------------
No images, no container runtime, no cgroups, no resource limits, no user or filesystem isolation
(``securityContext`` is ignored; the process runs as the calling user and sees the whole filesystem), no
network namespaces: a pod is a loopback IP, reachable only from this machine, with no Service VIPs,
DNS or kube-proxy. One container per pod; no init or ephemeral containers, ``envFrom``, ``$(VAR)``
expansion, ``subPath`` mounts, startup probes, exec/gRPC probes, lifecycle hooks, ``command`` other than
``llmgw``, service-account token volumes, image pull secrets, events, node leases or heartbeats: a pod
using one of these waits with ``CreateContainerConfigError`` naming it rather than running wrongly.
Paths *inside* files are not rewritten: a proxy config naming ``/etc/llmgw/tls/tls.crt`` (the operator's
``tlsSecretName``) cannot find the certificate here, so run TLS-less gateways on this kubelet.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import dataclasses
import datetime
import logging
import os
import platform
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import AsyncGenerator, Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import aiohttp
import msgspec
from lightkube import ApiError, AsyncClient, KubeConfig, codecs
from lightkube.core.resource import NamespacedResource
from lightkube.models.core_v1 import ObjectReference
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import ConfigMap, NodeStatus, Pod, PodStatus, Secret
from lightkube.types import PatchType

from llmgw_common.config import LISTEN_HOST_ENV, is_loopback

log = logging.getLogger("llmgw.local_kubelet")

DEFAULT_SCHEDULER = "default-scheduler"
FIELD_MANAGER = "llmgw-local-kubelet"
HOST_IP = "127.0.0.1"
ENTRYPOINT = "llmgw"  # the proxy image's ENTRYPOINT
MIN_KILL_GRACE_S = 2.0  # as the kubelet: even a force-deleted pod gets a moment to exit
API_TIMEOUT_S = 10.0
WATCH_BACKOFF_S = (0.5, 10.0)
PREPARE_BACKOFF_S = (0.5, 10.0)
FINALIZE_ATTEMPTS = 8
STATUS_RETRY_S = 1.0
TERMINATIONS_KEPT = 1000
# The conditions this kubelet writes (it is the scheduler too); others (DisruptionTarget...) are kept as is.
MANAGED_CONDITIONS = ("PodScheduled", "PodReadyToStartContainers", "Initialized", "ContainersReady", "Ready")
SUPPORTED_VOLUMES = ("configMap", "secret", "emptyDir")


class PodError(Exception):
    """Why a container cannot start (yet): shown as its waiting ``reason`` and ``message``, then retried."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclasses.dataclass(frozen=True)
class LocalPod:
    """A snapshot of one pod this kubelet runs (see :attr:`LocalKubelet.pods`)."""

    namespace: str
    name: str
    uid: str
    ip: str | None
    pid: int | None
    ready: bool
    restart_count: int
    directory: Path
    log_path: Path


@dataclasses.dataclass(frozen=True)
class Termination:
    """One container process that ended: why it was stopped, the signals sent and how it exited."""

    pod: str
    uid: str
    pid: int
    reason: str  # "Exited" (on its own), "PodDeleted", "LivenessProbeFailed" or "KubeletStopped"
    signals: tuple[str, ...]  # what the kubelet sent: (), ("SIGTERM",) or ("SIGTERM", "SIGKILL")
    returncode: int  # as Popen: negative for a signal
    seconds: float  # from the first signal (or the end of the process, when none was sent) to its exit


@dataclasses.dataclass(frozen=True)
class Probe:
    """A readiness or liveness probe, resolved against the pod IP."""

    url: str | None  # httpGet
    tcp: tuple[str, int] | None  # tcpSocket
    headers: tuple[tuple[str, str], ...]
    initial_delay_s: float
    period_s: float
    timeout_s: float
    success_threshold: int
    failure_threshold: int
    grace_s: float | None  # probe-level terminationGracePeriodSeconds (liveness)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ------------------------------------------------------------------------------------------ pod spec checks


def unsupported(pod: Mapping[str, Any]) -> str | None:
    """What in ``pod`` this kubelet cannot run faithfully, or None."""
    spec = pod.get("spec", {})
    containers = spec.get("containers", [])
    if len(containers) != 1:
        return f"exactly one container is supported, the pod has {len(containers)}"
    for key in ("initContainers", "ephemeralContainers"):
        if spec.get(key):
            return f"spec.{key} is not supported"
    if spec.get("hostNetwork"):
        return "spec.hostNetwork is not supported"
    for volume in spec.get("volumes", []):
        kinds = [k for k in volume if k != "name"]
        if not kinds or kinds[0] not in SUPPORTED_VOLUMES:
            return f"volume {volume.get('name')!r}: only {', '.join(SUPPORTED_VOLUMES)} volumes are supported"
    container = containers[0]
    command = container.get("command")
    if command and os.path.basename(command[0]) != ENTRYPOINT:
        return f"container {container['name']}: command must start with {ENTRYPOINT}, got {command[0]!r}"
    for key in ("envFrom", "workingDir", "startupProbe", "lifecycle"):
        if container.get(key):
            return f"container {container['name']}: {key} is not supported"
    for mount in container.get("volumeMounts", []):
        if mount.get("subPath") or mount.get("subPathExpr"):
            return f"container {container['name']}: volumeMount {mount['name']!r}: subPath is not supported"
    for kind in ("readinessProbe", "livenessProbe"):
        probe = container.get(kind)
        if probe and not ("httpGet" in probe or "tcpSocket" in probe):
            return f"container {container['name']}: {kind}: only httpGet and tcpSocket probes are supported"
    for item in container.get("env", []):
        source = item.get("valueFrom") or {}
        if source and not {"secretKeyRef", "configMapKeyRef", "fieldRef"} & set(source):
            return (
                f"container {container['name']}: env {item['name']}: "
                "only secretKeyRef, configMapKeyRef and fieldRef are supported"
            )
    return None


def container_port(container: Mapping[str, Any], port: int | str) -> int:
    """A probe's ``port``: a number, or the name of one of the container's ports."""
    if isinstance(port, int):
        return port
    for entry in container.get("ports", []):
        if entry.get("name") == port:
            return int(entry["containerPort"])
    raise PodError("CreateContainerConfigError", f"probe port {port!r} is not a port of the container")


def parse_probe(
    raw: Mapping[str, Any] | None, container: Mapping[str, Any], pod_ip: str, period_cap: float | None
) -> Probe | None:
    if not raw:
        return None
    period = float(raw.get("periodSeconds", 10))
    if period_cap is not None:
        period = min(period, period_cap)
    common: dict[str, Any] = {
        "initial_delay_s": float(raw.get("initialDelaySeconds", 0)),
        "period_s": period,
        "timeout_s": float(raw.get("timeoutSeconds", 1)),
        "success_threshold": int(raw.get("successThreshold", 1)),
        "failure_threshold": int(raw.get("failureThreshold", 3)),
        "grace_s": raw.get("terminationGracePeriodSeconds"),
    }
    action = raw.get("httpGet") or raw.get("tcpSocket") or {}
    host = action.get("host") or pod_ip
    if not is_loopback(host):
        raise PodError("CreateContainerConfigError", f"probe host {host!r} is not a loopback address")
    port = container_port(container, action.get("port", 0))
    if "httpGet" in raw:
        scheme = str(action.get("scheme", "HTTP")).lower()
        path = action.get("path", "/")
        headers = tuple((h["name"], h["value"]) for h in action.get("httpHeaders", []))
        authority = f"[{host}]" if ":" in host else host
        return Probe(url=f"{scheme}://{authority}:{port}{path}", tcp=None, headers=headers, **common)
    return Probe(url=None, tcp=(host, port), headers=(), **common)


def rewrite_arg(arg: str, mounts: Mapping[str, str]) -> str:
    """``arg`` with a leading path under a mount (``/etc/llmgw/x``, ``--f=/etc/llmgw/x``) made a host path."""
    prefix, value = "", arg
    if arg.startswith("-") and "=" in arg:
        flag, _, value = arg.partition("=")
        prefix = f"{flag}="
    for mount_path in sorted(mounts, key=len, reverse=True):  # the innermost mount wins
        base = mount_path.rstrip("/") or "/"
        if value == base or value.startswith(base.rstrip("/") + "/"):
            return prefix + mounts[mount_path] + value[len(base.rstrip("/")) :]
    return arg


# ----------------------------------------------------------------------------------------- volume writer


Payload = Mapping[str, tuple[bytes, int]]  # relative path -> (content, mode)


def _safe_relpath(path: str, where: str) -> str:
    parts = path.split("/")
    if not path or path.startswith("/") or ".." in parts or parts[0].startswith(".."):
        raise PodError("ContainerCreating", f"{where}: invalid path {path!r}")
    return path


def _read_payload(data_dir: Path) -> dict[str, tuple[bytes, int]]:
    files: dict[str, tuple[bytes, int]] = {}
    for root, _dirs, names in os.walk(data_dir):
        for name in names:
            path = Path(root) / name
            files[str(path.relative_to(data_dir))] = (path.read_bytes(), path.stat().st_mode & 0o777)
    return files


def write_volume(target: Path, payload: Payload) -> bool:
    """Make ``target`` hold exactly ``payload``, the way the kubelet's atomic writer does; True if it changed.

    The files go to a new timestamped directory ``..2026_01_02_15_04_05.<random>``; then the ``..data``
    symlink is pointed at it with one ``rename`` (a reader sees the old set or the new set, never a mix);
    each top-level name is a symlink through ``..data`` (``config.yaml -> ..data/config.yaml``); the old
    directory and names no longer present are removed. An unchanged payload touches nothing.
    """
    target.mkdir(parents=True, exist_ok=True)
    data_link = target / "..data"
    if data_link.is_symlink() and _read_payload(data_link) == dict(payload):
        return False
    stamp = datetime.datetime.now(datetime.UTC).strftime("..%Y_%m_%d_%H_%M_%S.")
    new_dir = Path(tempfile.mkdtemp(prefix=stamp, dir=target))
    for rel, (content, mode) in payload.items():
        path = new_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        os.chmod(path, mode)
    os.chmod(new_dir, 0o755)
    old = os.readlink(data_link) if data_link.is_symlink() else None
    tmp_link = target / "..data_tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp_link.unlink()
    os.symlink(new_dir.name, tmp_link)
    os.replace(tmp_link, data_link)
    top = {rel.split("/", 1)[0] for rel in payload}
    for name in top:
        if not (target / name).is_symlink():
            os.symlink(f"..data/{name}", target / name)
    for entry in target.iterdir():
        if not entry.name.startswith("..") and entry.name not in top and entry.is_symlink():
            entry.unlink()
    if old and old != new_dir.name:
        shutil.rmtree(target / old, ignore_errors=True)
    return True


def _decode(data: Mapping[str, str] | None, binary: Mapping[str, str] | None = None) -> dict[str, bytes]:
    out = {key: base64.b64decode(value) for key, value in (binary or {}).items()}
    out.update({key: value.encode() for key, value in (data or {}).items()})
    return out


# ----------------------------------------------------------------------------------------- loopback IPs


class LoopbackIPs:
    """Hands out ``base`` + 1..254, one per pod, lowest free first, skipping IPs where a pod port is taken."""

    def __init__(self, base: str) -> None:
        first = f"{base}1"
        if not base.endswith(".") or not is_loopback(first) or base.count(".") != 3:
            raise ValueError(f"pod_ip_base: must be like '127.0.1.' (a loopback /24), got {base!r}")
        self.base = base
        self.owners: dict[str, str] = {}  # ip -> pod uid

    def allocate(self, uid: str, ports: list[int]) -> str:
        for ip, owner in self.owners.items():
            if owner == uid:
                return ip
        for n in range(1, 255):
            ip = f"{self.base}{n}"
            if ip not in self.owners and all(_bindable(ip, port) for port in ports):
                self.owners[ip] = uid
                return ip
        raise PodError("ContainerCreating", f"no free loopback IP in {self.base}0/24 for ports {ports}")

    def release(self, uid: str) -> None:
        for ip in [ip for ip, owner in self.owners.items() if owner == uid]:
            del self.owners[ip]


def _bindable(ip: str, port: int) -> bool:
    """Whether a server could bind ``ip:port`` now (with SO_REUSEADDR, as servers do: TIME_WAIT is fine)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((ip, port))
        except OSError:
            return False
    return True


# ---------------------------------------------------------------------------------------------- one pod


class _PodRunner:
    """Everything the kubelet does for one pod, from binding to finalizing its deletion."""

    def __init__(self, kubelet: LocalKubelet, pod: dict[str, Any]) -> None:
        self.kubelet = kubelet
        self.pod = pod
        meta = pod["metadata"]
        self.uid: str = meta["uid"]
        self.name: str = meta["name"]
        self.namespace: str = meta["namespace"]
        self.dir = kubelet.workdir / "pods" / self.uid
        self.ip: str | None = None
        self.process: asyncio.subprocess.Process | None = None
        self.deleting = asyncio.Event()  # deletionTimestamp set, the object gone, or the kubelet stopping
        self.vanished = False  # the API object is gone (DELETED event or missing from a relist)
        self.stopping = False  # the kubelet stops: kill the process, keep the pod object
        self.finalized = False
        self.task: asyncio.Task[None] | None = None
        # Container state, as reported in containerStatuses[0].
        status = pod.get("status", {})
        previous = (status.get("containerStatuses") or [{}])[0]
        had_instance = bool(previous.get("state", {}).keys() & {"running", "terminated"})
        self.restart_count = int(previous.get("restartCount", 0)) + (1 if had_instance else 0)
        self.ever_started = False
        self.state: dict[str, Any] = {"waiting": {"reason": "ContainerCreating"}}
        self.last_state: dict[str, Any] = {}
        self.ready = False
        self.phase = "Pending"
        self.start_time: str = status.get("startTime") or _now()
        self.readiness: Probe | None = None
        self.liveness: Probe | None = None
        self._transitions: dict[str, tuple[str, str]] = {
            c["type"]: (c["status"], c.get("lastTransitionTime") or _now())
            for c in status.get("conditions", [])
            if c.get("type") in MANAGED_CONDITIONS
        }
        self._last_status: dict[str, Any] | None = None
        self._status_lock = asyncio.Lock()
        self._status_retry: asyncio.Task[None] | None = None
        self._volume_lock = asyncio.Lock()
        self._volume_dirty = False
        self._volume_task: asyncio.Task[None] | None = None
        self._prepared = False

    # ---- inputs

    @property
    def spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = self.pod.get("spec", {})
        return spec

    @property
    def container(self) -> dict[str, Any]:
        container: dict[str, Any] = self.spec["containers"][0]
        return container

    @property
    def log_path(self) -> Path:
        return self.dir / f"{self.container.get('name', 'container')}.log"

    def update(self, pod: dict[str, Any]) -> None:
        self.pod = pod
        if pod["metadata"].get("deletionTimestamp"):
            self.deleting.set()

    def vanish(self) -> None:
        self.vanished = True
        self.deleting.set()

    def shut_down(self) -> None:
        self.stopping = True
        self.deleting.set()

    def volume_sources(self) -> set[tuple[str, str]]:
        refs = set()
        for volume in self.spec.get("volumes", []):
            if "configMap" in volume:
                refs.add(("ConfigMap", volume["configMap"]["name"]))
            elif "secret" in volume:
                refs.add(("Secret", volume["secret"]["secretName"]))
        return refs

    def snapshot(self) -> LocalPod:
        return LocalPod(
            namespace=self.namespace,
            name=self.name,
            uid=self.uid,
            ip=self.ip,
            pid=self.process.pid if self.process is not None and self.process.returncode is None else None,
            ready=self.ready,
            restart_count=self.restart_count,
            directory=self.dir,
            log_path=self.log_path,
        )

    # ---- lifecycle

    async def run(self) -> None:
        try:
            if self.spec.get("nodeName") != self.kubelet.node_name and not await self._bind():
                return
            await self._run_container()
            # As a kubelet: the pod's resources are reclaimed before its deletion is finalized.
            self._clean_up()
            if not self.stopping:
                await self._finalize()
        except Exception:
            log.exception("pod %s/%s: unexpected error; its process is stopped", self.namespace, self.name)
        finally:
            self._clean_up()

    def _clean_up(self) -> None:
        """Kill what still runs, stop the side tasks, remove the pod's files, free its IP (idempotent)."""
        self._kill_now()
        for task in (self._volume_task, self._status_retry):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
        _remove_pod_dir(self.dir, self.kubelet.workdir / "logs" / f"{self.name}_{self.uid}.log")
        self.kubelet.ips.release(self.uid)

    async def _bind(self) -> bool:
        """Bind the pod to this node (``pods/binding``, as a scheduler does); False when it is not ours."""
        client = self.kubelet.client
        binding = Pod.Binding(
            metadata=ObjectMeta(name=self.name, namespace=self.namespace, uid=self.uid),
            target=ObjectReference(apiVersion="v1", kind="Node", name=self.kubelet.node_name),
        )
        delay = PREPARE_BACKOFF_S[0]
        while True:
            try:
                await client.create(binding, self.name, namespace=self.namespace)
                bound = True
            except msgspec.ValidationError:
                # The API server answers a binding with a Status, which lightkube cannot decode as a
                # Binding; it checked the HTTP status first, so the binding was made.
                bound = True
            except ApiError as exc:
                if exc.status.code == 404:
                    return False
                bound = False
                if exc.status.code != 409:  # 409: bound meanwhile; the read below tells to which node
                    log.warning("pod %s/%s: binding failed: %s", self.namespace, self.name, exc)
            except Exception as exc:
                bound = False
                log.warning("pod %s/%s: binding failed: %s", self.namespace, self.name, exc)
            if bound:
                log.info("pod %s/%s bound to node %s", self.namespace, self.name, self.kubelet.node_name)
                return True
            try:  # after a failure, the pod itself tells whether it is bound, and where
                current = await client.get(Pod, self.name, namespace=self.namespace)
            except ApiError as exc:
                if exc.status.code == 404:
                    return False
            except Exception as exc:
                log.warning("pod %s/%s: reading it failed: %s", self.namespace, self.name, exc)
            else:
                if current.metadata is None or current.metadata.uid != self.uid:
                    return False
                node = current.spec.nodeName if current.spec is not None else None
                if node:
                    return bool(node == self.kubelet.node_name)
            if self.deleting.is_set():
                return False
            await self._sleep_unless_deleting(delay)
            delay = min(delay * 2, PREPARE_BACKOFF_S[1])

    async def _run_container(self) -> None:
        kubelet = self.kubelet
        finished = self.pod.get("status", {}).get("phase")
        if finished in ("Succeeded", "Failed"):  # ran to completion before (restartPolicy Never/OnFailure)
            await self.deleting.wait()
            return
        prepare_delay = PREPARE_BACKOFF_S[0]
        crash_delay = kubelet.restart_backoff
        while not self.deleting.is_set():
            try:
                argv, env = await self._prepare()
            except PodError as exc:
                log.warning("pod %s/%s: %s: %s", self.namespace, self.name, exc.reason, exc.message)
                self.state = {"waiting": {"reason": exc.reason, "message": exc.message}}
                await self._publish()
                await self._sleep_unless_deleting(prepare_delay)
                prepare_delay = min(prepare_delay * 2, PREPARE_BACKOFF_S[1])
                continue
            prepare_delay = PREPARE_BACKOFF_S[0]
            began = time.monotonic()
            returncode = await self._run_once(argv, env)
            if self.deleting.is_set():
                return
            policy = self.spec.get("restartPolicy", "Always")
            if policy == "Never" or (policy == "OnFailure" and returncode == 0):
                self.phase = "Succeeded" if returncode == 0 else "Failed"
                await self._publish()
                await self.deleting.wait()
                return
            if time.monotonic() - began > 2 * kubelet.max_restart_backoff:
                crash_delay = kubelet.restart_backoff  # it ran well for a while: forget earlier crashes
            name = self.container["name"]
            self.state = {
                "waiting": {
                    "reason": "CrashLoopBackOff",
                    "message": f"back-off {crash_delay:g}s restarting failed container={name} "
                    f"pod={self.name}_{self.namespace}({self.uid})",
                }
            }
            await self._publish()
            await self._sleep_unless_deleting(crash_delay)
            crash_delay = min(crash_delay * 2, kubelet.max_restart_backoff)

    async def _prepare(self) -> tuple[list[str], dict[str, str]]:
        """Check the spec, take an IP, write the volumes, resolve env; the command line and environment."""
        problem = unsupported(self.pod)
        if problem:
            raise PodError("CreateContainerConfigError", f"llmgw local kubelet: {problem}")
        container = self.container
        if self.ip is None:
            ports = [
                int(p["containerPort"])
                for p in container.get("ports", [])
                if p.get("protocol", "TCP") == "TCP"
            ]
            self.ip = self.kubelet.ips.allocate(self.uid, ports)
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            await self._materialize_volumes()
            resolved = await self._resolve_env()
        except PodError:
            raise
        except Exception as exc:
            raise PodError(
                "ContainerCreating", f"reading the pod's ConfigMaps and Secrets failed: {exc}"
            ) from exc
        self._prepared = True
        self.readiness = parse_probe(
            container.get("readinessProbe"), container, self.ip, self.kubelet.probe_period_cap
        )
        self.liveness = parse_probe(container.get("livenessProbe"), container, self.ip, None)
        mounts = {
            m["mountPath"]: str(self.dir / "volumes" / m["name"]) for m in container.get("volumeMounts", [])
        }
        command = list(container.get("command") or [ENTRYPOINT])
        argv = [self.kubelet.llmgw_executable, *command[1:], *container.get("args", [])]
        argv = [argv[0], *(rewrite_arg(arg, mounts) for arg in argv[1:])]
        env = {"PATH": os.environ.get("PATH", os.defpath), "HOSTNAME": self.name, **resolved}
        env[LISTEN_HOST_ENV] = self.ip
        if "/tmp" in mounts:
            env["TMPDIR"] = mounts["/tmp"]
        return argv, env

    async def _run_once(self, argv: list[str], env: dict[str, str]) -> int:
        """Start the container's process and supervise it until it ends; its return code."""
        if self.ever_started:
            self.restart_count += 1
        with self.log_path.open("ab") as log_file:
            log_file.write(f"--- llmgw local kubelet: start {self.restart_count} at {_now()}\n".encode())
            log_file.flush()
            try:
                process = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=asyncio.subprocess.STDOUT,
                    env=env,
                    cwd=self.dir,
                    start_new_session=True,  # its own process group: signals reach any children too
                )
            except OSError as exc:
                self.state = {"waiting": {"reason": "RunContainerError", "message": str(exc)}}
                self.ever_started = True  # count the failed attempt like a crash
                await self._publish()
                return 128
        self.process = process
        self.ever_started = True
        started_at = _now()
        container_id = f"local://{process.pid}"
        self.state = {"running": {"startedAt": started_at}}
        self.phase = "Running"
        self.ready = False
        log.info("pod %s/%s: started pid %d on %s", self.namespace, self.name, process.pid, self.ip)
        await self._publish()
        reason, signals, seconds = await self._supervise(process)
        returncode = process.returncode if process.returncode is not None else -signal.SIGKILL
        self.process = None
        self.ready = False
        exit_code = 128 - returncode if returncode < 0 else returncode
        terminated: dict[str, Any] = {
            "exitCode": exit_code,
            "reason": "Completed" if exit_code == 0 else "Error",
            "startedAt": started_at,
            "finishedAt": _now(),
            "containerID": container_id,
        }
        if returncode < 0:
            terminated["signal"] = -returncode
        self.state = {"terminated": terminated}
        self.last_state = {"terminated": terminated}
        self.kubelet.terminations.append(
            Termination(self.name, self.uid, process.pid, reason, signals, returncode, seconds)
        )
        log.info(
            "pod %s/%s: pid %d ended (%s, exit code %d)",
            self.namespace,
            self.name,
            process.pid,
            reason,
            exit_code,
        )
        await self._publish()
        return returncode

    async def _supervise(self, process: asyncio.subprocess.Process) -> tuple[str, tuple[str, ...], float]:
        loop = asyncio.get_running_loop()
        exited = loop.create_task(process.wait())
        deleting = loop.create_task(self.deleting.wait())
        readiness = loop.create_task(self._readiness_loop(process))
        waits: set[asyncio.Task[Any]] = {exited, deleting}
        liveness = None
        if self.liveness is not None:
            liveness = loop.create_task(self._liveness_loop(self.liveness))
            waits.add(liveness)
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if exited in done:
                return "Exited", (), 0.0
            if deleting in done:
                reason = "KubeletStopped" if self.stopping else "PodDeleted"
                grace = self._deletion_grace()
            else:
                reason = "LivenessProbeFailed"
                assert self.liveness is not None
                grace = self.liveness.grace_s if self.liveness.grace_s is not None else self._pod_grace()
                log.warning("pod %s/%s: liveness probe failed, restarting", self.namespace, self.name)
            signals, seconds = await _kill(process, max(grace, MIN_KILL_GRACE_S))
            return reason, signals, seconds
        finally:
            for task in (exited, deleting, readiness, liveness):
                if task is not None and not task.done():
                    task.cancel()
            await asyncio.gather(
                *(t for t in (exited, deleting, readiness, liveness) if t is not None), return_exceptions=True
            )

    def _pod_grace(self) -> float:
        return float(self.spec.get("terminationGracePeriodSeconds", 30))

    def _deletion_grace(self) -> float:
        grace = self.pod["metadata"].get("deletionGracePeriodSeconds")
        return float(grace) if grace is not None else self._pod_grace()

    async def _readiness_loop(self, process: asyncio.subprocess.Process) -> None:
        probe = self.readiness
        if probe is None:
            self.ready = True
            await self._publish()
            return
        await asyncio.sleep(probe.initial_delay_s)
        successes = failures = 0
        while process.returncode is None:
            if await self.kubelet.probe(probe):
                successes, failures = successes + 1, 0
                if not self.ready and successes >= probe.success_threshold:
                    self.ready = True
                    log.info("pod %s/%s: ready", self.namespace, self.name)
                    await self._publish()
            else:
                successes, failures = 0, failures + 1
                if self.ready and failures >= probe.failure_threshold:
                    self.ready = False
                    log.info("pod %s/%s: not ready", self.namespace, self.name)
                    await self._publish()
            await asyncio.sleep(probe.period_s)

    async def _liveness_loop(self, probe: Probe) -> None:
        """Returns when the probe failed ``failureThreshold`` times in a row."""
        await asyncio.sleep(probe.initial_delay_s)
        failures = 0
        while failures < probe.failure_threshold:
            failures = 0 if await self.kubelet.probe(probe) else failures + 1
            if failures < probe.failure_threshold:
                await asyncio.sleep(probe.period_s)

    async def _finalize(self) -> None:
        """Delete the pod object for good (grace period 0), as a kubelet does once its containers are gone."""
        if self.vanished:
            self.finalized = True
            return
        client = self.kubelet.client
        delay = PREPARE_BACKOFF_S[0]
        for _ in range(FINALIZE_ATTEMPTS):
            try:
                current = await client.get(Pod, self.name, namespace=self.namespace)
                if current.metadata is None or current.metadata.uid != self.uid:
                    self.finalized = True
                    return
                await client.delete(Pod, self.name, namespace=self.namespace, grace_period=0)
                log.info("pod %s/%s: deleted", self.namespace, self.name)
                self.finalized = True
                return
            except ApiError as exc:
                if exc.status.code == 404:
                    self.finalized = True
                    return
                log.warning("pod %s/%s: final delete failed: %s", self.namespace, self.name, exc)
            except Exception as exc:
                log.warning("pod %s/%s: final delete failed: %s", self.namespace, self.name, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, PREPARE_BACKOFF_S[1])

    def _kill_now(self) -> None:
        """SIGKILL a process still running (the runner was cancelled or failed); never leave one behind."""
        process = self.process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)

    async def _sleep_unless_deleting(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.deleting.wait(), seconds)

    # ---- volumes and env

    async def _materialize_volumes(self) -> bool:
        changed = False
        async with self._volume_lock:
            for volume in self.spec.get("volumes", []):
                target = self.dir / "volumes" / volume["name"]
                if "emptyDir" in volume:
                    target.mkdir(mode=0o700, parents=True, exist_ok=True)
                    continue
                payload = await self._volume_payload(volume)
                changed |= write_volume(target, payload)
        return changed

    async def _volume_payload(self, volume: Mapping[str, Any]) -> dict[str, tuple[bytes, int]]:
        resource: type[NamespacedResource]
        if "configMap" in volume:
            source, kind, resource = volume["configMap"], "configmap", ConfigMap
            name = source["name"]
        else:
            source, kind, resource = volume["secret"], "secret", Secret
            name = source["secretName"]
        where = f'MountVolume.SetUp failed for volume "{volume["name"]}"'
        obj = await self.kubelet.get(resource, name)
        if obj is None:
            if source.get("optional"):
                return {}
            raise PodError("ContainerCreating", f'{where}: {kind} "{name}" not found')
        data = (
            _decode(obj.get("data"), obj.get("binaryData"))
            if kind == "configmap"
            else _decode(None, obj.get("data"))
        )
        default_mode = int(source.get("defaultMode", 0o644))
        items = source.get("items")
        chosen = (
            [(i["key"], i["path"], i.get("mode", default_mode)) for i in items]
            if items
            else [(key, key, default_mode) for key in data]
        )
        payload: dict[str, tuple[bytes, int]] = {}
        for key, path, mode in chosen:
            if key not in data:
                if source.get("optional"):
                    continue
                raise PodError("ContainerCreating", f'{where}: {kind} "{name}" has no key {key!r}')
            if kind == "secret":
                mode = int(mode) & 0o600 or 0o600  # never readable by other users of this machine
            payload[_safe_relpath(path, where)] = (data[key], int(mode) & 0o777)
        return payload

    async def _resolve_env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        fields = {
            "metadata.name": self.name,
            "metadata.namespace": self.namespace,
            "metadata.uid": self.uid,
            "spec.nodeName": self.kubelet.node_name,
            "spec.serviceAccountName": self.spec.get("serviceAccountName", "default"),
            "status.podIP": self.ip or "",
            "status.hostIP": HOST_IP,
        }
        for item in self.container.get("env", []):
            name, source = item["name"], item.get("valueFrom")
            if not source:
                env[name] = item.get("value", "")
                continue
            if "fieldRef" in source:
                path = source["fieldRef"]["fieldPath"]
                if path not in fields:
                    raise PodError(
                        "CreateContainerConfigError", f"env {name}: fieldPath {path!r} is not supported"
                    )
                env[name] = fields[path]
                continue
            kind, resource, ref = (
                ("secret", Secret, source["secretKeyRef"])
                if "secretKeyRef" in source
                else ("configmap", ConfigMap, source["configMapKeyRef"])
            )
            obj = await self.kubelet.get(resource, ref["name"])
            if obj is None:
                if ref.get("optional"):
                    continue
                raise PodError("CreateContainerConfigError", f'{kind} "{ref["name"]}" not found')
            data = (
                _decode(None, obj.get("data"))
                if kind == "secret"
                else _decode(obj.get("data"), obj.get("binaryData"))
            )
            if ref["key"] not in data:
                if ref.get("optional"):
                    continue
                raise PodError(
                    "CreateContainerConfigError",
                    f"couldn't find key {ref['key']} in {kind} {self.namespace}/{ref['name']}",
                )
            env[name] = data[ref["key"]].decode(errors="replace")
        return env

    def schedule_volume_sync(self) -> None:
        """A ConfigMap or Secret this pod mounts changed: rewrite its volumes after ``config_sync_delay``."""
        if not self._prepared or self.deleting.is_set():
            return
        self._volume_dirty = True
        if self._volume_task is None or self._volume_task.done():
            self._volume_task = asyncio.get_running_loop().create_task(self._sync_volumes())

    async def _sync_volumes(self) -> None:
        if self.kubelet.config_sync_delay > 0:
            await self._sleep_unless_deleting(self.kubelet.config_sync_delay)
        delay = PREPARE_BACKOFF_S[0]
        while self._volume_dirty and not self.deleting.is_set():
            self._volume_dirty = False
            try:
                if await self._materialize_volumes():
                    log.info("pod %s/%s: volumes updated", self.namespace, self.name)
            except PodError as exc:  # as the kubelet: keep the previous contents
                log.warning(
                    "pod %s/%s: volume update failed, keeping the old files: %s",
                    self.namespace,
                    self.name,
                    exc,
                )
            except Exception as exc:
                log.warning("pod %s/%s: volume update failed, retrying: %s", self.namespace, self.name, exc)
                self._volume_dirty = True
                await self._sleep_unless_deleting(delay)
                delay = min(delay * 2, PREPARE_BACKOFF_S[1])

    # ---- status

    def _condition(self, type_: str, value: bool, reason: str | None = None) -> dict[str, Any]:
        status = "True" if value else "False"
        previous = self._transitions.get(type_)
        if previous is None or previous[0] != status:
            previous = (status, _now())
            self._transitions[type_] = previous
        condition: dict[str, Any] = {"type": type_, "status": status, "lastTransitionTime": previous[1]}
        if reason and not value:
            condition["reason"] = reason
            condition["message"] = f"containers with unready status: [{self.container['name']}]"
        return condition

    def status(self) -> dict[str, Any]:
        """The pod status this kubelet reports now (conditions it does not manage excluded)."""
        ready = self.ready and self.process is not None
        container = self.container
        container_status: dict[str, Any] = {
            "name": container["name"],
            "image": container.get("image", ""),
            "imageID": "",
            "ready": ready,
            "started": self.process is not None,
            "restartCount": self.restart_count,
            "state": self.state,
            "lastState": self.last_state,
        }
        if self.process is not None:
            container_status["containerID"] = f"local://{self.process.pid}"
        status: dict[str, Any] = {
            "phase": self.phase,
            "hostIP": HOST_IP,
            "hostIPs": [{"ip": HOST_IP}],
            "startTime": self.start_time,
            "conditions": [
                self._condition("PodScheduled", True),
                self._condition("PodReadyToStartContainers", self.ip is not None),
                self._condition("Initialized", True),
                self._condition("ContainersReady", ready, "ContainersNotReady"),
                self._condition("Ready", ready, "ContainersNotReady"),
            ],
            "containerStatuses": [container_status],
        }
        if self.ip is not None:
            status["podIP"] = self.ip
            status["podIPs"] = [{"ip": self.ip}]
        return status

    async def _publish(self) -> None:
        """Patch the pod's status if it differs from what was last written (no write for no change)."""
        async with self._status_lock:
            status = self.status()
            if status == self._last_status:
                return
            others = [
                c
                for c in self.pod.get("status", {}).get("conditions", [])
                if c.get("type") not in MANAGED_CONDITIONS
            ]
            body = {"status": {**status, "conditions": others + status["conditions"]}}
            try:
                await self.kubelet.client.patch(
                    PodStatus, self.name, body, namespace=self.namespace, patch_type=PatchType.MERGE
                )
                self._last_status = status
                return
            except ApiError as exc:
                if exc.status.code == 404:
                    return
                log.warning("pod %s/%s: status update failed: %s", self.namespace, self.name, exc)
            except Exception as exc:
                log.warning("pod %s/%s: status update failed: %s", self.namespace, self.name, exc)
            if self._status_retry is None or self._status_retry.done():
                self._status_retry = asyncio.get_running_loop().create_task(self._retry_publish())

    async def _retry_publish(self) -> None:
        await asyncio.sleep(STATUS_RETRY_S)
        await self._publish()


async def _kill(process: asyncio.subprocess.Process, grace: float) -> tuple[tuple[str, ...], float]:
    """SIGTERM the process group, wait up to ``grace`` seconds, then SIGKILL; the signals sent, the time."""
    began = time.monotonic()
    if process.returncode is not None:
        return (), 0.0
    signals = ["SIGTERM"]
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), grace)
    except TimeoutError:
        signals.append("SIGKILL")
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(process.wait(), 10)
    return tuple(signals), time.monotonic() - began


def _remove_pod_dir(directory: Path, keep_log_as: Path) -> None:
    """Remove a pod's files (Secret volumes included); its container log is kept as ``keep_log_as``."""
    if not directory.exists():
        return
    logs = sorted(directory.glob("*.log"))
    if logs:
        keep_log_as.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            os.replace(logs[0], keep_log_as)
    shutil.rmtree(directory, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ kubelet


class LocalKubelet:
    """Runs the pods of ``namespace`` as ``llmgw`` processes on loopback IPs (see the module docstring).

    ``async with LocalKubelet(...) as kubelet:`` or :meth:`start` / :meth:`stop`; :meth:`run_forever` for a
    demo. :attr:`pods` shows what runs, :attr:`terminations` how processes ended.
    """

    def __init__(
        self,
        kubeconfig: Path,
        namespace: str,
        workdir: Path,
        *,
        node_name: str = "llmgw-local",
        llmgw_executable: str,
        config_sync_delay: float = 0.0,
        pod_ip_base: str = "127.0.1.",
        probe_period_cap: float | None = 1.0,
        restart_backoff: float = 1.0,
        max_restart_backoff: float = 30.0,
        watch_timeout: int = 60,
    ) -> None:
        self.kubeconfig = Path(kubeconfig)
        self.namespace = namespace
        self.workdir = Path(workdir)
        self.node_name = node_name
        self.llmgw_executable = llmgw_executable
        self.config_sync_delay = config_sync_delay
        self.ips = LoopbackIPs(pod_ip_base)
        self.probe_period_cap = probe_period_cap
        self.restart_backoff = restart_backoff
        self.max_restart_backoff = max_restart_backoff
        self.watch_timeout = watch_timeout
        self.terminations: collections.deque[Termination] = collections.deque(maxlen=TERMINATIONS_KEPT)
        self.node_labels = {
            "kubernetes.io/hostname": node_name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": {"x86_64": "amd64", "aarch64": "arm64"}.get(
                platform.machine(), platform.machine()
            ),
        }
        self._client: AsyncClient | None = None
        self._session: aiohttp.ClientSession | None = None
        self._runners: dict[str, _PodRunner] = {}
        self._finished: dict[
            str, None
        ] = {}  # uids whose pods were finalized (ignore late events), oldest first
        self._watches: list[asyncio.Task[None]] = []
        self._started = False
        self._stopping = False

    # ---- public

    @property
    def client(self) -> AsyncClient:
        if self._client is None:
            raise RuntimeError("LocalKubelet is not started")
        return self._client

    @property
    def pods(self) -> list[LocalPod]:
        """The pods this kubelet runs now, by name (a copy: safe to read from another thread)."""
        runners = list(self._runners.values())
        return sorted((r.snapshot() for r in runners), key=lambda p: p.name)

    async def start(self) -> None:
        """Register the node and start watching pods, ConfigMaps and Secrets of the namespace."""
        if self._started:
            return
        if not os.access(self.llmgw_executable, os.X_OK):
            raise ValueError(f"llmgw_executable: {self.llmgw_executable} is not an executable file")
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "pods").mkdir(mode=0o700, exist_ok=True)
        for noisy in ("httpx", "httpx2", "httpcore", "httpcore2"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        self._client = AsyncClient(
            KubeConfig.from_file(self.kubeconfig), namespace=self.namespace, field_manager=FIELD_MANAGER
        )
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True),  # probes never reuse connections
            headers={"User-Agent": "kube-probe/llmgw-local"},
            trust_env=False,
        )
        self._started = True
        self._stopping = False
        try:
            await self._register_node()
        except BaseException:
            await self._close()
            raise
        loop = asyncio.get_running_loop()
        self._watches = [
            loop.create_task(self._list_and_watch(Pod, self._on_pod_list, self._on_pod_event)),
            loop.create_task(
                self._list_and_watch(
                    ConfigMap,
                    lambda objs: self._on_source_list("ConfigMap"),
                    lambda kind, obj: self._on_source_event("ConfigMap", obj),
                )
            ),
            loop.create_task(
                self._list_and_watch(
                    Secret,
                    lambda objs: self._on_source_list("Secret"),
                    lambda kind, obj: self._on_source_event("Secret", obj),
                )
            ),
        ]
        log.info("local kubelet: node %s runs the pods of namespace %s", self.node_name, self.namespace)

    async def stop(self) -> None:
        """Stop every process gracefully (SIGTERM, the pod's grace period, SIGKILL); mark the node NotReady.

        Pod objects stay (as when a node goes down); their status shows the container terminated.
        """
        if not self._started:
            return
        self._stopping = True
        for task in self._watches:
            task.cancel()
        await asyncio.gather(*self._watches, return_exceptions=True)
        self._watches = []
        runners = list(self._runners.values())
        for runner in runners:
            runner.shut_down()
        tasks = [r.task for r in runners if r.task is not None]
        if tasks:
            limit = max((max(r._deletion_grace(), MIN_KILL_GRACE_S) for r in runners), default=0.0) + 15
            _, pending = await asyncio.wait(tasks, timeout=limit)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        try:
            await self._set_node_ready(False, "KubeletStopped", "the llmgw local kubelet stopped")
        except Exception as exc:
            log.warning("local kubelet: could not mark node %s NotReady: %s", self.node_name, exc)
        await self._close()
        log.info("local kubelet: stopped")

    async def run_forever(self, stop: asyncio.Event | None = None) -> None:
        """Start, run until ``stop`` is set (or the task is cancelled), then stop."""
        await self.start()
        try:
            await (stop or asyncio.Event()).wait()
        finally:
            await asyncio.shield(self.stop())

    async def __aenter__(self) -> LocalKubelet:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # ---- API helpers used by the pod runners

    async def get(self, resource: type[NamespacedResource], name: str) -> dict[str, Any] | None:
        """An object of the namespace as a dict, or None when it does not exist."""
        try:
            obj = await self.client.get(resource, name, namespace=self.namespace)
        except ApiError as exc:
            if exc.status.code == 404:
                return None
            raise
        data: dict[str, Any] = cast(Any, obj).to_dict()
        return data

    async def probe(self, probe: Probe) -> bool:
        try:
            async with asyncio.timeout(probe.timeout_s):
                if probe.url is not None:
                    assert self._session is not None
                    async with self._session.get(
                        probe.url, headers=dict(probe.headers), allow_redirects=False, ssl=False
                    ) as response:
                        return 200 <= response.status < 400
                assert probe.tcp is not None
                _, writer = await asyncio.open_connection(*probe.tcp)
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
                return True
        except (OSError, aiohttp.ClientError, TimeoutError):
            return False

    # ---- node

    async def _register_node(self) -> None:
        node = codecs.from_dict(
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": self.node_name,
                    "labels": self.node_labels,
                    "annotations": {"llmgateway.io/local-kubelet": self.namespace},
                },
            }
        )
        try:
            await self.client.create(node)
        except ApiError as exc:
            if exc.status.code != 409:
                raise
        await self._set_node_ready(True, "KubeletReady", "the llmgw local kubelet is posting ready status")

    async def _set_node_ready(self, ready: bool, reason: str, message: str) -> None:
        now = _now()
        cpus = str(os.cpu_count() or 1)
        status = {
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True" if ready else "False",
                    "reason": reason,
                    "message": message,
                    "lastHeartbeatTime": now,
                    "lastTransitionTime": now,
                }
            ],
            "addresses": [
                {"type": "InternalIP", "address": HOST_IP},
                {"type": "Hostname", "address": self.node_name},
            ],
            "capacity": {"cpu": cpus, "pods": "254"},
            "allocatable": {"cpu": cpus, "pods": "254"},
            "nodeInfo": {
                "operatingSystem": "linux",
                "architecture": self.node_labels["kubernetes.io/arch"],
                "kernelVersion": platform.release(),
                "osImage": platform.platform(),
                "containerRuntimeVersion": "llmgw-local://processes",
                "kubeletVersion": "llmgw-local",
                "kubeProxyVersion": "",
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
            },
        }
        await self.client.patch(NodeStatus, self.node_name, {"status": status}, patch_type=PatchType.MERGE)

    # ---- watches

    async def _list_and_watch(
        self,
        resource: type[NamespacedResource],
        on_list: Callable[[list[dict[str, Any]]], None],
        on_event: Callable[[str, dict[str, Any]], None],
    ) -> None:
        """List, then watch from the list's resourceVersion, forever; relist with backoff after any error."""
        what = resource.__name__
        delay = WATCH_BACKOFF_S[0]
        while True:
            try:
                async with asyncio.timeout(API_TIMEOUT_S * 3):
                    listing = self.client.list(resource, namespace=self.namespace)
                    objs = [cast(Any, obj).to_dict() async for obj in listing]
                    version = listing.resourceVersion
                self._dispatch(on_list, objs)
                delay = WATCH_BACKOFF_S[0]
                while True:
                    version = await self._watch_once(resource, version, on_event)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("local kubelet: %s watch failed (%s); relisting in %.1fs", what, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, WATCH_BACKOFF_S[1])

    async def _watch_once(
        self,
        resource: type[NamespacedResource],
        version: str,
        on_event: Callable[[str, dict[str, Any]], None],
    ) -> str:
        """One watch request, ended after ``watch_timeout`` (plus a margin); the last resourceVersion seen."""
        stream = cast(
            "AsyncGenerator[tuple[str, Any], None]",
            self.client.watch(
                resource,
                namespace=self.namespace,
                resource_version=version,
                server_timeout=self.watch_timeout,
            ),
        )
        deadline = asyncio.timeout(self.watch_timeout + 15)
        try:
            async with deadline:
                async for event_type, obj in stream:
                    data: dict[str, Any] = cast(Any, obj).to_dict()
                    version = data["metadata"]["resourceVersion"]
                    self._dispatch(on_event, event_type, data)
        except TimeoutError:
            if not deadline.expired():
                raise
        finally:
            await stream.aclose()
        return version

    @staticmethod
    def _dispatch(handler: Callable[..., None], *args: Any) -> None:
        try:
            handler(*args)
        except Exception:
            log.exception("local kubelet: handling a watch event failed")

    def _is_mine(self, pod: Mapping[str, Any]) -> bool:
        spec = pod.get("spec", {})
        node = spec.get("nodeName")
        if node:
            return bool(node == self.node_name)
        if spec.get("schedulerName", DEFAULT_SCHEDULER) != DEFAULT_SCHEDULER:
            return False
        if pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
            return False
        selector = spec.get("nodeSelector") or {}
        return all(self.node_labels.get(key) == value for key, value in selector.items())

    def _on_pod_list(self, pods: list[dict[str, Any]]) -> None:
        listed = {pod["metadata"]["uid"] for pod in pods}
        for uid, runner in list(self._runners.items()):
            if uid not in listed:
                runner.vanish()
        for uid in [uid for uid in self._finished if uid not in listed]:
            del self._finished[uid]
        for pod in pods:
            self._on_pod_event("ADDED", pod)

    def _on_pod_event(self, event_type: str, pod: dict[str, Any]) -> None:
        uid = pod["metadata"]["uid"]
        runner = self._runners.get(uid)
        if event_type == "DELETED":
            self._finished.pop(uid, None)
            if runner is not None:
                runner.vanish()
            return
        if runner is not None:
            runner.update(pod)
            return
        if self._stopping or uid in self._finished or not self._is_mine(pod):
            return
        runner = _PodRunner(self, pod)
        runner.update(pod)
        self._runners[uid] = runner
        runner.task = asyncio.get_running_loop().create_task(
            runner.run(), name=f"pod {pod['metadata']['name']}"
        )
        runner.task.add_done_callback(lambda _task: self._runner_done(runner))

    def _runner_done(self, runner: _PodRunner) -> None:
        self._runners.pop(runner.uid, None)
        if runner.finalized and not runner.vanished:
            self._finished[runner.uid] = None
            while len(self._finished) > TERMINATIONS_KEPT:
                del self._finished[next(iter(self._finished))]

    def _on_source_list(self, kind: str) -> None:
        # After a relist changes may have been missed: check every pod mounting this kind of object.
        for runner in self._runners.values():
            if any(k == kind for k, _ in runner.volume_sources()):
                runner.schedule_volume_sync()

    def _on_source_event(self, kind: str, obj: Mapping[str, Any]) -> None:
        key = (kind, obj["metadata"]["name"])
        for runner in self._runners.values():
            if key in runner.volume_sources():
                runner.schedule_volume_sync()

    async def _close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._client is not None:
            await self._client.close()
            self._client = None
        self._started = False
