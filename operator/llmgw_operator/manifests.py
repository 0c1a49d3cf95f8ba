"""Pure functions from an ``LLMGateway`` to the Kubernetes objects that run it.

Each ``build_*`` function takes plain dicts (the gateway's metadata and its defaulted spec) and returns
a manifest as a plain dict, ready for server-side apply. Nothing here talks to the API server, so every
rule about what the operator creates is unit-tested without one.

What one gateway ``NAME`` becomes (all in its namespace, all owned by it, so deleting the gateway
deletes them through the garbage collector):

- ConfigMap ``NAME-config``: the proxy's own YAML configuration (:mod:`llmgw_common.config`), rendered from
  the spec. It names Secrets by environment variable only; values never appear in it.
- ServiceAccount ``NAME-proxy``: the proxies' identity; they need no API access, so no token is mounted.
- Deployment ``NAME-proxy``: the proxies. Provider API keys arrive as ``valueFrom.secretKeyRef`` env;
  a hash of the referenced Secrets' resourceVersions in the pod template rolls the pods on rotation.
  An engine provider's ``tokenizerConfigMap`` is a ConfigMap volume at ``/etc/llmgw/tokenizers/PROVIDER``,
  the ``tokenizerPath`` of its proxy configuration; a hash of those ConfigMaps' resourceVersions rolls the
  pods too, since a proxy reads a tokenizer once, when it makes the provider's client.
  The config is a ConfigMap volume (not ``subPath``, so the kubelet updates it in place) that the
  proxies hot-reload: changing the gRPC weight never restarts a pod.
- Service ``NAME``: ports named ``grpc`` (appProtocol grpc), ``http`` and ``metrics``, so a mesh or a
  Gateway API route can treat each by its protocol.
- PodDisruptionBudget ``NAME-proxy`` when replicas > 1: at most one proxy evicted at a time.
"""

from __future__ import annotations

import hashlib
from typing import Any

import yaml

from llmgw_common.providers import TYPES as PROVIDER_TYPES

from .spec import GROUP, KIND, VERSION, parse_duration, secret_key_refs, tokenizer_config_maps

CONFIG_DIR = "/etc/llmgw"
CONFIG_FILE = f"{CONFIG_DIR}/config.yaml"
TLS_DIR = "/etc/llmgw/tls"
TOKENIZERS_DIR = "/etc/llmgw/tokenizers"
MANAGED_BY = "llmgw-operator"
ANNOTATION_SECRETS_HASH = f"{GROUP}/secrets-hash"
ANNOTATION_TOKENIZERS_HASH = f"{GROUP}/tokenizers-hash"

Manifest = dict[str, Any]


def labels(name: str) -> dict[str, str]:
    """Labels on every object of gateway ``name``; the first three select its proxy pods."""
    return {
        "app.kubernetes.io/name": "llm-gateway-proxy",
        "app.kubernetes.io/instance": name,
        f"{GROUP}/gateway": name,
        "app.kubernetes.io/component": "proxy",
        "app.kubernetes.io/managed-by": MANAGED_BY,
    }


def selector(name: str) -> dict[str, str]:
    return {
        key: labels(name)[key]
        for key in ("app.kubernetes.io/name", "app.kubernetes.io/instance", f"{GROUP}/gateway")
    }


def selector_string(name: str) -> str:
    return ",".join(f"{key}={value}" for key, value in selector(name).items())


def owner_reference(meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(meta: dict[str, Any], name: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": meta["namespace"],
        "labels": labels(meta["name"]),
        "ownerReferences": [owner_reference(meta)],
        **extra,
    }


def config_map_name(gateway: str) -> str:
    return f"{gateway}-config"


def proxy_name(gateway: str) -> str:
    return f"{gateway}-proxy"


def tokenizer_dir(provider: str) -> str:
    """Where provider ``provider``'s ``tokenizerConfigMap`` is mounted in the proxy's container."""
    return f"{TOKENIZERS_DIR}/{provider}"


def tokenizer_volume_name(provider: str) -> str:
    """The pod's volume of provider ``provider``'s ``tokenizerConfigMap``: a digest of the provider's name, a
    valid volume name (a DNS label) whatever the name, and one that stays when providers are reordered."""
    return "tokenizer-" + hashlib.sha256(provider.encode()).hexdigest()[:12]


def proxy_settings(provider: str, block: dict[str, Any]) -> dict[str, Any]:
    """A type's block as the proxy's configuration has it: the keys are the CRD's, but for
    ``tokenizerConfigMap``, which the proxy knows as the ``tokenizerPath`` where the operator mounts it."""
    settings = dict(block)
    if "tokenizerConfigMap" in settings:
        del settings["tokenizerConfigMap"]
        settings["tokenizerPath"] = tokenizer_dir(provider)
    return settings


# A provider's type is the one member block it sets (the Kubernetes union style, as in VolumeSource), with
# the same name and keys in the LLMGateway and in the proxy's configuration (but tokenizerConfigMap, see
# proxy_settings). The keys of each block the operator renders; the proxy defaults any it leaves out exactly
# as the CRD does.
def _provider_config(provider: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"name": provider["name"]}
    # Every member the spec sets is rendered: with none or two (the CRD refuses both) the proxy's own check
    # names the problem.
    for member in PROVIDER_TYPES:
        if member in provider:
            out[member] = proxy_settings(provider["name"], provider[member] or {})
    refs = {ref.env for ref in secret_key_refs({"providers": [provider]})}
    if refs:
        out["apiKey"] = {"env": refs.pop()}
    out["timeoutSeconds"] = parse_duration(provider["timeout"])
    out["connectTimeoutSeconds"] = parse_duration(provider["connectTimeout"])
    if "streamIdleTimeout" in provider:
        out["streamIdleTimeoutSeconds"] = parse_duration(provider["streamIdleTimeout"])
    retries = provider.get("retries", {})
    out["retries"] = {
        "maxAttempts": retries.get("maxAttempts", 3),
        "initialBackoffSeconds": parse_duration(retries.get("initialBackoff", "100ms")),
        "maxBackoffSeconds": parse_duration(retries.get("maxBackoff", "5s")),
    }
    if "headers" in provider:
        out["headers"] = provider["headers"]
    out["vendorExtras"] = provider.get("vendorExtras", "passThrough")
    return out


def _route_config(route: dict[str, Any], grpc_weight: int) -> dict[str, Any]:
    out: dict[str, Any] = {"model": route["model"]}
    for key in ("rest", "grpc", "upstreamModel"):
        if key in route:
            out[key] = route[key]
    # The gateway's weight applies where both paths exist; a one-path route is 0 or 100 by nature.
    out["grpcWeight"] = (
        grpc_weight if "rest" in route and "grpc" in route else (100 if "grpc" in route else 0)
    )
    return out


def build_proxy_config(spec: dict[str, Any], grpc_weight: int, generation: int) -> dict[str, Any]:
    """The proxy's configuration (the shape :func:`llmgw_common.config.parse` checks) for a defaulted spec."""
    proxy = spec["proxy"]
    ports = proxy["ports"]
    config: dict[str, Any] = {
        "generation": generation,
        "listen": {
            "grpc": f"0.0.0.0:{ports['grpc']}",
            "rest": f"0.0.0.0:{ports['rest']}",
            "admin": f"0.0.0.0:{ports['admin']}",
        },
        "limits": {
            "maxConcurrentRequests": proxy["maxConcurrentRequests"],
            "maxRequestBytes": proxy["maxRequestBytes"],
            "requestTimeoutSeconds": parse_duration(proxy["requestTimeout"]),
            # Each network layer's bounds, as the proxy reads them (the CRD has the same keys and no
            # defaults, so a key left out keeps the proxy's default).
            **{
                layer: dict(block)
                for layer, block in (proxy.get("limits") or {}).items()
                if block is not None
            },
        },
        "providers": [_provider_config(p) for p in spec["providers"]],
        "routes": [_route_config(r, grpc_weight) for r in spec["routes"]],
    }
    cache = proxy.get("cache")
    if cache and cache.get("enabled"):
        config["cache"] = {
            "enabled": True,
            "maxEntries": cache["maxEntries"],
            "ttlSeconds": parse_duration(cache["ttl"]),
        }
    if proxy.get("clientAuthSecretRef"):
        config["auth"] = {"apiKeysEnv": "LLMGW_CLIENT_API_KEYS"}
    if proxy.get("tlsSecretName"):
        config["tls"] = {"certFile": f"{TLS_DIR}/tls.crt", "keyFile": f"{TLS_DIR}/tls.key"}
    return config


def render_config(config: dict[str, Any]) -> str:
    return (
        "# Rendered by the llm-gateway operator from an LLMGateway; edits are overwritten.\n"
        + yaml.safe_dump(config, sort_keys=False)
    )


def build_config_map(meta: dict[str, Any], config_text: str) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(meta, config_map_name(meta["name"])),
        "data": {"config.yaml": config_text},
    }


def build_service_account(meta: dict[str, Any]) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _metadata(meta, proxy_name(meta["name"])),
        "automountServiceAccountToken": False,
    }


def versions_hash(versions: dict[str, str]) -> str:
    """A digest of the resourceVersions of the objects the proxies read, by name (never their data): a
    change rolls the pods."""
    text = "\n".join(f"{name}={version}" for name, version in sorted(versions.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


secrets_hash = versions_hash  # of the referenced Secrets, for ANNOTATION_SECRETS_HASH


def _probe(path: str, port: str, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": port, "scheme": "HTTP"},
        "periodSeconds": period,
        "timeoutSeconds": 2,
        "failureThreshold": failures,
        "successThreshold": 1,
    }


def build_deployment(
    meta: dict[str, Any],
    spec: dict[str, Any],
    image: str,
    secrets_digest: str,
    tokenizers_digest: str | None = None,
) -> Manifest:
    """The proxies' Deployment. ``secrets_digest`` and ``tokenizers_digest`` (of the tokenizer ConfigMaps,
    None without any) go into the pod template, so that a change of those objects rolls the pods."""
    name, proxy = meta["name"], spec["proxy"]
    ports = proxy["ports"]
    env: list[dict[str, Any]] = [{"name": "LLMGW_LOG_LEVEL", "value": proxy["logLevel"]}]
    env += [
        {"name": ref.env, "valueFrom": {"secretKeyRef": {"name": ref.secret, "key": ref.key}}}
        for ref in secret_key_refs(spec)
    ]
    volumes: list[dict[str, Any]] = [
        {
            "name": "config",
            "configMap": {
                "name": config_map_name(name),
                "items": [{"key": "config.yaml", "path": "config.yaml"}],
            },
        },
        {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    if proxy.get("tlsSecretName"):
        volumes.append({"name": "tls", "secret": {"secretName": proxy["tlsSecretName"]}})
        mounts.append({"name": "tls", "mountPath": TLS_DIR, "readOnly": True})
    for provider, config_map in tokenizer_config_maps(spec):
        # Every key is a file (no items): the tokenizer's files are whatever the ConfigMap holds. Not
        # optional: without its tokenizer the provider cannot serve (the operator holds the Deployment
        # back and reports a missing ConfigMap before this is applied).
        volume = tokenizer_volume_name(provider)
        volumes.append({"name": volume, "configMap": {"name": config_map, "optional": False}})
        mounts.append({"name": volume, "mountPath": tokenizer_dir(provider), "readOnly": True})
    container: dict[str, Any] = {
        "name": "proxy",
        "image": image,
        "args": ["proxy", "--config", CONFIG_FILE],
        "ports": [
            {"name": "grpc", "containerPort": ports["grpc"], "protocol": "TCP"},
            {"name": "http", "containerPort": ports["rest"], "protocol": "TCP"},
            {"name": "metrics", "containerPort": ports["admin"], "protocol": "TCP"},
        ],
        "env": env,
        "volumeMounts": mounts,
        "readinessProbe": _probe("/readyz", "metrics", 5, 2),
        "livenessProbe": _probe("/healthz", "metrics", 10, 3),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    for key in ("imagePullPolicy", "resources"):
        if proxy.get(key):
            container[key] = proxy[key]
    pod_spec: dict[str, Any] = {
        "serviceAccountName": proxy_name(name),
        "automountServiceAccountToken": False,
        # The proxy drains for 25 s on SIGTERM (shutdown.drainSeconds); leave it room to finish.
        "terminationGracePeriodSeconds": 30,
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": volumes,
    }
    for key in (
        "nodeSelector",
        "tolerations",
        "affinity",
        "topologySpreadConstraints",
        "priorityClassName",
        "imagePullSecrets",
    ):
        if proxy.get(key):
            pod_spec[key] = proxy[key]
    annotations = {
        **proxy.get("podAnnotations", {}),
        ANNOTATION_SECRETS_HASH: secrets_digest,
        **({ANNOTATION_TOKENIZERS_HASH: tokenizers_digest} if tokenizers_digest is not None else {}),
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(ports["admin"]),
        "prometheus.io/path": "/metrics",
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(meta, proxy_name(name)),
        "spec": {
            "replicas": proxy["replicas"],
            "revisionHistoryLimit": 5,
            "selector": {"matchLabels": selector(name)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {
                    "labels": {**proxy.get("podLabels", {}), **labels(name)},
                    "annotations": annotations,
                },
                "spec": pod_spec,
            },
        },
    }


def build_service(meta: dict[str, Any], spec: dict[str, Any]) -> Manifest:
    proxy = spec["proxy"]
    ports = proxy["ports"]
    metadata = _metadata(meta, meta["name"])
    if proxy.get("serviceAnnotations"):
        metadata["annotations"] = dict(proxy["serviceAnnotations"])
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata,
        "spec": {
            "type": proxy["serviceType"],
            "selector": selector(meta["name"]),
            "ports": [
                {
                    "name": "grpc",
                    "port": ports["grpc"],
                    "targetPort": "grpc",
                    "protocol": "TCP",
                    "appProtocol": "grpc",
                },
                {
                    "name": "http",
                    "port": ports["rest"],
                    "targetPort": "http",
                    "protocol": "TCP",
                    "appProtocol": "http",
                },
                {
                    "name": "metrics",
                    "port": ports["admin"],
                    "targetPort": "metrics",
                    "protocol": "TCP",
                    "appProtocol": "http",
                },
            ],
        },
    }


def build_pod_disruption_budget(meta: dict[str, Any], spec: dict[str, Any]) -> Manifest | None:
    """None when one replica or fewer: a PDB would then block every voluntary eviction."""
    if spec["proxy"]["replicas"] <= 1:
        return None
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(meta, proxy_name(meta["name"])),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector(meta["name"])}},
    }
