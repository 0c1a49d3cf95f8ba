"""The operator's few calls to the Kubernetes API, on plain dicts, through lightkube.

Everything else in the operator is pure; this module is the thin layer that reads and writes. Writes
go through server-side apply with one field manager, so the operator owns exactly the fields it sets
and leaves others' (an HPA's replicas, a mesh's annotations) alone. Each call is counted by verb, for
the benchmark and for tests that prove an idle gateway costs no writes.
"""

from __future__ import annotations

import collections
import datetime
import functools
from typing import Any

from lightkube import ApiError, AsyncClient, codecs
from lightkube.core.resource import NamespacedResource
from lightkube.generic_resource import create_namespaced_resource
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.core_v1 import ConfigMap, Pod, Secret, Service, ServiceAccount
from lightkube.resources.policy_v1 import PodDisruptionBudget
from lightkube.types import PatchType

from .spec import GROUP, KIND, PLURAL, VERSION

FIELD_MANAGER = "llmgw-operator"

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


def _to_dict(obj: Any) -> dict[str, Any]:
    return obj if isinstance(obj, dict) else obj.to_dict()


class Kube:
    """An async API client for the operator; ``calls`` counts requests by verb."""

    def __init__(self, client: AsyncClient | None = None) -> None:
        self._client = client
        self.calls: collections.Counter[str] = collections.Counter()

    @functools.cached_property
    def client(self) -> AsyncClient:
        # Created on first use, inside the running loop (kubeconfig, or the pod's service account).
        return self._client or AsyncClient(field_manager=FIELD_MANAGER)

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        self.calls["get"] += 1
        try:
            return _to_dict(await self.client.get(KINDS[kind], name, namespace=namespace))
        except ApiError as exc:
            if exc.status.code == 404:
                return None
            raise

    async def list_gateways(self, namespace: str | None = None) -> list[dict[str, Any]]:
        self.calls["list"] += 1
        return [_to_dict(obj) async for obj in self.client.list(LLMGateway, namespace=namespace or "*")]

    async def list_pods(self, namespace: str, labels: dict[str, Any]) -> list[dict[str, Any]]:
        self.calls["list"] += 1
        return [
            _to_dict(obj) async for obj in self.client.list(Pod, namespace=namespace, labels=dict(labels))
        ]

    async def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply ``manifest`` as the operator's field manager (forcing: the operator owns these)."""
        self.calls["apply"] += 1
        obj = codecs.from_dict(manifest)
        applied = await self.client.apply(obj, field_manager=FIELD_MANAGER, force=True)
        return _to_dict(applied)

    async def delete(self, kind: str, namespace: str, name: str) -> None:
        self.calls["delete"] += 1
        try:
            await self.client.delete(KINDS[kind], name, namespace=namespace)
        except ApiError as exc:
            if exc.status.code != 404:
                raise

    async def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        """Merge-patch the gateway's status subresource (spec stays the user's)."""
        self.calls["patch_status"] += 1
        await self.client.patch(
            LLMGateway.Status, name, {"status": status}, namespace=namespace, patch_type=PatchType.MERGE
        )

    async def event(self, gateway: dict[str, Any], type_: str, reason: str, message: str) -> None:
        """Record a core/v1 Event on the gateway (what ``kubectl describe llmgw`` shows)."""
        self.calls["event"] += 1
        meta = gateway["metadata"]
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
        await self.client.create(codecs.from_dict(body), namespace=meta["namespace"])  # type: ignore[call-overload]

    async def close(self) -> None:
        if "client" in self.__dict__:
            await self.client.close()
