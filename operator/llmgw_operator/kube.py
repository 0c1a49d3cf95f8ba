"""The operator's few calls to the Kubernetes API, on plain dicts, through lightkube.

Everything else in the operator is pure; this module is the thin layer that reads and writes. Writes
go through server-side apply with one field manager, so the operator owns exactly the fields it sets
and leaves others' (an HPA's replicas, a mesh's annotations) alone. Each call is counted by verb, for
the benchmark and for tests that prove an idle gateway costs no writes.

Every name and namespace is checked before its request: lightkube puts them into the URL's path as they
are, and the HTTP client normalises ``..`` segments, so a Secret name ``../../victim/secrets/stolen`` taken
from a gateway's spec would read another namespace's Secret, and ``""`` or ``?watch=true`` would list them
all. A bad one raises :class:`InvalidName`, an :class:`~lightkube.ApiError` (422 Invalid) made without a
request, so the reconciler and the handlers report it as they report the API server refusing a call.

:class:`Kube` also remembers the resourceVersion of each object it wrote (:meth:`Kube.wrote`), and waits
for a write still under way (:meth:`Kube.settled`): that is how the handlers tell the operator's own writes,
coming back as watch events, from somebody else's edits of the objects it manages. At most
:data:`MAX_IN_FLIGHT` requests are under way at a time; the others wait their turn here, in order.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import functools
from collections.abc import Iterator
from typing import Any

from lightkube import ApiError, AsyncClient, codecs
from lightkube.core.resource import NamespacedResource
from lightkube.generic_resource import create_namespaced_resource
from lightkube.models.meta_v1 import ObjectMeta, Status
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.core_v1 import ConfigMap, Pod, Secret, Service, ServiceAccount
from lightkube.resources.policy_v1 import PodDisruptionBudget
from lightkube.types import PatchType

from .spec import GROUP, KIND, PLURAL, VERSION, is_namespace_name, is_object_name

FIELD_MANAGER = "llmgw-operator"
# Requests at a time: the HTTP client keeps 20 connections alive (more are closed after each request and
# handshaken anew), and scans its whole queue of waiting requests each time one ends.
MAX_IN_FLIGHT = 20

LLMGateway = create_namespaced_resource(GROUP, VERSION, KIND, PLURAL)
KINDS: dict[str, type[NamespacedResource]] = {
    "ConfigMap": ConfigMap,
    "Secret": Secret,
    "Service": Service,
    "ServiceAccount": ServiceAccount,
    "Deployment": Deployment,
    "PodDisruptionBudget": PodDisruptionBudget,
    KIND: LLMGateway,
}


class InvalidName(ApiError):
    """A name or namespace that is not a valid Kubernetes one, refused before any request is made."""

    def __init__(self, message: str) -> None:
        super().__init__(status=Status(code=422, reason="Invalid", status="Failure", message=message))


def check_name(kind: str, namespace: Any, name: Any = None) -> None:
    """Raise :class:`InvalidName` unless ``namespace`` (and ``name``, when given) are valid Kubernetes names."""
    if not is_namespace_name(namespace):
        raise InvalidName(
            f"{kind} namespace {namespace!r} is not a valid namespace name (a DNS-1123 label): not requested"
        )
    if name is not None and not is_object_name(name):
        raise InvalidName(
            f"{kind} name {name!r} is not a valid Kubernetes name (lowercase letters, digits, '-' and '.', "
            "at most 253 characters, starting and ending with a letter or digit): not requested"
        )


def _to_dict(obj: Any) -> dict[str, Any]:
    return obj if isinstance(obj, dict) else obj.to_dict()


ObjectKey = tuple[str, str, str]  # (kind, namespace, name)


class Kube:
    """An async API client for the operator; ``calls`` counts requests by verb."""

    def __init__(self, client: AsyncClient | None = None) -> None:
        self._client = client
        self.calls: collections.Counter[str] = collections.Counter()
        self._written: dict[
            ObjectKey, str
        ] = {}  # resourceVersion of the operator's last write of each object
        self._writing: dict[ObjectKey, asyncio.Event] = {}  # set when the write under way has returned
        self._in_flight = asyncio.Semaphore(MAX_IN_FLIGHT)

    def wrote(self, kind: str, namespace: str, name: str) -> str | None:
        """The resourceVersion the operator's last write of this object returned, if it wrote one."""
        return self._written.get((kind, namespace, name))

    def forget(self, kind: str, namespace: str, name: str) -> None:
        """The object is gone: drop what :meth:`wrote` remembers of it."""
        self._written.pop((kind, namespace, name), None)

    async def settled(self, kind: str, namespace: str, name: str, timeout: float = 30.0) -> None:
        """Return once no write of this object is under way (a watch event can arrive before the response
        of the write that caused it). Gives up after ``timeout``: a stuck write holds up no one."""
        writing = self._writing.get((kind, namespace, name))
        if writing is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(writing.wait(), timeout)

    @contextlib.contextmanager
    def _write(self, key: ObjectKey) -> Iterator[None]:
        done = self._writing.setdefault(key, asyncio.Event())
        try:
            yield
        finally:
            if self._writing.get(key) is done:
                del self._writing[key]
            done.set()

    @functools.cached_property
    def client(self) -> AsyncClient:
        # Created on first use, inside the running loop (kubeconfig, or the pod's service account).
        return self._client or AsyncClient(field_manager=FIELD_MANAGER)

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        check_name(kind, namespace, name)
        self.calls["get"] += 1
        try:
            async with self._in_flight:
                return _to_dict(await self.client.get(KINDS[kind], name, namespace=namespace))
        except ApiError as exc:
            if exc.status.code == 404:
                return None
            raise

    async def list_gateways(self, namespace: str | None = None) -> list[dict[str, Any]]:
        """The gateways of ``namespace``, or of every namespace when it is None."""
        if namespace is not None:
            check_name(KIND, namespace)
        self.calls["list"] += 1
        async with self._in_flight:
            return [_to_dict(obj) async for obj in self.client.list(LLMGateway, namespace=namespace or "*")]

    async def list_pods(self, namespace: str, labels: dict[str, Any]) -> list[dict[str, Any]]:
        check_name("Pod", namespace)
        self.calls["list"] += 1
        async with self._in_flight:
            return [
                _to_dict(obj) async for obj in self.client.list(Pod, namespace=namespace, labels=dict(labels))
            ]

    async def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply ``manifest`` as the operator's field manager (forcing: the operator owns these)."""
        meta = manifest.get("metadata") or {}
        check_name(str(manifest.get("kind")), meta.get("namespace"), meta.get("name"))
        self.calls["apply"] += 1
        obj = codecs.from_dict(manifest)
        key = (str(manifest["kind"]), meta["namespace"], meta["name"])
        with self._write(key):
            async with self._in_flight:
                applied = _to_dict(await self.client.apply(obj, field_manager=FIELD_MANAGER, force=True))
            version = (applied.get("metadata") or {}).get("resourceVersion")
            if version:
                self._written[key] = str(version)
        return applied

    async def delete(self, kind: str, namespace: str, name: str) -> None:
        check_name(kind, namespace, name)
        self.calls["delete"] += 1
        self.forget(kind, namespace, name)
        try:
            async with self._in_flight:
                await self.client.delete(KINDS[kind], name, namespace=namespace)
        except ApiError as exc:
            if exc.status.code != 404:
                raise

    async def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        """Merge-patch the gateway's status subresource (spec stays the user's)."""
        check_name(KIND, namespace, name)
        self.calls["patch_status"] += 1
        async with self._in_flight:
            await self.client.patch(
                LLMGateway.Status, name, {"status": status}, namespace=namespace, patch_type=PatchType.MERGE
            )

    async def event(self, gateway: dict[str, Any], type_: str, reason: str, message: str) -> None:
        """Record a core/v1 Event on the gateway (what ``kubectl describe llmgw`` shows)."""
        meta = gateway["metadata"]
        check_name("Event", meta["namespace"], meta["name"])
        self.calls["event"] += 1
        now = datetime.datetime.now(datetime.UTC)
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": ObjectMeta(generateName=f"{meta['name']}.", namespace=meta["namespace"]).to_dict(),
            "involvedObject": {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": KIND,
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta["uid"],
                "resourceVersion": meta.get("resourceVersion"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": FIELD_MANAGER},
            "reportingComponent": FIELD_MANAGER,
            "reportingInstance": FIELD_MANAGER,
            "firstTimestamp": now.isoformat(),
            "lastTimestamp": now.isoformat(),
            "count": 1,
        }
        async with self._in_flight:
            await self.client.create(codecs.from_dict(body), namespace=meta["namespace"])  # type: ignore[call-overload]

    async def close(self) -> None:
        if "client" in self.__dict__:
            await self.client.close()
