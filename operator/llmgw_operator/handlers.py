"""The operator's kopf handlers: thin triggers for :meth:`Reconciler.sync`.

kopf watches the resources and calls these; each only decides *which* gateway to reconcile:

- a gateway created, changed, or found when the operator starts (``on.resume``);
- a Secret event, for every gateway that references that Secret (an in-memory map kept from the
  gateways' watch events), so a created or rotated Secret is acted on at once; likewise a ConfigMap event,
  for every gateway whose provider takes its tokenizer from that ConfigMap (``tokenizerConfigMap``);
- events of the objects the operator manages (label ``app.kubernetes.io/managed-by=llmgw-operator``),
  for their owner: a deleted child is recreated at once, and a child changed by anyone but the operator
  (a ConfigMap pointing a provider elsewhere, a Service selector, a Deployment's spec) is put back at once.
  :class:`Children` tells the operator's own writes from others' (the resourceVersion each write returned,
  and a fingerprint of the fields anyone may edit), so the operator's writes cause no pass, and a foreign
  edit one pass, which writes only what differs. A Deployment's rollout progress and conditions
  (``Progressing``, ``ReplicaFailure``, readiness) reach the status;
- a clock (:func:`periodic_loop`): migration ticks, and the drift check that catches what no watch reports.

kopf's own bookkeeping goes to annotations under ``kopf.llmgateway.io/``, because the CRD's structural
schema has no room for kopf's default ``status.kopf``; the last handled configuration is kept as a digest
(:class:`DigestDiffBaseStorage`), so it stays small whatever the size of the spec.

No handler waits for another: there is no kopf index (kopf makes every handler of every resource wait
until each gateway listed at startup has been indexed, each in a worker of its own, so with a worker
limit below the number of gateways nothing ever ran), no worker limit (a gateway whose pass is retried
keeps its worker while it waits, and must not keep another gateway from getting one), and every pass has
a time limit (:data:`PASS_TIMEOUT`). Passes take one of :data:`PASS_SLOTS` slots (:class:`Slots`), a change
someone made first, so that hundreds of gateways found at startup neither starve kopf's watch streams nor
keep a gateway created meanwhile waiting. A failing gateway is reported by :meth:`Reconciler.sync` (a condition,
an event, a log line); it never stops the others. A gateway whose objects the API server refuses
(:class:`ApplyFailed`) is retried by the periodic loop with exponential backoff (:class:`Backoff`: 10 s,
20 s, 40 s, ... 5 min), and routine triggers leave it alone meanwhile; a change of it is acted on at once.

:class:`Watchdog` is what kopf's liveness endpoint reports (``kopf.on.probe``): it fails when the periodic
loop has ended, or neither a tick of it nor any pass has ended for ``LLMGW_WATCHDOG_SECONDS``, so that
Kubernetes restarts a stuck operator. A watch stream the API server stops feeding is reopened by kopf
(``settings.watching.client_timeout``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import heapq
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import kopf
from lightkube import ApiError

from .kube import Kube
from .manifests import MANAGED_BY
from .migration import COMMANDS, FINAL_PHASES
from .reconcile import ApplyFailed, Reconciler
from .settings import Settings
from .spec import GROUP, KIND, PLURAL, VERSION, referenced_config_maps, referenced_secrets

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
PASS_TIMEOUT = 60.0  # one pass of one gateway; longer is a hang (the API client's own timeout is 10 s a call)
PASS_SLOTS = 16  # passes at a time (see Slots); each is a handful of requests, some of them in parallel
BACKOFF_FIRST = 10.0  # a gateway whose objects the API server refuses: the first retry, doubled each time
BACKOFF_MAX = 300.0


def _owner(body: Any) -> str | None:
    for ref in body.get("metadata", {}).get("ownerReferences", []):
        if ref.get("kind") == KIND and ref.get("apiVersion", "").startswith(f"{GROUP}/"):
            return str(ref["name"])
    return None


class DigestDiffBaseStorage(kopf.AnnotationsDiffBaseStorage):
    """kopf's "last handled configuration", kept as a digest of it rather than the whole of it.

    kopf stores the essence of a gateway (spec, labels, annotations) in one annotation, to tell a change
    from a status update; a spec near the CRD's size limits made that annotation exceed the 256 KiB
    the API server allows for all annotations (422), and every touch of the gateway then looked like a new
    creation. A digest says whether anything changed, which is all the handlers ask: none reads kopf's
    field diff (``diff``, ``old``, ``new``). A full configuration stored by an older version reads as a
    change once, and is replaced by its digest."""

    def build(self, *, body: kopf.Body, extra_fields: Iterable[Any] | None = None) -> kopf.BodyEssence:
        essence: dict[str, Any] = dict(super().build(body=body, extra_fields=extra_fields))
        # kopf's own progress annotations (a handler's retries) are no change of the gateway.
        annotations = (essence.get("metadata") or {}).get("annotations") or {}
        for key in [k for k in annotations if k.startswith(f"{KOPF_PREFIX}/")]:
            del annotations[key]
        text = json.dumps(essence, sort_keys=True, separators=(",", ":"), default=str)
        return {"digest": hashlib.sha256(text.encode()).hexdigest()}  # type: ignore[typeddict-unknown-key]


class Users:
    """Which gateways reference which object of one kind (Secrets, ConfigMaps): (namespace, object) -> gateway
    names, kept from the gateways' watch events; ``referenced`` lists the names a spec references. A gateway
    is added before its first pass runs (kopf calls event handlers before change handlers), so an event of
    the object after that pass read it always finds it."""

    def __init__(self, referenced: Callable[[dict[str, Any]], list[str]]) -> None:
        self._referenced = referenced
        self._by_gateway: dict[tuple[str, str], set[str]] = {}

    def update(self, namespace: str, name: str, spec: dict[str, Any] | None) -> None:
        if spec is None:
            self._by_gateway.pop((namespace, name), None)
            return
        try:
            self._by_gateway[(namespace, name)] = set(self._referenced(spec))
        except Exception:  # a spec the CRD should have refused: its own pass reports it
            log.debug("gateway %s/%s: cannot list what it references", namespace, name, exc_info=True)
            self._by_gateway.pop((namespace, name), None)

    def users(self, namespace: str, referenced: str) -> list[str]:
        return sorted(
            name for (ns, name), names in self._by_gateway.items() if ns == namespace and referenced in names
        )


# Annotations others' controllers keep on children: no edit of what the operator wrote.
_VOLATILE_ANNOTATIONS = frozenset(
    {"deployment.kubernetes.io/revision", "kubectl.kubernetes.io/last-applied-configuration"}
)


def fingerprint(obj: dict[str, Any]) -> str:
    """A digest of what anyone may edit in a child: labels, annotations, owners, spec (data, ...); not its
    status, nor what the API server and controllers keep in its metadata."""
    meta = obj.get("metadata") or {}
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items() if k not in _VOLATILE_ANNOTATIONS}
    content = {k: v for k, v in obj.items() if k not in ("metadata", "status", "apiVersion", "kind")}
    text = json.dumps(
        [meta.get("labels") or {}, annotations, meta.get("ownerReferences") or [], content],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()


def rollout(obj: dict[str, Any]) -> tuple[Any, ...]:
    """What a Deployment event may change in the gateway's status: its rollout counts and conditions."""
    status = obj.get("status") or {}
    counts = tuple(
        status.get(key) for key in ("observedGeneration", "replicas", "updatedReplicas", "readyReplicas")
    )
    conditions = tuple(
        sorted((c.get("type"), c.get("status"), c.get("reason")) for c in status.get("conditions") or [])
    )
    return counts + conditions


class Children:
    """What the operator last saw of each of its children, to tell an edit of one by someone else (a pass
    of its owner, at once) from the operator's own writes coming back as watch events (no pass)."""

    def __init__(self, kube: Kube) -> None:
        self.kube = kube
        self._seen: dict[tuple[str, str, str], tuple[str, tuple[Any, ...]]] = {}

    async def changed(self, type_: str | None, obj: dict[str, Any]) -> int | None:
        """The priority of the pass of its owner the child in this watch event needs, or None: deleted or
        edited by someone else, :data:`URGENT`; a Deployment whose rollout moved, :data:`ROUTINE`. The
        listing at startup (``type_`` None) is only noted: every gateway gets a pass then anyway."""
        meta = obj.get("metadata") or {}
        kind, namespace, name = str(obj.get("kind")), str(meta.get("namespace")), str(meta.get("name"))
        key = (kind, namespace, name)
        if type_ == "DELETED":
            self._seen.pop(key, None)
            self.kube.forget(kind, namespace, name)
            return URGENT
        await self.kube.settled(kind, namespace, name)  # the response of our own write first, if under way
        version = meta.get("resourceVersion")
        ours = version is not None and version == self.kube.wrote(kind, namespace, name)
        now = (fingerprint(obj), rollout(obj) if kind == "Deployment" else ())
        before = self._seen.get(key)
        self._seen[key] = now
        if type_ is None:
            return None
        if not ours and (before is None or now[0] != before[0]):
            return URGENT  # (not seen since the start: created by someone else, or changed)
        if before is not None and now[1] != before[1]:
            return ROUTINE
        return None


class Backoff:
    """Gateways whose objects the API server refuses (:class:`ApplyFailed`: a quota, an admission
    webhook, an invalid rendered label): after the n-th refused pass in a row, no pass for
    ``min(BACKOFF_FIRST * 2**(n-1), BACKOFF_MAX)`` seconds but for a change of the gateway or an
    :data:`URGENT` trigger; then the periodic loop tries again (:meth:`due`). A pass that succeeds ends it."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._state: dict[tuple[str, str], tuple[int, float]] = {}  # failures in a row, next pass not before

    def failed(self, namespace: str, name: str) -> float:
        """Count a failed pass; the seconds until the next one."""
        failures = self._state.get((namespace, name), (0, 0.0))[0] + 1
        delay = min(BACKOFF_FIRST * 2 ** min(failures - 1, 32), BACKOFF_MAX)
        self._state[(namespace, name)] = (failures, self._clock() + delay)
        return delay

    def succeeded(self, namespace: str, name: str) -> None:
        self._state.pop((namespace, name), None)

    def waiting(self, namespace: str, name: str) -> float:
        """Seconds left before the next pass of this gateway may run (0: it may run now)."""
        state = self._state.get((namespace, name))
        return max(0.0, state[1] - self._clock()) if state else 0.0

    def due(self, namespace: str, name: str) -> bool:
        """Whether the gateway's last pass was refused and its backoff has ended: time to try again."""
        state = self._state.get((namespace, name))
        return state is not None and state[1] <= self._clock()


class Watchdog:
    """Whether the operator makes progress, for the liveness probe: :meth:`problems` names what is stuck.

    Progress is a tick of the periodic loop (every ``migration_tick_seconds``, idle or not) or the end of
    any gateway's pass. None for ``stall_seconds``, or the periodic loop ended, is a stuck operator: a pass
    that does not end within its time limit, passes that no longer get a slot, a loop that no longer
    wakes. (A blocked event loop does not answer the probe at all, which fails it as well.)"""

    def __init__(self, stall_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.stall_seconds = stall_seconds
        self._clock = clock
        self.last_progress = clock()
        self.task: asyncio.Task[Any] | None = None  # the periodic loop

    def beat(self) -> None:
        """Progress: a tick of the periodic loop began, or a gateway's pass ended."""
        self.last_progress = self._clock()

    def idle(self) -> float:
        return self._clock() - self.last_progress

    def problems(self) -> list[str]:
        if self.task is not None and self.task.done():
            ended = "cancelled" if self.task.cancelled() else repr(self.task.exception())
            return [f"the periodic loop has ended ({ended})"]
        idle = self.idle()
        if idle > self.stall_seconds:
            return [
                f"the periodic loop has made no progress for {idle:.0f}s (limit {self.stall_seconds:.0f}s)"
            ]
        return []


class PassFailed(Exception):
    """A pass that did not complete; ``delay`` is when to try again; ``refused``: the API server refused
    some of the gateway's objects (already in its status), and its :class:`Backoff` runs."""

    def __init__(self, message: str, delay: float, refused: bool = False) -> None:
        super().__init__(message)
        self.delay = delay
        self.refused = refused


# Priorities of passes waiting for a slot (lower first; first come, first served within one).
URGENT = 0  # a gateway created or changed; a child deleted or edited by someone else; a Secret changed
ROUTINE = 1  # a gateway found at startup; a Deployment's rollout moved
PERIODIC = 2  # migration ticks and the drift check


class Slots:
    """At most ``size`` passes at a time, handed out by priority, then in order of arrival.

    Without a bound, hundreds of gateways found at startup all ran their passes at once: each turn of
    the event loop ran hundreds of callbacks, so kopf's readers of the watch streams got a turn only every
    so often and fell tens of seconds behind (a gateway created then waited for its event; kopf's wait for
    its own annotation write ran out, and each gateway was handled twice), and the HTTP client's pool spent
    its time scanning hundreds of queued requests. Every pass is time-limited, so a wait is bounded."""

    def __init__(self, size: int) -> None:
        self._free = size
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    @contextlib.asynccontextmanager
    async def hold(self, priority: int) -> AsyncIterator[None]:
        if self._free > 0 and not self._waiters:
            self._free -= 1
        else:
            handed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            heapq.heappush(self._waiters, (priority, next(self._order), handed))
            try:
                await handed
            except asyncio.CancelledError:
                if handed.done() and not handed.cancelled():
                    self._release()  # handed a slot while being cancelled: pass it on
                raise
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        while self._waiters:
            _, _, handed = heapq.heappop(self._waiters)
            if not handed.done():
                handed.set_result(None)
                return
        self._free += 1

    @property
    def waiting(self) -> int:
        return sum(not handed.done() for _, _, handed in self._waiters)


class Passes:
    """Runs the passes of gateways for every trigger: in :class:`Slots` by priority, each time-limited,
    the backoff of gateways whose objects are refused, and one pass for the triggers that come while a
    pass of the same gateway waits for its slot (it reads everything when it starts)."""

    def __init__(
        self,
        reconciler: Reconciler,
        backoff: Backoff | None = None,
        slots: int = PASS_SLOTS,
        progress: Callable[[], None] = lambda: None,
    ) -> None:
        self.reconciler = reconciler
        self.backoff = backoff or Backoff()
        self.slots = Slots(slots)
        self.progress = progress  # called after each pass: the watchdog's heartbeat
        self._queued: dict[tuple[str, str], tuple[int, asyncio.Future[None]]] = {}
        self._running: collections.Counter[tuple[str, str]] = collections.Counter()
        self._logged: dict[tuple[str, str], str] = {}

    async def run(self, namespace: str, name: str, priority: int = URGENT) -> None:
        """One pass of the gateway, whatever its backoff; :class:`PassFailed` if it did not complete."""
        key = (namespace, name)
        queued = self._queued.get(key)
        if queued is not None and queued[0] <= priority:
            await asyncio.wait([queued[1]])  # the queued pass will do: it has not read anything yet
            if not queued[1].cancelled():
                return queued[1].result()  # its PassFailed, if it failed
        shared: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        shared.add_done_callback(lambda f: f.cancelled() or f.exception())  # no "never retrieved" warning
        self._queued[key] = (priority, shared)
        try:
            async with self.slots.hold(priority):
                if self._queued.get(key, (0, None))[1] is shared:
                    del self._queued[key]  # started: a trigger from now on needs a pass of its own
                self._running[key] += 1
                try:
                    await self._pass(namespace, name)
                except PassFailed as exc:
                    shared.set_exception(exc)
                    raise
                finally:
                    self._running[key] -= 1
                    if not self._running[key]:
                        del self._running[key]
                shared.set_result(None)
        finally:
            if self._queued.get(key, (0, None))[1] is shared:
                del self._queued[key]
            if not shared.done():
                shared.cancel()  # others waiting on it run a pass of their own
            self.progress()

    def busy(self, namespace: str, name: str) -> bool:
        """Whether a pass of the gateway is waiting for its slot or running."""
        return (namespace, name) in self._queued or (namespace, name) in self._running

    async def _pass(self, namespace: str, name: str) -> None:
        try:
            await asyncio.wait_for(self.reconciler.sync(namespace, name), PASS_TIMEOUT)
        except ApiError as exc:
            if exc.status.code == 404:
                return  # the gateway was deleted during the pass: nothing left to reconcile
            raise PassFailed(
                f"API error while reconciling {namespace}/{name}: {exc.status.message}", delay=5
            ) from exc
        except ApplyFailed as exc:  # already in the gateway's status
            raise PassFailed(str(exc), self.backoff.failed(namespace, name), refused=True) from exc
        except TimeoutError as exc:
            raise PassFailed(
                f"the pass of {namespace}/{name} took over {PASS_TIMEOUT:.0f}s", delay=10
            ) from exc
        self.backoff.succeeded(namespace, name)

    async def triggered(self, namespace: str, name: str, why: str, priority: int = URGENT) -> None:
        """A pass for an event (a Secret, a child): none while the gateway is in backoff but for an
        :data:`URGENT` one (a deleted or edited child, a Secret: rare, and made by people), and a failure
        is logged (once per message) rather than raised, since kopf does not retry event handlers."""
        if priority > URGENT and self.backoff.waiting(namespace, name):
            log.debug("gateway %s/%s: %s, in backoff: no pass", namespace, name, why)
            return
        try:
            await self.run(namespace, name, priority)
        except PassFailed as exc:
            if self._logged.get((namespace, name)) != str(exc):
                self._logged[(namespace, name)] = str(exc)
                log.warning("gateway %s/%s: %s: %s", namespace, name, why, exc)
        else:
            self._logged.pop((namespace, name), None)


def build_registry(
    settings: Settings, reconciler: Reconciler, passes: Passes | None = None, watchdog: Watchdog | None = None
) -> kopf.OperatorRegistry:
    """All handlers of the operator, registered in a fresh registry (one per running operator)."""
    registry = kopf.OperatorRegistry()
    secret_users = Users(referenced_secrets)
    config_map_users = Users(referenced_config_maps)
    passes = passes or Passes(reconciler)
    children = Children(reconciler.kube)

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=KOPF_PREFIX)
        settings.persistence.diffbase_storage = DigestDiffBaseStorage(
            prefix=KOPF_PREFIX, key="last-handled-configuration"
        )
        # kopf waits this long for the watch event of its own annotation write before it takes an older
        # event (the status write of the same pass) as the latest state; with hundreds of gateways at
        # startup the watch lags more than the default 5 s, and every gateway was handled twice.
        settings.persistence.consistency_timeout = 30
        settings.posting.enabled = False  # the reconciler records its own events, with distinct reasons
        settings.watching.server_timeout = 300
        settings.watching.client_timeout = 360  # a stream the API server stopped feeding is reopened
        settings.watching.connect_timeout = 30
        settings.queueing.worker_limit = None  # see the module docstring: never a worker waiting for a slot

    if watchdog is not None:

        @kopf.on.probe(id="progress", registry=registry)
        def progress(**_: Any) -> str:
            problems = watchdog.problems()
            if problems:
                # A failed probe handler makes kopf's endpoint answer 500: the liveness probe fails.
                raise kopf.PermanentError("; ".join(problems))
            return f"last progress {watchdog.idle():.0f}s ago"

    @kopf.on.resume(GROUP, VERSION, PLURAL, registry=registry)
    @kopf.on.create(GROUP, VERSION, PLURAL, registry=registry)
    @kopf.on.update(GROUP, VERSION, PLURAL, registry=registry)
    async def gateway_changed(namespace: str | None, name: str, reason: str, **_: Any) -> None:
        # A change of the gateway is acted on at once, in backoff or not. A pass whose objects were refused
        # is not retried by kopf: kopf would not act on the next change of the gateway (the fix) before
        # the retry's delay has passed; the periodic loop retries it when its backoff ends.
        priority = ROUTINE if reason == "resume" else URGENT
        try:
            await passes.run(namespace or "", name, priority)
        except PassFailed as exc:
            if not exc.refused:
                raise kopf.TemporaryError(str(exc), delay=exc.delay) from exc
            log.info("gateway %s/%s: %s; next try in %.0fs", namespace, name, exc, exc.delay)

    # Every resource handler is a coroutine: kopf runs a plain function in a thread, where this one would
    # change the Users maps while secret_event and config_map_event read them on the event loop.
    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    async def gateway_event(
        type: str | None, namespace: str | None, name: str, body: kopf.Body, **_: Any
    ) -> None:
        spec = None if type == "DELETED" else dict(body.get("spec") or {})
        secret_users.update(namespace or "", name, spec)
        config_map_users.update(namespace or "", name, spec)

    @kopf.on.event("", "v1", "secrets", registry=registry)
    async def secret_event(namespace: str | None, name: str, **_: Any) -> None:
        for gateway in secret_users.users(namespace or "", name):
            log.info("Secret %s/%s changed: reconciling gateway %s", namespace, name, gateway)
            await passes.triggered(namespace or "", gateway, f"Secret {name} changed")

    # kopf already watches every ConfigMap (its child_event below filters by label on its side), so this
    # costs no request. A tokenizer ConfigMap created or changed rolls its gateways' proxies at once.
    @kopf.on.event("", "v1", "configmaps", registry=registry)
    async def config_map_event(namespace: str | None, name: str, **_: Any) -> None:
        for gateway in config_map_users.users(namespace or "", name):
            log.info("ConfigMap %s/%s changed: reconciling gateway %s", namespace, name, gateway)
            await passes.triggered(namespace or "", gateway, f"ConfigMap {name} changed")

    for group, version, plural in CHILD_KINDS:

        @kopf.on.event(group, version, plural, labels=MANAGED, registry=registry)
        async def child_event(
            type: str | None, event: kopf.RawEvent, namespace: str | None, **_: Any
        ) -> None:
            obj: dict[str, Any] = dict(event.get("object") or {})
            owner = _owner(obj)
            if owner is None or not namespace:
                return
            priority = await children.changed(type, obj)
            if priority is None:
                return
            what = f"{obj.get('kind')} {obj.get('metadata', {}).get('name')}"
            why = f"{what} deleted" if type == "DELETED" else f"{what} changed"
            log.debug("gateway %s/%s: %s", namespace, owner, why)
            await passes.triggered(namespace, owner, why, priority)

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


async def periodic_loop(
    settings: Settings, reconciler: Reconciler, passes: Passes | None = None, watchdog: Watchdog | None = None
) -> None:
    """Every ``migration_tick_seconds``, reconcile the gateways whose migration is under way (it waits for
    proxies and checks metrics on a clock, not on watch events); every ``resync_seconds``, all gateways
    (the drift check), and those whose objects were refused once their backoff (:class:`Backoff`) ends,
    until a pass succeeds. One LIST per tick and scope; writes only when something changed. A gateway in
    backoff is left alone until its time comes.

    Nothing one gateway does stops the loop: :meth:`Reconciler.sync` reports a gateway's own failures, a
    pass is cut at :data:`PASS_TIMEOUT`, and whatever else is raised is logged (once per distinct message)
    before the loop goes on. Each tick and each pass tells ``watchdog`` the loop is alive.

    A loop of its own rather than kopf timers: kopf puts a finalizer on objects with timers, and a
    finalizer would leave gateways undeletable while the operator is down."""
    loop = asyncio.get_running_loop()
    passes = passes or Passes(reconciler)
    beat = watchdog.beat if watchdog is not None else lambda: None
    next_resync = loop.time() + settings.resync_seconds
    logged: dict[str, str] = {}  # what the loop last logged, per gateway ("" for the listing)

    def warn_once(key: str, message: str, exc: BaseException | None = None) -> None:
        if logged.get(key) != message:
            logged[key] = message
            log.warning("periodic pass: %s", message, exc_info=exc)

    while True:
        await asyncio.sleep(settings.migration_tick_seconds)
        beat()
        resync = loop.time() >= next_resync
        if resync:
            next_resync = loop.time() + settings.resync_seconds
        scopes: list[str | None] = list(settings.namespaces) or [None]
        for namespace in scopes:
            try:
                gateways = await asyncio.wait_for(reconciler.kube.list_gateways(namespace), PASS_TIMEOUT)
            except Exception as exc:  # the API server down, for one: try at the next tick
                detail = exc.status.message if isinstance(exc, ApiError) else f"{type(exc).__name__}: {exc}"
                warn_once(f"list {namespace}", f"cannot list gateways: {detail}")
                continue
            logged.pop(f"list {namespace}", None)
            for gateway in gateways:
                meta = gateway.get("metadata") or {}
                key = f"{meta.get('namespace')}/{meta.get('name')}"
                try:
                    namespace_, name = meta["namespace"], meta["name"]
                    if passes.backoff.waiting(namespace_, name) or passes.busy(namespace_, name):
                        continue  # in backoff, or a pass of it under way already
                    if not (resync or _migrating(gateway) or passes.backoff.due(namespace_, name)):
                        continue
                    await passes.run(namespace_, name, PERIODIC)
                except PassFailed as exc:
                    warn_once(key, f"pass of {key} failed: {exc}")
                except Exception as exc:  # never stop the loop for the other gateways
                    warn_once(key, f"pass of {key} failed: {type(exc).__name__}: {exc}", exc)
                else:
                    logged.pop(key, None)
                finally:
                    beat()
