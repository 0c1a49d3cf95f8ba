"""Status of an ``LLMGateway``: Kubernetes-style conditions and a phase, computed as pure functions.

Conditions follow the API conventions (``metav1.Condition``): one entry per ``type`` with ``status``
True/False/Unknown, a CamelCase ``reason``, a ``message`` for people, the ``observedGeneration`` it was
computed for, and ``lastTransitionTime``, which changes only when ``status`` does, so an unchanged
gateway produces an identical status and the operator writes nothing.

- ``ConfigValid``: the spec renders into a proxy configuration the proxy accepts.
- ``SecretsResolved``: every referenced Secret and key exists (named in the message when not).
- ``Ready``: the proxies run the current spec and all wanted replicas are ready (False with reason
  ``ScaledToZero`` when ``spec.proxy.replicas`` is 0: nothing serves, by request).
- ``Progressing``: a REST-to-gRPC migration is under way (set by the migration controller).
- ``Degraded``: something needs a person: an invalid spec or gateway name, a missing Secret, a missing
  tokenizer ConfigMap (reason ``ConfigMapNotFound``; the Deployment is held as for a Secret), an object the
  API server refused, proxies the Deployment cannot create or roll out (its ``ReplicaFailure`` condition,
  or ``Progressing=False`` with ``ProgressDeadlineExceeded``), proxy containers that cannot run (an image
  that cannot be pulled, a crash loop), a rollback.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .spec import shown

CONDITION_TYPES = ("Ready", "ConfigValid", "SecretsResolved", "Progressing", "Degraded")


@dataclass(frozen=True)
class Observation:
    """What one reconciliation saw, the input of :func:`build_status`."""

    generation: int
    replicas: int
    grpc_weight: int
    config_generation: int
    selector: str
    config_error: str | None = None
    config_reason: str = "InvalidSpec"  # the reason of ConfigValid=False (InvalidName for the gateway's name)
    secret_problems: list[str] = field(default_factory=list)
    config_map_problems: list[str] = field(default_factory=list)  # tokenizer ConfigMaps missing or unusable
    apply_errors: list[str] = field(default_factory=list)  # objects the API server refused to write
    deployment: dict[str, Any] | None = None  # the live Deployment, or None if it does not exist
    migration: dict[str, Any] | None = None  # status.migration when spec.migration is set
    ignored_commands: dict[str, str] | None = None  # status.ignoredCommands: commands given with no migration
    pods: list[dict[str, Any]] | None = None  # the proxy pods, read when they are not all ready


def set_condition(
    conditions: list[dict[str, Any]],
    type_: str,
    status: str,
    reason: str,
    message: str,
    generation: int,
    now: str,
) -> list[dict[str, Any]]:
    """``conditions`` with ``type_`` set; ``lastTransitionTime`` kept unless ``status`` changed."""
    previous = next((c for c in conditions if c.get("type") == type_), None)
    transition = previous["lastTransitionTime"] if previous and previous.get("status") == status else now
    updated = {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": transition,
    }
    return [c for c in conditions if c.get("type") != type_] + [updated]


_MIGRATION_PROGRESSING = {
    # migration phase: (Progressing status, reason)
    "Pending": ("True", "WaitingForProxies"),
    "Progressing": ("True", "Progressing"),
    "Paused": ("False", "Paused"),
    "Succeeded": ("False", "Succeeded"),
    "RolledBack": ("False", "RolledBack"),
    "Failed": ("False", "ProgressDeadlineExceeded"),
}


def _migration_conditions(state: dict[str, Any], phase: str, cond: Any) -> str:
    """Set Progressing (and Degraded after a rollback or failure) from the migration; the gateway's phase."""
    mphase = state.get("phase", "Pending")
    status, reason = _MIGRATION_PROGRESSING.get(mphase, ("Unknown", mphase))
    message = state.get("message") or f"migration {mphase}"
    cond("Progressing", status, reason, message)
    if phase == "Degraded":
        return phase  # an invalid spec or a missing Secret says more than the migration
    if mphase in ("RolledBack", "Failed"):
        cond("Degraded", "True", reason, message)
    return mphase if mphase != "Pending" else phase


def _rollout(
    deployment: dict[str, Any] | None, generation_wanted: int, replicas: int
) -> tuple[bool, int, str]:
    """(proxies ready?, ready replicas, message) from the live Deployment."""
    if deployment is None:
        return False, 0, "the proxy Deployment does not exist yet"
    status = deployment.get("status", {})
    ready = status.get("readyReplicas", 0)
    if status.get("observedGeneration", 0) < generation_wanted:
        return False, ready, "the Deployment controller has not seen the latest proxy spec yet"
    updated = status.get("updatedReplicas", 0)
    if updated < replicas:
        return False, ready, f"rolling out: {updated}/{replicas} proxies updated"
    if ready < replicas:
        return False, ready, f"{ready}/{replicas} proxies ready"
    return True, ready, f"{ready}/{replicas} proxies ready"


MESSAGE_LIMIT = 1024  # of a message taken from another object (the Deployment's conditions)


def clip(text: str) -> str:
    return shown(text, MESSAGE_LIMIT)


def deployment_problem(deployment: dict[str, Any] | None) -> tuple[str, str] | None:
    """(reason, message) when the Deployment's own conditions say its proxies cannot come up: the
    ReplicaSet cannot create pods (``ReplicaFailure=True``, e.g. FailedCreate from a quota or a pod an
    admission check refuses), or the rollout stopped progressing (``Progressing=False``, reason
    ProgressDeadlineExceeded: pods that never become ready, such as an image that cannot be pulled).
    Only the spec the controller has seen counts: a condition from before the latest change is old news."""
    if deployment is None:
        return None
    status = deployment.get("status") or {}
    if status.get("observedGeneration", 0) < (deployment.get("metadata") or {}).get("generation", 0):
        return None
    name = (deployment.get("metadata") or {}).get("name", "of the proxies")
    conditions = {c.get("type"): c for c in status.get("conditions") or [] if isinstance(c, dict)}
    failure = conditions.get("ReplicaFailure")
    if failure and failure.get("status") == "True":
        detail = f"{failure.get('reason') or 'ReplicaFailure'}: {failure.get('message') or 'no message'}"
        return "ReplicaFailure", clip(f"Deployment {name} cannot create proxy pods: {detail}")
    progressing = conditions.get("Progressing")
    if (
        progressing
        and progressing.get("status") == "False"
        and progressing.get("reason") == "ProgressDeadlineExceeded"
    ):
        detail = progressing.get("message") or "no message"
        return "RolloutStalled", clip(
            f"Deployment {name} exceeded its progress deadline (ProgressDeadlineExceeded): {detail}; "
            "look at its pods (kubectl describe pods) for the cause, e.g. an image that cannot be pulled"
        )
    return None


_IMAGE_FAILURES = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"})
_CONTAINER_FAILURES = _IMAGE_FAILURES | {
    "CrashLoopBackOff",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
}


def pods_problem(pods: list[dict[str, Any]] | None) -> tuple[str, str] | None:
    """(reason, message) when proxy containers wait for a reason that needs a person: an image that cannot
    be pulled (reason ``ImagePullFailed``), or a container that cannot start or keeps crashing
    (``ProxiesFailing``). The Deployment says only that its rollout does not progress, and that only after
    its progress deadline (10 minutes); the pods' container states say why, at once."""
    failures = []
    for pod in sorted(pods or [], key=lambda p: str((p.get("metadata") or {}).get("name", ""))):
        status = pod.get("status") or {}
        if (pod.get("metadata") or {}).get("deletionTimestamp"):
            continue
        for container in (status.get("initContainerStatuses") or []) + (
            status.get("containerStatuses") or []
        ):
            waiting = (container.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in _CONTAINER_FAILURES:
                failures.append((pod["metadata"].get("name", "?"), container.get("name", "?"), waiting))
    if not failures:
        return None
    pod, container, waiting = failures[0]
    reason = "ImagePullFailed" if waiting["reason"] in _IMAGE_FAILURES else "ProxiesFailing"
    detail = f"{waiting['reason']}: {waiting.get('message') or 'no message'}"
    others = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
    return reason, clip(f"proxy pod {pod} container {container} cannot run: {detail}{others}")


def build_status(previous: dict[str, Any], seen: Observation, now: str) -> dict[str, Any]:
    """The gateway's new status. Fields the migration controller owns (``migration``) are kept."""
    conditions = [c for c in previous.get("conditions", []) if c.get("type") in CONDITION_TYPES]
    gen = seen.generation

    def cond(type_: str, status: str, reason: str, message: str) -> None:
        nonlocal conditions
        conditions = set_condition(conditions, type_, status, reason, message, gen, now)

    if seen.config_error:
        cond("ConfigValid", "False", seen.config_reason, seen.config_error)
    else:
        cond("ConfigValid", "True", "Rendered", "the spec renders into a valid proxy configuration")
    if seen.secret_problems:
        cond("SecretsResolved", "False", "SecretNotFound", "; ".join(seen.secret_problems))
    else:
        cond("SecretsResolved", "True", "AllFound", "every referenced Secret key exists")

    deployment_generation = (seen.deployment or {}).get("metadata", {}).get("generation", 0)
    proxies_ready, ready_replicas, rollout_message = _rollout(
        seen.deployment, deployment_generation, seen.replicas
    )
    stuck = deployment_problem(seen.deployment) or pods_problem(seen.pods)
    if seen.config_error:
        reason = seen.config_reason
        phase, ready_reason, ready_message = "Degraded", reason, "the spec is invalid: see ConfigValid"
        cond("Degraded", "True", reason, seen.config_error)
    elif seen.secret_problems:
        phase, ready_reason, ready_message = (
            "Degraded",
            "SecretsUnresolved",
            "waiting for Secrets: see SecretsResolved",
        )
        cond("Degraded", "True", "SecretsUnresolved", "; ".join(seen.secret_problems))
    elif seen.config_map_problems:
        message = "; ".join(seen.config_map_problems)
        phase, ready_reason, ready_message = (
            "Degraded",
            "ConfigMapNotFound",
            f"waiting for ConfigMaps: {message}",
        )
        cond("Degraded", "True", "ConfigMapNotFound", message)
    elif seen.apply_errors:
        phase, ready_reason, ready_message = "Degraded", "ApplyFailed", "; ".join(seen.apply_errors)
        cond("Degraded", "True", "ApplyFailed", "; ".join(seen.apply_errors))
    elif stuck is not None:
        phase, (ready_reason, ready_message) = "Degraded", stuck
        cond("Degraded", "True", *stuck)
    elif seen.replicas == 0:
        phase, ready_reason = "ScaledToZero", "ScaledToZero"
        ready_message = "spec.proxy.replicas is 0: no proxy runs, so the gateway serves nothing"
        cond("Degraded", "False", "AsExpected", "no problem found")
    else:
        phase = "Ready" if proxies_ready else "Pending"
        ready_reason = "ProxiesReady" if proxies_ready else "ProxiesNotReady"
        ready_message = rollout_message
        cond("Degraded", "False", "AsExpected", "no problem found")
    cond("Ready", "True" if phase == "Ready" else "False", ready_reason, ready_message)
    if seen.migration is None:
        cond("Progressing", "False", "NoMigration", "spec.migration is not set")
    else:
        phase = _migration_conditions(seen.migration, phase, cond)

    order = {t: i for i, t in enumerate(CONDITION_TYPES)}
    kept: dict[str, Any] = {} if seen.migration is None else {"migration": seen.migration}
    if seen.ignored_commands:
        kept["ignoredCommands"] = {**(previous.get("ignoredCommands") or {}), **seen.ignored_commands}
    status: dict[str, Any] = {
        # Kept when not observed this pass: a JSON merge patch could not remove them anyway.
        **{k: v for k, v in previous.items() if k in ("migration", "ignoredCommands")},
        **kept,
        "observedGeneration": gen,
        "phase": phase,
        "grpcWeight": seen.grpc_weight,
        "configGeneration": seen.config_generation,
        "replicas": seen.replicas,
        "readyReplicas": ready_replicas,
        "readyReplicasText": f"{ready_replicas}/{seen.replicas}",
        "selector": seen.selector,
        "conditions": sorted(conditions, key=lambda c: order[c["type"]]),
    }
    return status


def with_failure(
    previous: dict[str, Any], reason: str, message: str, generation: int, now: str
) -> dict[str, Any]:
    """``previous`` with Degraded=True for ``reason``: the pass of the gateway failed before it could
    observe anything, so everything else it last reported stays as it was."""
    conditions = [c for c in previous.get("conditions", []) if c.get("type") in CONDITION_TYPES]
    conditions = set_condition(conditions, "Degraded", "True", reason, message, generation, now)
    order = {t: i for i, t in enumerate(CONDITION_TYPES)}
    return {**previous, "phase": "Degraded", "conditions": sorted(conditions, key=lambda c: order[c["type"]])}
