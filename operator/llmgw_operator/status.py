"""Status of an ``LLMGateway``: Kubernetes-style conditions and a phase, computed as pure functions.

Conditions follow the API conventions (``metav1.Condition``): one entry per ``type`` with ``status``
True/False/Unknown, a CamelCase ``reason``, a ``message`` for people, the ``observedGeneration`` it was
computed for, and ``lastTransitionTime``, which changes only when ``status`` does, so an unchanged
gateway produces an identical status and the operator writes nothing.

- ``ConfigValid``: the spec renders into a proxy configuration the proxy accepts.
- ``SecretsResolved``: every referenced Secret and key exists (named in the message when not).
- ``Ready``: the proxies run the current spec and all wanted replicas are ready.
- ``Progressing``: a REST-to-gRPC migration is under way (set by the migration controller).
- ``Degraded``: something needs a person: an invalid spec, a missing Secret, a rollback.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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
    secret_problems: list[str] = field(default_factory=list)
    apply_errors: list[str] = field(default_factory=list)  # objects the API server refused to write
    deployment: dict[str, Any] | None = None  # the live Deployment, or None if it does not exist
    migration: dict[str, Any] | None = None  # status.migration when spec.migration is set


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


def build_status(previous: dict[str, Any], seen: Observation, now: str) -> dict[str, Any]:
    """The gateway's new status. Fields the migration controller owns (``migration``) are kept."""
    conditions = [c for c in previous.get("conditions", []) if c.get("type") in CONDITION_TYPES]
    gen = seen.generation

    def cond(type_: str, status: str, reason: str, message: str) -> None:
        nonlocal conditions
        conditions = set_condition(conditions, type_, status, reason, message, gen, now)

    if seen.config_error:
        cond("ConfigValid", "False", "InvalidSpec", seen.config_error)
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
    if seen.config_error:
        phase, ready_reason, ready_message = "Degraded", "InvalidSpec", "the spec is invalid: see ConfigValid"
        cond("Degraded", "True", "InvalidSpec", seen.config_error)
    elif seen.secret_problems:
        phase, ready_reason, ready_message = (
            "Degraded",
            "SecretsUnresolved",
            "waiting for Secrets: see SecretsResolved",
        )
        cond("Degraded", "True", "SecretsUnresolved", "; ".join(seen.secret_problems))
    elif seen.apply_errors:
        phase, ready_reason, ready_message = "Degraded", "ApplyFailed", "; ".join(seen.apply_errors)
        cond("Degraded", "True", "ApplyFailed", "; ".join(seen.apply_errors))
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
    kept = {} if seen.migration is None else {"migration": seen.migration}
    status: dict[str, Any] = {
        **{k: v for k, v in previous.items() if k == "migration"},
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
