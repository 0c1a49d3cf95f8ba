"""Reconciliation: make the objects of one ``LLMGateway`` match its spec, then report in its status.

:meth:`Reconciler.sync` is level-based and idempotent: whatever triggered it (a change of the gateway, of
a Secret or tokenizer ConfigMap it references, of one of its children, or the periodic drift check), it reads
the gateway and everything it depends on back from the API server, computes the desired objects with the pure
``build_*`` functions, writes only what differs, and sets the status. Nothing is kept in memory between
passes but a lock per gateway, so a restarted operator converges the same way.

"Differs" means: a desired field is missing or has another value in the live object, or the spec hash
the operator stamped on the object (``llmgateway.io/spec-hash``) is not that of the desired object (so a
field removed from the spec is removed from the object). Fields others set are left alone.

Every problem the operator can see ends up in the gateway's status (a condition with a reason naming it)
and an event, never only in its log nor in a retry loop: a spec the proxy would refuse, a name a CRD without
the name rules let through (``InvalidName``: nothing is requested under it), a missing Secret or tokenizer
ConfigMap, an object the API server refuses, a Deployment that cannot create pods or stopped progressing,
proxy containers that cannot run (read from the pods while the Deployment is not ready), migration commands
given without a migration.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime
import hashlib
import json
import logging
from decimal import Decimal, InvalidOperation
from typing import Any

import yaml
from lightkube import ApiError

from llmgw_common import config as proxy_config

from . import manifests, migration
from .analysis import MetricsSource, MetricsUnavailable, PrometheusSource, ScrapeSource, Targets, split_routes
from .kube import InvalidName, Kube
from .settings import Settings
from .spec import (
    GROUP,
    KIND,
    gateway_name_problem,
    name_problems,
    parse_duration,
    referenced_config_maps,
    referenced_secrets,
    secret_key_refs,
    shown,
    tokenizer_config_maps,
    with_defaults,
)
from .status import Observation, build_status, with_failure

log = logging.getLogger(__name__)

ANNOTATION_SPEC_HASH = f"{GROUP}/spec-hash"
_QUANTITY_SUFFIXES = {
    "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": Decimal(1),
    "k": Decimal(10**3), "M": Decimal(10**6), "G": Decimal(10**9), "T": Decimal(10**12),
    "Ki": Decimal(2**10), "Mi": Decimal(2**20), "Gi": Decimal(2**30), "Ti": Decimal(2**40),
}  # fmt: skip


def _quantity(value: Any) -> Decimal | None:
    text = str(value)
    for suffix in sorted(_QUANTITY_SUFFIXES, key=len, reverse=True):
        if suffix and text.endswith(suffix):
            number = text[: -len(suffix)]
            break
    else:
        suffix, number = "", text
    try:
        return Decimal(number) * _QUANTITY_SUFFIXES[suffix]
    except InvalidOperation:
        return None


def is_subset(desired: Any, live: Any) -> bool:
    """Whether every field of ``desired`` is in ``live`` with the same value (lists: same length, item by
    item). Quantities compare by value, since the API server normalizes them ("0.5" is stored "500m")."""
    if isinstance(desired, dict):
        return isinstance(live, dict) and all(k in live and is_subset(v, live[k]) for k, v in desired.items())
    if isinstance(desired, list):
        return isinstance(live, list) and len(desired) == len(live) and all(map(is_subset, desired, live))
    if isinstance(desired, bool) or isinstance(live, bool):
        return desired is live
    if desired == live:
        return True
    if isinstance(desired, str | int) and isinstance(live, str | int):
        a, b = _quantity(desired), _quantity(live)
        return a is not None and a == b
    return False


def spec_hash(manifest: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]


def stamped(manifest: dict[str, Any]) -> dict[str, Any]:
    """``manifest`` with the hash of its own content in an annotation."""
    digest = spec_hash(manifest)
    metadata = {
        **manifest["metadata"],
        "annotations": {**manifest["metadata"].get("annotations", {}), ANNOTATION_SPEC_HASH: digest},
    }
    return {**manifest, "metadata": metadata}


def up_to_date(desired: dict[str, Any], live: dict[str, Any] | None) -> bool:
    if live is None:
        return False
    live_hash = live.get("metadata", {}).get("annotations", {}).get(ANNOTATION_SPEC_HASH)
    return live_hash == desired["metadata"]["annotations"][ANNOTATION_SPEC_HASH] and is_subset(desired, live)


def grpc_weight(spec: dict[str, Any], status: dict[str, Any]) -> int:
    """The weight to render: the migration's current one (kept in status), or the fixed ``grpcWeight``."""
    if "migration" in spec:
        return int(status.get("migration", {}).get("weight", 0))
    return int(spec.get("grpcWeight", 0))


def next_config_generation(live_text: str | None, rendered: dict[str, Any], floor: int) -> int:
    """The generation for ``rendered``: the live one if the content is the same, else one more.

    Proxies export the generation they run, which is how the migration knows a weight is live."""
    if live_text:
        try:
            live = yaml.safe_load(live_text)
        except yaml.YAMLError:
            live = None
        if isinstance(live, dict):
            live_generation = live.get("generation", 0)
            if not isinstance(live_generation, int) or isinstance(live_generation, bool):
                return floor + 1  # hand-edited into something no proxy runs: rewritten as a new generation
            if {**live, "generation": 0} == {**rendered, "generation": 0}:
                return live_generation
            return max(live_generation, floor) + 1
    return floor + 1


def check_spec(spec: dict[str, Any], weight: int) -> tuple[dict[str, Any] | None, str | None]:
    """(the rendered proxy config, None) or (None, what is wrong): the proxy's own checks decide."""
    try:
        rendered = manifests.build_proxy_config(spec, weight, 0)
        proxy_config.parse(rendered)
    except (proxy_config.ConfigError, ValueError, KeyError) as exc:
        return None, f"spec does not render into a valid proxy configuration: {exc}"
    return rendered, None


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ApplyFailed(RuntimeError):
    """Some of a gateway's objects could not be written (already reported in its status); retry later."""


class GatewayProblem(Exception):
    """Something about one gateway (its spec, a Secret it names) stops its pass; ``reason`` names it in
    the gateway's Degraded condition and event."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def describe_failure(exc: BaseException) -> tuple[str, str]:
    """(reason, message) for the status of a gateway whose pass raised ``exc``."""
    if isinstance(exc, GatewayProblem):
        return exc.reason, exc.message
    return "ReconcileError", f"the operator failed to reconcile this gateway: {type(exc).__name__}: {exc}"


_MIGRATION_REASONS = {"RolledBack", "ProgressDeadlineExceeded"}
_WARNING = {("ConfigValid", "False"), ("SecretsResolved", "False"), ("Degraded", "True")}


def condition_events(previous: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(type, reason, message) of the events a status change deserves: a condition that changed, or a
    new one that reports a problem or readiness."""
    before = {c["type"]: c for c in previous.get("conditions", [])}
    events = []
    for cond in current.get("conditions", []):
        if cond["type"] == "Progressing" or cond.get("reason") in _MIGRATION_REASONS:
            continue  # the migration records its own events for these, with more to say
        old = before.get(cond["type"])
        warning = (cond["type"], cond["status"]) in _WARNING
        if old is None and not (warning or (cond["type"] == "Ready" and cond["status"] == "True")):
            continue
        if old is not None and (old["status"], old.get("reason")) == (cond["status"], cond.get("reason")):
            continue
        events.append(
            (
                "Warning" if warning else "Normal",
                cond["reason"],
                f"{cond['type']}={cond['status']}: {cond['message']}",
            )
        )
    return events


def _condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c.get("type") == type_), {})


_COMMAND_RECORD_LIMIT = 256


def command_record(value: str) -> str:
    """What ``status.ignoredCommands`` keeps of a command's value: the value, or a digest of a long one."""
    if len(value) <= _COMMAND_RECORD_LIMIT:
        return value
    return "sha256:" + hashlib.sha256(value.encode()).hexdigest()


def ignored_commands(
    annotations: dict[str, str], previous: dict[str, Any]
) -> tuple[dict[str, str], list[migration.Action]]:
    """Migration commands on a gateway without ``spec.migration``: (their record for
    ``status.ignoredCommands``, a Warning ``CommandIgnored`` event for each value not reported before)."""
    seen = previous.get("ignoredCommands") or {}
    records: dict[str, str] = {}
    actions = []
    for key in migration.COMMANDS:
        value = annotations.get(key)
        if value is None or seen.get(key) == command_record(value):
            continue
        records[key] = command_record(value)
        verb = key.rsplit("/", 1)[-1]
        actions.append(
            migration.Action(
                "Warning",
                "CommandIgnored",
                f"{key}={shown(value, migration.TOKEN_LIMIT)} ignored: spec.migration is not set, so there is "
                f"no migration to {verb} (the fixed split is spec.grpcWeight)",
            )
        )
    return records, actions


class Reconciler:
    """Drives gateways towards their spec; one :meth:`sync` per gateway at a time."""

    def __init__(self, kube: Kube, settings: Settings) -> None:
        self.kube = kube
        self.settings = settings
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._failures: dict[tuple[str, str], tuple[str, str]] = {}  # what was last logged, per gateway
        self._scrape = ScrapeSource()
        self._prometheus: dict[tuple[str, str | None], PrometheusSource] = {}

    async def close(self) -> None:
        await self._scrape.close()
        for source in self._prometheus.values():
            await source.close()

    async def _metrics_source(self, namespace: str, plan: dict[str, Any]) -> MetricsSource:
        """The gateway's Prometheus, else the operator's, else scraping the proxies directly."""
        prometheus = plan.get("prometheus") or {}
        url = prometheus.get("url") or self.settings.prometheus_url
        if not url:
            return self._scrape
        token = None
        ref = prometheus.get("bearerTokenSecretRef")
        if ref:
            secret = await self.kube.get("Secret", namespace, ref["name"])
            encoded = ((secret or {}).get("data") or {}).get(ref.get("key", "token"))
            if encoded is None:
                raise MetricsUnavailable(
                    f"Secret {ref['name']!r} key {ref.get('key', 'token')!r} (Prometheus token) not found"
                )
            try:
                token = base64.b64decode(encoded, validate=True).decode().strip()
            except (binascii.Error, UnicodeDecodeError) as exc:
                raise GatewayProblem(
                    "InvalidPrometheusToken",
                    f"Secret {ref['name']!r} key {ref.get('key', 'token')!r} (Prometheus bearer token) is not "
                    f"UTF-8 text: {type(exc).__name__}",
                ) from None
            if any(not 0x21 <= ord(c) <= 0x7E for c in token):
                raise GatewayProblem(
                    "InvalidPrometheusToken",
                    f"Secret {ref['name']!r} key {ref.get('key', 'token')!r} (Prometheus bearer token) has "
                    "characters a bearer token cannot have (only printable ASCII, no spaces)",
                )
        key = (url, token)
        if key not in self._prometheus:
            try:
                self._prometheus[key] = PrometheusSource(url, token)
            except ValueError as exc:  # an unparsable URL; user:password@ in it and a bearer token
                where = "spec.migration.prometheus.url" if prometheus.get("url") else "LLMGW_PROMETHEUS_URL"
                raise GatewayProblem("InvalidPrometheusURL", f"{where}: {exc}") from None
        return self._prometheus[key]

    async def _advance_migration(
        self, gateway: dict[str, Any], spec: dict[str, Any], state: dict[str, Any], config_generation: int
    ) -> tuple[dict[str, Any], list[migration.Action]]:
        """One tick of the migration: read the live proxies (and the metrics when a check is due), advance."""
        meta = gateway["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        plan = spec["migration"]
        now = datetime.datetime.now(datetime.UTC)
        pods = await self.kube.list_pods(namespace, manifests.selector(name))
        admin_port = spec["proxy"]["ports"]["admin"]
        endpoints = tuple(
            f"{pod['status']['podIP']}:{admin_port}"
            for pod in pods
            if not pod["metadata"].get("deletionTimestamp")
            and pod.get("status", {}).get("podIP")
            and any(
                c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", [])
            )
        )
        targets = Targets(namespace, name, endpoints, split_routes(spec))
        measurements = None
        unavailable = ""
        source: MetricsSource = self._scrape  # the live state is read from the pods whichever source counts
        try:
            source = await self._metrics_source(namespace, plan)
            if migration.check_due(plan, state, now):
                measurements = await source.measure(targets.key, targets, parse_duration(plan["interval"]))
        except MetricsUnavailable as exc:
            # No numbers is an inconclusive check, never a passed one; the message says where to look
            # ("cannot reach Prometheus at URL: ..."), in the check's reason and its event.
            unavailable = str(exc)
            log.warning("gateway %s/%s: metrics unavailable: %s", namespace, name, exc)
        proxies = await source.proxies(targets)
        commands = {k: v for k, v in (meta.get("annotations") or {}).items() if k in migration.COMMANDS}
        new_state, actions = migration.advance(
            plan, state, proxies, measurements, config_generation, now, commands, unavailable
        )
        if new_state.get("phase") in migration.FINAL_PHASES:
            self._scrape.forget(targets.key)  # readings are for checks, and none will come
        return new_state, actions

    async def sync(self, namespace: str, name: str) -> dict[str, Any] | None:
        """Reconcile gateway ``namespace/name``; its new status, or None if it is gone."""
        lock = self._locks.setdefault((namespace, name), asyncio.Lock())
        async with lock:
            gateway = await self.kube.get(KIND, namespace, name)
            if gateway is None:
                self._locks.pop((namespace, name), None)
                self._failures.pop((namespace, name), None)
                self._scrape.forget((namespace, name))
                return None
            if gateway["metadata"].get("deletionTimestamp"):
                return None  # owner references let the garbage collector remove the children
            try:
                status = await self._sync(gateway)
            except InvalidName as exc:
                # A name kube.py refused before any request: the gateway's, not the API server's, problem.
                problem = GatewayProblem("InvalidName", exc.status.message or str(exc))
                return await self._report_failure(gateway, problem)
            except (ApiError, ApplyFailed):
                raise  # the API server's trouble, or already in the status: the caller retries
            except Exception as exc:  # one gateway must never stop the operator
                return await self._report_failure(gateway, exc)
            self._failures.pop((namespace, name), None)
            return status

    async def _report_failure(self, gateway: dict[str, Any], exc: Exception) -> dict[str, Any] | None:
        """The pass of ``gateway`` raised ``exc``: say so in its status (Degraded, with a reason naming the
        problem), in an event, and in the log, each once per distinct problem. Its new status, if written."""
        meta = gateway["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        reason, message = describe_failure(exc)
        if self._failures.get((namespace, name)) != (reason, message):
            self._failures[(namespace, name)] = (reason, message)
            log.error(
                "gateway %s/%s: %s: %s",
                namespace,
                name,
                reason,
                message,
                exc_info=None if isinstance(exc, GatewayProblem) else exc,
            )
        previous = gateway.get("status") or {}
        status = with_failure(previous, reason, message, meta.get("generation", 0), _now())
        if status == previous:
            return status
        try:
            await self.kube.patch_status(namespace, name, status)
            for type_, event_reason, event_message in condition_events(previous, status):
                await self.kube.event(gateway, type_, event_reason, event_message)
        except ApiError as api_error:
            log.warning(
                "gateway %s/%s: cannot report %s: %s", namespace, name, reason, api_error.status.message
            )
            return None
        return status

    async def _ensure(
        self,
        gateway: dict[str, Any],
        manifest: dict[str, Any],
        live: dict[str, Any] | bool | None = False,
        created: list[str] | None = None,
    ) -> dict[str, Any]:
        """Apply ``manifest`` unless the live object already matches; ``live`` False means "not read yet".
        A created object is added to ``created`` (one event tells them all)."""
        desired = stamped(manifest)
        meta = desired["metadata"]
        if live is False:
            live = await self.kube.get(desired["kind"], meta["namespace"], meta["name"])
        assert live is not True
        if up_to_date(desired, live):
            assert live is not None
            return live
        applied = await self.kube.apply(desired)
        if live is None:
            if created is not None:
                created.append(f"{desired['kind']} {meta['name']}")
        elif desired["kind"] == "ConfigMap":
            generation = yaml.safe_load(desired["data"]["config.yaml"]).get("generation")
            await self.kube.event(
                gateway, "Normal", "ConfigUpdated", f"proxy configuration is now generation {generation}"
            )
        elif desired["kind"] == "Deployment":
            await self.kube.event(gateway, "Normal", "ProxiesUpdated", f"updated Deployment {meta['name']}")
        return applied

    async def _check_secrets(self, namespace: str, spec: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
        """(problems naming each missing Secret or key, resourceVersion of each Secret found)."""
        names = referenced_secrets(spec)
        found = await asyncio.gather(*(self.kube.get("Secret", namespace, name) for name in names))
        secrets = dict(zip(names, found, strict=True))
        problems: list[str] = []
        for ref in secret_key_refs(spec):
            secret = secrets[ref.secret]
            if secret is None:
                problems.append(f"Secret {ref.secret!r} ({ref.purpose}) not found in namespace {namespace}")
            elif ref.key not in (secret.get("data") or {}):
                problems.append(f"Secret {ref.secret!r} has no key {ref.key!r} ({ref.purpose})")
        tls = spec["proxy"].get("tlsSecretName")
        if tls:
            secret = secrets[tls]
            missing = [key for key in ("tls.crt", "tls.key") if key not in ((secret or {}).get("data") or {})]
            if secret is None:
                problems.append(f"Secret {tls!r} (TLS certificate) not found in namespace {namespace}")
            elif missing:
                problems.append(f"Secret {tls!r} has no key {missing[0]!r} (TLS certificate)")
        versions = {name: s["metadata"]["resourceVersion"] for name, s in secrets.items() if s is not None}
        return list(dict.fromkeys(problems)), versions

    async def _check_config_maps(
        self, namespace: str, spec: dict[str, Any]
    ) -> tuple[list[str], dict[str, str]]:
        """(problems naming each missing tokenizer ConfigMap or one without tokenizer.json, resourceVersion of
        each ConfigMap found)."""
        names = referenced_config_maps(spec)
        found = await asyncio.gather(*(self.kube.get("ConfigMap", namespace, name) for name in names))
        config_maps = dict(zip(names, found, strict=True))
        problems: list[str] = []
        for provider, name in tokenizer_config_maps(spec):
            config_map = config_maps[name]
            if config_map is None:
                problems.append(
                    f"ConfigMap {name!r} (tokenizer of provider {provider}) not found in namespace {namespace}"
                )
            elif "tokenizer.json" not in {
                **(config_map.get("data") or {}),
                **(config_map.get("binaryData") or {}),
            }:
                problems.append(
                    f"ConfigMap {name!r} has no key 'tokenizer.json' (tokenizer of provider {provider})"
                )
        versions = {
            name: c["metadata"]["resourceVersion"] for name, c in config_maps.items() if c is not None
        }
        return problems, versions

    async def _sync(self, gateway: dict[str, Any]) -> dict[str, Any]:
        meta = gateway["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        previous = gateway.get("status") or {}
        spec = with_defaults(gateway.get("spec") or {})
        weight = grpc_weight(spec, previous)
        # Names the CRD refuses, in a gateway stored before it did: reported, never requested nor retried.
        bad_names = [p for p in (gateway_name_problem(name),) if p] + name_problems(spec)
        config_reason = "InvalidName" if bad_names else "InvalidSpec"
        secret_problems: list[str] = []
        versions: dict[str, str] = {}
        config_map_problems: list[str] = []
        config_map_versions: dict[str, str] = {}
        live_config: dict[str, Any] | None = None
        deployment: dict[str, Any] | None = None
        rendered: dict[str, Any] | None = None
        config_error: str | None = "; ".join(bad_names)
        if not bad_names:
            rendered, config_error = check_spec(spec, weight)
            (
                (secret_problems, versions),
                (config_map_problems, config_map_versions),
                live_config,
                deployment,
            ) = await asyncio.gather(
                self._check_secrets(namespace, spec),
                self._check_config_maps(namespace, spec),
                self.kube.get("ConfigMap", namespace, manifests.config_map_name(name)),
                self.kube.get("Deployment", namespace, manifests.proxy_name(name)),
            )
        live_text = (live_config or {}).get("data", {}).get("config.yaml")
        config_generation = int(previous.get("configGeneration", 0))
        migration_state = previous.get("migration") or {}
        actions: list[migration.Action] = []
        ignored: dict[str, str] = {}
        if "migration" not in spec:
            ignored, actions = ignored_commands(meta.get("annotations") or {}, previous)
        apply_errors: list[str] = []
        created: list[str] = []
        missing = secret_problems or config_map_problems
        if rendered is not None and "migration" in spec and not missing:
            # The migration judges the weight rendered so far; a new weight is rendered right after.
            live_generation = next_config_generation(live_text, rendered, config_generation)
            migration_state, actions = await self._advance_migration(
                gateway, spec, migration_state, live_generation
            )
            if migration_state["weight"] != weight:
                weight = migration_state["weight"]
                rendered, config_error = check_spec(spec, weight)
        if rendered is not None:
            config_generation = next_config_generation(live_text, rendered, config_generation)
            rendered["generation"] = config_generation
            config_text = manifests.render_config(rendered)
            pdb = manifests.build_pod_disruption_budget(meta, spec)
            results = await asyncio.gather(
                self._ensure(gateway, manifests.build_config_map(meta, config_text), live_config, created),
                self._ensure(gateway, manifests.build_service_account(meta), created=created),
                self._ensure(gateway, manifests.build_service(meta, spec), created=created),
                self._ensure(gateway, pdb, created=created)
                if pdb is not None
                else self.kube.delete("PodDisruptionBudget", namespace, manifests.proxy_name(name))
                if previous.get("replicas", 0) > 1
                else asyncio.sleep(0),
                return_exceptions=True,
            )
            if not missing:
                # With a Secret or ConfigMap missing, the running proxies are left as they are rather than
                # broken. A tokenizer ConfigMap's new version rolls them: a proxy reads a tokenizer once.
                image = spec["proxy"].get("image") or self.settings.proxy_image
                tokenizers_digest = (
                    manifests.versions_hash(config_map_versions) if config_map_versions else None
                )
                desired = manifests.build_deployment(
                    meta, spec, image, manifests.secrets_hash(versions), tokenizers_digest
                )
                try:
                    deployment = await self._ensure(gateway, desired, deployment, created)
                except ApiError as exc:
                    results.append(exc)
            # One object refused (a quota, a full Service IP range, an admission webhook) must not stop the
            # others; it is reported in the status, and the pass is retried.
            for result in results:
                if isinstance(result, ApiError):
                    apply_errors.append(f"{result.status.reason or 'Error'}: {result.status.message}")
                elif isinstance(result, BaseException):
                    raise result

        pods = None
        wanted = spec["proxy"]["replicas"]
        if (
            deployment is not None
            and wanted
            and (deployment.get("status") or {}).get("readyReplicas", 0) < wanted
        ):
            # Why proxies are not ready (an image that cannot be pulled, a crash loop) is in their pods only.
            try:
                pods = await self.kube.list_pods(namespace, manifests.selector(name))
            except ApiError as exc:
                log.debug("gateway %s/%s: cannot list its pods: %s", namespace, name, exc.status.message)
        status = build_status(
            previous,
            Observation(
                generation=meta.get("generation", 0),
                replicas=spec["proxy"]["replicas"],
                grpc_weight=weight,
                config_generation=config_generation,
                selector=manifests.selector_string(name),
                config_error=config_error,
                config_reason=config_reason,
                secret_problems=secret_problems,
                config_map_problems=config_map_problems,
                apply_errors=apply_errors,
                deployment=deployment,
                migration=migration_state if "migration" in spec else None,
                ignored_commands=ignored,
                pods=pods,
            ),
            _now(),
        )
        if config_error and config_error != _condition(previous, "ConfigValid").get("message"):
            log.warning("gateway %s/%s: %s: %s", namespace, name, config_reason, config_error)
        if status != previous:
            await self.kube.patch_status(namespace, name, status)
            for type_, reason, message in condition_events(previous, status):
                await self.kube.event(gateway, type_, reason, message)
        if created:
            await self.kube.event(gateway, "Normal", "Created", "created " + ", ".join(sorted(created)))
        for action in actions:
            await self.kube.event(gateway, action.type, action.reason, action.message)
        if apply_errors:
            raise ApplyFailed(f"{namespace}/{name}: " + "; ".join(apply_errors))
        return status
