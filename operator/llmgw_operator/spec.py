"""The ``LLMGateway`` spec as plain dicts: defaults from the CRD, durations, and the Secrets and ConfigMaps it
names.

The CRD's OpenAPI schema is the one source of defaults. The API server applies them when a resource is
stored; :func:`with_defaults` applies the same ones here (structural defaulting: a missing property gets
its ``default``, then objects are filled recursively), so the pure functions in :mod:`manifests` give the
same result for a spec typed in a unit test as for one read back from the API server.
"""

from __future__ import annotations

import copy
import functools
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

import yaml

from llmgw_common.providers import TYPES as PROVIDER_TYPES

GROUP = "llmgateway.io"
VERSION = "v1alpha1"
PLURAL = "llmgateways"
KIND = "LLMGateway"

# The CRD's duration fields match ^([0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h))+$ (a subset of Go's syntax).
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|ms|s|m|h)")


# What the API server accepts as an object name (a DNS-1123 subdomain) and as a namespace (a DNS-1123 label).
# The CRD holds every name it takes to this pattern; :mod:`kube` refuses any other before a request, since a
# name goes into the request's path as it is ("../../other-ns/secrets/x", "", "?watch=true").
OBJECT_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_OBJECT_NAME = re.compile(OBJECT_NAME_PATTERN)
_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def is_object_name(name: object) -> bool:
    """Whether ``name`` is a valid Kubernetes object name (a DNS-1123 subdomain, 1-253 characters)."""
    return isinstance(name, str) and len(name) <= 253 and _OBJECT_NAME.fullmatch(name) is not None


def is_namespace_name(name: object) -> bool:
    """Whether ``name`` is a valid namespace name (a DNS-1123 label, 1-63 characters)."""
    return isinstance(name, str) and len(name) <= 63 and _NAMESPACE.fullmatch(name) is not None


_NAME_RULES = "lowercase letters, digits, '-' and '.', at most 253 characters, starting and ending with a letter or digit"


def name_problems(spec: dict[str, Any]) -> list[str]:
    """One message per object name in ``spec`` that is not a Kubernetes name, naming its field. The CRD
    refuses them; a gateway stored under an older CRD may still have them, and the operator must neither
    put them in a request path nor retry them for ever."""
    fields: list[tuple[str, Any]] = []
    for i, provider in enumerate(spec.get("providers") or []):
        if isinstance(provider, dict) and isinstance(provider.get("apiKeySecretRef"), dict):
            fields.append(
                (f"spec.providers[{i}].apiKeySecretRef.name", provider["apiKeySecretRef"].get("name"))
            )
        for member in PROVIDER_TYPES:
            block = provider.get(member) if isinstance(provider, dict) else None
            if isinstance(block, dict) and "tokenizerConfigMap" in block:
                fields.append(
                    (f"spec.providers[{i}].{member}.tokenizerConfigMap", block["tokenizerConfigMap"])
                )
    proxy = spec.get("proxy") or {}
    if isinstance(proxy.get("clientAuthSecretRef"), dict):
        fields.append(("spec.proxy.clientAuthSecretRef.name", proxy["clientAuthSecretRef"].get("name")))
    if "tlsSecretName" in proxy:
        fields.append(("spec.proxy.tlsSecretName", proxy["tlsSecretName"]))
    for i, ref in enumerate(proxy.get("imagePullSecrets") or []):
        fields.append((f"spec.proxy.imagePullSecrets[{i}].name", (ref or {}).get("name")))
    if "priorityClassName" in proxy:
        fields.append(("spec.proxy.priorityClassName", proxy["priorityClassName"]))
    prometheus = (spec.get("migration") or {}).get("prometheus") or {}
    if isinstance(prometheus.get("bearerTokenSecretRef"), dict):
        fields.append(
            (
                "spec.migration.prometheus.bearerTokenSecretRef.name",
                prometheus["bearerTokenSecretRef"].get("name"),
            )
        )
    return [
        f"{field}: {shown(value, 80)!r} is not a valid Kubernetes name ({_NAME_RULES}): not requested"
        if isinstance(value, str)
        else f"{field}: must be a Kubernetes name, got {type(value).__name__}"
        for field, value in fields
        if not is_object_name(value)
    ]


GATEWAY_NAME_LIMIT = 63


def gateway_name_problem(name: str) -> str | None:
    """Why gateway ``name`` cannot name its objects, or None. Its name becomes the Service's name (a DNS
    label: no dots) and the value of the ``app.kubernetes.io/instance`` and ``llmgateway.io/gateway``
    labels (at most 63 characters). The CRD refuses other names; this catches gateways stored before."""
    if len(name) > GATEWAY_NAME_LIMIT:
        return (
            f"metadata.name: {shown(name, 80)!r} has {len(name)} characters; a gateway's name is its Service's "
            f"name and a label value, so at most {GATEWAY_NAME_LIMIT}: recreate the gateway under a shorter name"
        )
    if "." in name:
        return (
            f"metadata.name: {name!r} has a dot; a gateway's name is its Service's name, a DNS label "
            "(lowercase letters, digits and '-'): recreate the gateway under a name without dots"
        )
    return None


def shown(value: str, limit: int = 256) -> str:
    """``value`` as a message may quote it: at most ``limit`` characters, then an ellipsis and the full
    length (an annotation value of 10 KB is not copied into every message that names it)."""
    return value if len(value) <= limit else f"{value[:limit]}… ({len(value)} characters)"


def parse_duration(text: str) -> float:
    """A Go-style duration (``90s``, ``1m30s``, ``250ms``), as CEL's ``duration()`` accepts, in seconds."""
    parts = _DURATION_PART.findall(text)
    if not text or "".join(number + unit for number, unit in parts) != text:
        raise ValueError(f"not a duration: {text!r} (use e.g. 30s, 5m, 1h30m, 250ms)")
    return sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)


@functools.cache
def crd() -> dict[str, Any]:
    """The LLMGateway CustomResourceDefinition shipped with the operator (crds/ links to it)."""
    text = resources.files("llmgw_operator").joinpath("data/crd.yaml").read_text()
    loaded: dict[str, Any] = yaml.safe_load(text)
    return loaded


def _schema() -> dict[str, Any]:
    version = next(v for v in crd()["spec"]["versions"] if v["name"] == VERSION)
    spec_schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return spec_schema


def _default(value: Any, schema: dict[str, Any]) -> Any:
    if isinstance(value, dict) and schema.get("type") == "object":
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        # The API server drops a null for a field that is not nullable, then defaults it.
        for key in [k for k, v in value.items() if v is None]:
            sub = props.get(key, extra if isinstance(extra, dict) else None)
            if sub is not None and not sub.get("nullable"):
                del value[key]
        for key, sub in props.items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
        for key, item in value.items():
            if key in props:
                value[key] = _default(item, props[key])
            elif isinstance(schema.get("additionalProperties"), dict):
                value[key] = _default(item, schema["additionalProperties"])
    elif isinstance(value, list) and "items" in schema:
        return [_default(item, schema["items"]) for item in value]
    return value


def with_defaults(spec: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``spec`` with the CRD's defaults filled in, as the API server would store it."""
    defaulted: dict[str, Any] = _default(copy.deepcopy(dict(spec)), _schema())
    return defaulted


@dataclass(frozen=True)
class SecretKeyRef:
    """One key of one Secret the gateway needs, and the environment variable the proxy reads it from."""

    secret: str
    key: str
    env: str
    purpose: str  # for messages: "provider openai API key", "client API keys", ...


def env_name(prefix: str, name: str) -> str:
    return f"{prefix}_{re.sub(r'[^A-Za-z0-9]', '_', name).upper()}"


def secret_key_refs(spec: dict[str, Any]) -> list[SecretKeyRef]:
    """Every Secret key the proxies read through their environment, in a stable order."""
    refs = [
        SecretKeyRef(
            secret=p["apiKeySecretRef"]["name"],
            key=p["apiKeySecretRef"].get("key", "api-key"),
            env=env_name("LLMGW_API_KEY", p["name"]),
            purpose=f"API key of provider {p['name']}",
        )
        for p in spec.get("providers", [])
        if p.get("apiKeySecretRef")
    ]
    auth = spec.get("proxy", {}).get("clientAuthSecretRef")
    if auth:
        refs.append(
            SecretKeyRef(
                auth["name"], auth.get("key", "api-keys"), "LLMGW_CLIENT_API_KEYS", "client API keys"
            )
        )
    return refs


def referenced_secrets(spec: dict[str, Any]) -> list[str]:
    """Names of all Secrets the gateway depends on (env keys and the TLS Secret), sorted, unique."""
    names = {ref.secret for ref in secret_key_refs(spec)}
    tls = spec.get("proxy", {}).get("tlsSecretName")
    if tls:
        names.add(tls)
    return sorted(names)


def tokenizer_config_maps(spec: dict[str, Any]) -> list[tuple[str, str]]:
    """(provider name, ConfigMap name) of each provider whose tokenizer is a ConfigMap's, in the spec's order."""
    return [
        (provider["name"], provider[member]["tokenizerConfigMap"])
        for provider in spec.get("providers", [])
        for member in PROVIDER_TYPES
        if "tokenizerConfigMap" in (provider.get(member) or {})
    ]


def referenced_config_maps(spec: dict[str, Any]) -> list[str]:
    """Names of the ConfigMaps the gateway depends on (its providers' tokenizers), sorted, unique."""
    return sorted({config_map for _, config_map in tokenizer_config_maps(spec)})
