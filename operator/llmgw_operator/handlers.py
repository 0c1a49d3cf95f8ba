"""The operator's kopf handlers: thin triggers for :meth:`Reconciler.sync`.

kopf watches the resources and calls these; each only decides *which* gateway to reconcile:

- a gateway created, changed, or found when the operator starts (``on.resume``);
- a Secret event, for every gateway that references that Secret (an in-memory map kept from the
  gateways' watch events), so a created or rotated Secret is acted on at once;
- events of the objects the operator manages (label ``app.kubernetes.io/managed-by=llmgw-operator``),
  for their owner: a deleted child is recreated at once, a Deployment's rollout progress and readiness
  reach the status, a Deployment changed by someone else is put back; other edits of children are
  undone by the drift check;
- a clock (:func:`periodic_loop`): migration ticks, and the drift check that catches what no watch reports.

kopf's own bookkeeping (the last handled spec) goes to annotations under ``kopf.llmgateway.io/``, because
the CRD's structural schema has no room for kopf's default ``status.kopf``.

No handler waits for another: there is no kopf index (kopf makes every handler of every resource wait
until each gateway listed at startup has been indexed, each in a worker of its own, so with a worker
limit below the number of gateways nothing ever ran), and no worker limit (a gateway whose pass is retried
keeps its worker while it waits, and must not keep another gateway from getting one). A failing gateway
is reported by :meth:`Reconciler.sync` (a condition, an event, a log line); it never stops the others.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf
from lightkube import ApiError

from .manifests import MANAGED_BY
from .migration import COMMANDS, FINAL_PHASES
from .reconcile import ApplyFailed, Reconciler
from .settings import Settings
from .spec import GROUP, KIND, PLURAL, VERSION, referenced_secrets

log = logging.getLogger(__name__)

# Not GROUP itself: kopf leaves annotations under its own prefix out of the diffs that trigger handlers,
# and the migration's commands (llmgateway.io/promote, ...) must trigger them.
KOPF_PREFIX = f"kopf.{GROUP}"
MANAGED = {"app.kubernetes.io/managed-by": MANAGED_BY}
CHILD_KINDS = (
    ("", "v1", "configmaps"),
    ("", "v1", "services"),
    ("", "v1", "serviceaccounts"),
    ("apps", "v1", "deployments"),
    ("policy", "v1", "poddisruptionbudgets"),
)


def _owner(body: Any) -> str | None:
    for ref in body.get("metadata", {}).get("ownerReferences", []):
        if ref.get("kind") == KIND and ref.get("apiVersion", "").startswith(f"{GROUP}/"):
            return str(ref["name"])
    return None


class SecretUsers:
    """Which gateways reference which Secret: (namespace, Secret) -> gateway names, kept from the gateways'
    watch events. A gateway is added before its first pass runs (kopf calls event handlers before change
    handlers), so a Secret event after that pass read the Secret always finds it."""

    def __init__(self) -> None:
        self._by_gateway: dict[tuple[str, str], set[str]] = {}

    def update(self, namespace: str, name: str, spec: dict[str, Any] | None) -> None:
        if spec is None:
            self._by_gateway.pop((namespace, name), None)
            return
        try:
            self._by_gateway[(namespace, name)] = set(referenced_secrets(spec))
        except Exception:  # a spec the CRD should have refused: its own pass reports it
            log.debug("gateway %s/%s: cannot list its Secrets", namespace, name, exc_info=True)
            self._by_gateway.pop((namespace, name), None)

    def users(self, namespace: str, secret: str) -> list[str]:
        return sorted(
            name for (ns, name), secrets in self._by_gateway.items() if ns == namespace and secret in secrets
        )


def build_registry(settings: Settings, reconciler: Reconciler) -> kopf.OperatorRegistry:
    """All handlers of the operator, registered in a fresh registry (one per running operator)."""
    registry = kopf.OperatorRegistry()
    secret_users = SecretUsers()

    async def sync(namespace: str, name: str) -> None:
        try:
            await reconciler.sync(namespace, name)
        except ApiError as exc:
            if exc.status.code == 404:
                return  # the gateway was deleted during the pass: nothing left to reconcile
            # kopf retries change handlers after the delay; event handlers wait for the next trigger.
            raise kopf.TemporaryError(
                f"API error while reconciling {namespace}/{name}: {exc.status.message}", delay=5
            ) from exc
        except ApplyFailed as exc:
            raise kopf.TemporaryError(str(exc), delay=10) from exc

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=KOPF_PREFIX)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=KOPF_PREFIX, key="last-handled-configuration"
        )
        settings.posting.enabled = False  # the reconciler records its own events, with distinct reasons
        settings.watching.server_timeout = 300
        settings.queueing.worker_limit = None  # see the module docstring: never a worker waiting for a slot

    @kopf.on.resume(GROUP, VERSION, PLURAL, registry=registry)
    @kopf.on.create(GROUP, VERSION, PLURAL, registry=registry)
    @kopf.on.update(GROUP, VERSION, PLURAL, registry=registry)
    async def gateway_changed(namespace: str | None, name: str, **_: Any) -> None:
        await sync(namespace or "", name)

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    def gateway_event(type: str | None, namespace: str | None, name: str, body: kopf.Body, **_: Any) -> None:
        spec = None if type == "DELETED" else dict(body.get("spec") or {})
        secret_users.update(namespace or "", name, spec)

    @kopf.on.event("", "v1", "secrets", registry=registry)
    async def secret_event(namespace: str | None, name: str, **_: Any) -> None:
        for gateway in secret_users.users(namespace or "", name):
            log.info("Secret %s/%s changed: reconciling gateway %s", namespace, name, gateway)
            await sync(namespace or "", gateway)

    # What a Deployment event may change in the gateway's status; other events of it are not worth a pass.
    rollout_seen: dict[tuple[str, str], tuple[Any, ...]] = {}

    @kopf.on.event("apps", "v1", "deployments", labels=MANAGED, registry=registry)
    async def deployment_event(
        type: str | None, namespace: str | None, name: str, body: kopf.Body, **_: Any
    ) -> None:
        owner = _owner(body)
        if owner is None or not namespace:
            return
        status = body.get("status", {})
        rollout = tuple(
            status.get(key) for key in ("observedGeneration", "replicas", "updatedReplicas", "readyReplicas")
        )
        rollout += (body.get("metadata", {}).get("generation"),)  # someone else changed the spec: undo it now
        if type == "DELETED":
            rollout_seen.pop((namespace, name), None)
        elif rollout_seen.get((namespace, name)) == rollout:
            return
        else:
            rollout_seen[(namespace, name)] = rollout
        await sync(namespace, owner)

    for group, version, plural in CHILD_KINDS:
        if plural == "deployments":
            continue

        @kopf.on.event(group, version, plural, labels=MANAGED, registry=registry)
        async def child_deleted(type: str | None, namespace: str | None, body: kopf.Body, **_: Any) -> None:
            # Deletions are repaired at once; edits of these objects wait for the drift check.
            owner = _owner(body)
            if type == "DELETED" and owner is not None and namespace:
                await sync(namespace, owner)

    return registry


def _migrating(gateway: dict[str, Any]) -> bool:
    """A migration that still moves (or waits to), or has a command not acted on yet: it needs ticks
    between the watch events."""
    if "migration" not in (gateway.get("spec") or {}):
        return False
    state = (gateway.get("status") or {}).get("migration") or {}
    annotations = gateway.get("metadata", {}).get("annotations") or {}
    observed = state.get("observedCommands") or {}
    pending = any(annotations[key] != observed.get(key) for key in COMMANDS if key in annotations)
    return pending or state.get("phase") not in FINAL_PHASES


async def periodic_loop(settings: Settings, reconciler: Reconciler) -> None:
    """Every ``migration_tick_seconds``, reconcile the gateways whose migration is under way (it waits for
    proxies and checks metrics on a clock, not on watch events); every ``resync_seconds``, all gateways
    (the drift check). One LIST per tick and scope; writes only when something changed.

    Nothing one gateway does stops the loop: :meth:`Reconciler.sync` reports a gateway's own failures, and
    whatever else is raised is logged (once per distinct message) before the loop goes on.

    A loop of its own rather than kopf timers: kopf puts a finalizer on objects with timers, and a
    finalizer would leave gateways undeletable while the operator is down."""
    loop = asyncio.get_running_loop()
    next_resync = loop.time() + settings.resync_seconds
    logged: dict[str, str] = {}  # what the loop last logged, per gateway ("" for the listing)

    def warn_once(key: str, message: str, exc: BaseException | None = None) -> None:
        if logged.get(key) != message:
            logged[key] = message
            log.warning("periodic pass: %s", message, exc_info=exc)

    while True:
        await asyncio.sleep(settings.migration_tick_seconds)
        resync = loop.time() >= next_resync
        if resync:
            next_resync = loop.time() + settings.resync_seconds
        scopes: list[str | None] = list(settings.namespaces) or [None]
        for namespace in scopes:
            try:
                gateways = await reconciler.kube.list_gateways(namespace)
            except Exception as exc:  # the API server down, for one: try at the next tick
                detail = exc.status.message if isinstance(exc, ApiError) else f"{type(exc).__name__}: {exc}"
                warn_once(f"list {namespace}", f"cannot list gateways: {detail}")
                continue
            logged.pop(f"list {namespace}", None)
            for gateway in gateways:
                meta = gateway.get("metadata") or {}
                key = f"{meta.get('namespace')}/{meta.get('name')}"
                try:
                    if not (resync or _migrating(gateway)):
                        continue
                    await reconciler.sync(meta["namespace"], meta["name"])
                except (ApiError, ApplyFailed) as exc:
                    detail = exc.status.message if isinstance(exc, ApiError) else str(exc)
                    warn_once(key, f"pass of {key} failed: {detail}")
                except Exception as exc:  # never stop the loop for the other gateways
                    warn_once(key, f"pass of {key} failed: {type(exc).__name__}: {exc}", exc)
                else:
                    logged.pop(key, None)
