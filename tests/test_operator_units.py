"""The operator's pure parts: defaults, rendering, manifests, status. No API server needed."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from lightkube import ApiError

from llmgw_common import config as proxy_config
from llmgw_operator import manifests
from llmgw_operator.kube import InvalidName, Kube, check_name
from llmgw_operator.reconcile import (
    check_spec,
    condition_events,
    grpc_weight,
    is_subset,
    next_config_generation,
    stamped,
    up_to_date,
)
from llmgw_operator.settings import Settings, SettingsError
from llmgw_operator.spec import (
    OBJECT_NAME_PATTERN,
    crd,
    is_namespace_name,
    is_object_name,
    parse_duration,
    secret_key_refs,
    with_defaults,
)
from llmgw_operator.status import Observation, build_status

META = {"name": "gw", "namespace": "team-a", "uid": "0b5c-uid"}


def sample_spec(**overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "providers": [
            {
                "name": "openai",
                "openai": {"baseURL": "https://api.openai.com/v1"},
                "apiKeySecretRef": {"name": "llm-keys"},
            },
            {"name": "vllm", "llmgateway": {"target": "vllm.models:50051"}},
            {
                "name": "claude",
                "anthropic": {"baseURL": "https://api.anthropic.com"},
                "apiKeySecretRef": {"name": "llm-keys", "key": "anthropic"},
            },
        ],
        "routes": [
            {"model": "gpt-4o-mini", "rest": "openai", "grpc": "vllm"},
            {"model": "claude-*", "rest": "claude"},
            {"model": "llama-*", "grpc": "vllm"},
        ],
    }
    spec.update(overrides)
    return with_defaults(spec)


def test_defaults_come_from_the_crd() -> None:
    spec = sample_spec()
    assert spec["proxy"]["replicas"] == 2
    assert spec["proxy"]["ports"] == {"grpc": 50051, "rest": 8080, "admin": 9090}
    assert spec["providers"][0]["timeout"] == "120s"
    assert spec["providers"][0]["apiKeySecretRef"] == {"name": "llm-keys", "key": "api-key"}
    assert "migration" not in spec
    migrating = sample_spec(migration={})
    assert migrating["migration"]["steps"] == [10, 25, 50, 100]
    assert migrating["migration"]["analysis"]["minRequests"] == 20


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("1m30s", 90), ("250ms", 0.25), ("2h", 7200), ("1.5s", 1.5)]
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "5 m", "m5", "5d", "-1s"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


def test_rendered_config_is_accepted_by_the_proxy_and_names_no_secret_value() -> None:
    config = manifests.build_proxy_config(
        sample_spec(proxy={"clientAuthSecretRef": {"name": "clients"}}), 25, 7
    )
    parsed = proxy_config.parse(config)
    assert parsed.generation == 7
    weights = {route.model: route.grpc_weight for route in parsed.routes}
    assert weights == {"gpt-4o-mini": 25, "claude-*": 0, "llama-*": 100}
    assert config["providers"][0]["apiKey"] == {"env": "LLMGW_API_KEY_OPENAI"}
    assert "apiKey" not in config["providers"][1]
    assert config["auth"] == {"apiKeysEnv": "LLMGW_CLIENT_API_KEYS"}
    assert parsed.providers["openai"].timeout_s == 120


def test_provider_blocks_reach_the_proxy_config() -> None:
    spec = sample_spec()
    spec["providers"][1]["llmgateway"]["tls"] = True
    spec["providers"][2]["anthropic"].update(version="2024-10-22", defaultMaxTokens=1024)
    spec["providers"][2]["headers"] = {"anthropic-beta": "prompt-caching-2024-07-31"}
    openai, vllm, claude = manifests.build_proxy_config(spec, 0, 1)["providers"]
    # The CRD's default (maxConnections) rendered; nothing of the other members, no flat fields.
    assert openai == {
        "name": "openai",
        "openai": {"baseURL": "https://api.openai.com/v1", "maxConnections": 256},
        "apiKey": {"env": "LLMGW_API_KEY_OPENAI"},
        "timeoutSeconds": 120.0,
        "connectTimeoutSeconds": 5.0,
        "retries": {"maxAttempts": 3, "initialBackoffSeconds": 0.1, "maxBackoffSeconds": 5.0},
        "vendorExtras": "passThrough",
    }
    assert vllm["llmgateway"] == {"target": "vllm.models:50051", "tls": True}
    assert claude["anthropic"] == {
        "baseURL": "https://api.anthropic.com",
        "version": "2024-10-22",
        "defaultMaxTokens": 1024,
        "maxConnections": 256,
    }
    assert claude["headers"] == {"anthropic-beta": "prompt-caching-2024-07-31"}
    # Unset in the spec, unset in the config: the proxy defaults them as the CRD documents.
    plain = manifests.build_proxy_config(sample_spec(), 0, 1)["providers"]
    assert plain[1]["llmgateway"] == {"target": "vllm.models:50051"}
    assert plain[2]["anthropic"] == {"baseURL": "https://api.anthropic.com", "maxConnections": 256}


def test_provider_blocks_through_the_proxy_parser() -> None:
    spec = sample_spec()
    spec["providers"][1]["llmgateway"]["tls"] = True
    spec["providers"][2]["anthropic"].update(version="2024-10-22", defaultMaxTokens=1024)
    spec["providers"][1]["vendorExtras"] = "drop"
    parsed = proxy_config.parse(manifests.build_proxy_config(spec, 0, 1)).providers
    assert {name: p.type for name, p in parsed.items()} == {
        "openai": "openai",
        "vllm": "llmgateway",
        "claude": "anthropic",
    }
    assert parsed["vllm"].settings.tls is True
    assert parsed["claude"].settings.version == "2024-10-22"
    assert parsed["claude"].settings.default_max_tokens == 1024
    assert (parsed["vllm"].vendor_extras, parsed["openai"].vendor_extras) == ("drop", "passThrough")


def test_the_crds_provider_blocks_are_the_proxys_provider_types() -> None:
    """One block per provider type in the CRD, with the keys the proxy's parser of that type reads once the
    operator rendered it (a block is copied as it is, but tokenizerConfigMap, which becomes a tokenizerPath)."""
    from llmgw_common.providers import TYPES
    from llmgw_common.reader import Reader
    from llmgw_operator.spec import crd

    version = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    item = version["properties"]["spec"]["properties"]["providers"]["items"]
    shared = {"apiKeySecretRef", "retries", "headers"}  # the objects every type has
    members = {
        name: schema["properties"]
        for name, schema in item["properties"].items()
        if schema.get("type") == "object" and name not in shared
    }
    assert set(members) == set(TYPES) == set(manifests.PROVIDER_TYPES)
    examples = {
        "baseURL": "https://api.example.com/v1",
        "target": "inference:50051",
        "version": "2023-06-01",
        "defaultMaxTokens": 1024,
        "tls": True,
        "resolveIntervalSeconds": 10,
        "loadsIntervalSeconds": 2,
        "tokenizerPath": "/models/qwen",
        "tokenizerConfigMap": "qwen-tokenizer",
        "chatTemplate": "{{ messages[0].content }}",
        "toolCallParser": "hermes",
        "reasoningParser": "qwen3",
        "maxTokenizerBytes": 64 * 1024 * 1024,
    }
    for name, properties in members.items():
        block = {key: schema.get("default", examples.get(key)) for key, schema in properties.items()}
        block = {key: value for key, value in block.items() if value is not None}
        assert set(block) == set(properties), f"{name}: give the test an example value for {properties}"
        # The two sources of a tokenizer are exclusive (a CEL rule): each is rendered without the other.
        sources = {"tokenizerPath", "tokenizerConfigMap"} & set(block)
        variants = [{k: v for k, v in block.items() if k != s} for s in sources] if sources else [block]
        for variant in variants:
            reader = Reader(manifests.proxy_settings("p", variant), name)
            TYPES[name].parse(reader)
            reader.done()  # raises for a key the proxy does not know
    # The union rule names every member, so a new type's block is covered by it.
    (rule,) = item["x-kubernetes-validations"]
    for name in manifests.PROVIDER_TYPES:
        assert f"has(self.{name})" in rule["rule"] and name in rule["message"]


def test_deployment_reads_secrets_through_env_refs_only() -> None:
    spec = sample_spec(proxy={"clientAuthSecretRef": {"name": "clients"}, "tlsSecretName": "gw-tls"})
    deployment = manifests.build_deployment(META, spec, "img:1", "abc123")
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["LLMGW_API_KEY_OPENAI"]["valueFrom"] == {
        "secretKeyRef": {"name": "llm-keys", "key": "api-key"}
    }
    assert env["LLMGW_API_KEY_CLAUDE"]["valueFrom"] == {
        "secretKeyRef": {"name": "llm-keys", "key": "anthropic"}
    }
    assert env["LLMGW_CLIENT_API_KEYS"]["valueFrom"] == {
        "secretKeyRef": {"name": "clients", "key": "api-keys"}
    }
    assert pod["metadata"]["annotations"][manifests.ANNOTATION_SECRETS_HASH] == "abc123"
    assert {"name": "tls", "secret": {"secretName": "gw-tls"}} in pod["spec"]["volumes"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert deployment["metadata"]["ownerReferences"][0]["uid"] == META["uid"]
    assert deployment["spec"]["selector"]["matchLabels"] == manifests.selector("gw")


def _engine_spec(**settings: Any) -> dict[str, Any]:
    return with_defaults(
        {
            "providers": [
                {"name": "qwen", "vllm": {"target": "vllm.models:50051", **settings}},
                {"name": "a" * 40, "sglang": {"target": "sglang.models:30000", **settings}},
                {"name": "llama", "trtllm": {"target": "trtllm.models:50051"}},
            ],
            "routes": [{"model": "qwen3", "grpc": "qwen"}, {"model": "llama", "grpc": "llama"}],
        }
    )


def test_a_tokenizer_config_map_is_mounted_where_the_proxy_reads_it() -> None:
    spec = _engine_spec(tokenizerConfigMap="qwen-tokenizer")
    rendered, problem = check_spec(spec, 0)  # the proxy's own parser accepts the rendered config
    assert problem is None and rendered is not None
    by_name = {p["name"]: p for p in rendered["providers"]}
    assert by_name["qwen"]["vllm"] == {
        "target": "vllm.models:50051",
        "tokenizerPath": "/etc/llmgw/tokenizers/qwen",
    }
    assert by_name["a" * 40]["sglang"]["tokenizerPath"] == f"/etc/llmgw/tokenizers/{'a' * 40}"
    assert "tokenizerPath" not in by_name["llama"]["trtllm"]
    assert "tokenizerConfigMap" not in repr(rendered)

    pod = manifests.build_deployment(META, spec, "img:1", "abc123", "def456")["spec"]["template"]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["mountPath"]: m for m in pod["spec"]["containers"][0]["volumeMounts"]}
    tokenizer_volumes = [v for v in volumes.values() if v["name"].startswith("tokenizer-")]
    assert len(tokenizer_volumes) == 2 and len(volumes) == len(pod["spec"]["volumes"])  # unique names
    for provider in ("qwen", "a" * 40):
        mount = mounts[f"/etc/llmgw/tokenizers/{provider}"]
        assert mount["readOnly"] is True
        # Every key a file (no items), and no pod without its tokenizer.
        assert volumes[mount["name"]]["configMap"] == {"name": "qwen-tokenizer", "optional": False}
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", mount["name"]) and len(mount["name"]) <= 63
    assert manifests.tokenizer_volume_name("qwen") != manifests.tokenizer_volume_name("llama")
    assert pod["metadata"]["annotations"][manifests.ANNOTATION_TOKENIZERS_HASH] == "def456"
    # Without a tokenizer ConfigMap, the pod template is what it was (no roll of existing gateways).
    plain = manifests.build_deployment(META, _engine_spec(), "img:1", "abc123")["spec"]["template"]
    assert manifests.ANNOTATION_TOKENIZERS_HASH not in plain["metadata"]["annotations"]
    assert not [v for v in plain["spec"]["volumes"] if v["name"].startswith("tokenizer-")]


def test_a_tokenizer_config_map_name_the_crd_would_refuse_is_not_requested() -> None:
    from llmgw_operator.spec import name_problems, referenced_config_maps, tokenizer_config_maps

    spec = _engine_spec(tokenizerConfigMap="../../kube-system/configmaps/x")
    assert name_problems(spec) == [
        f"spec.providers[{i}].{member}.tokenizerConfigMap: '../../kube-system/configmaps/x' is not a valid "
        "Kubernetes name (lowercase letters, digits, '-' and '.', at most 253 characters, starting and ending "
        "with a letter or digit): not requested"
        for i, member in ((0, "vllm"), (1, "sglang"))
    ]
    spec = _engine_spec(tokenizerConfigMap="qwen-tokenizer")
    assert tokenizer_config_maps(spec) == [("qwen", "qwen-tokenizer"), ("a" * 40, "qwen-tokenizer")]
    assert referenced_config_maps(spec) == ["qwen-tokenizer"]


async def test_a_missing_tokenizer_config_map_holds_the_deployment_and_is_reported() -> None:
    spec = _engine_spec(tokenizerConfigMap="qwen-tokenizer")
    kube = FakeKube(_stored(spec=spec))
    status = await _sync(kube)
    degraded = condition_of(status, "Degraded")
    assert (status["phase"], degraded["reason"]) == ("Degraded", "ConfigMapNotFound")
    assert degraded["message"] == (
        "ConfigMap 'qwen-tokenizer' (tokenizer of provider qwen) not found in namespace team-a; "
        f"ConfigMap 'qwen-tokenizer' (tokenizer of provider {'a' * 40}) not found in namespace team-a"
    )
    assert ("Warning", "ConfigMapNotFound") in {(t, r) for t, r, _ in kube.events}
    assert ("Deployment", "gw-proxy") not in kube.objects  # no pod that cannot start
    assert ("ConfigMap", "gw-config") in kube.objects  # the rest is applied

    kube.objects[("ConfigMap", "qwen-tokenizer")] = {"metadata": {"resourceVersion": "7"}, "data": {}}
    status = await _sync(kube)
    assert "has no key 'tokenizer.json'" in condition_of(status, "Degraded")["message"]

    def tokenizers_hash() -> str:
        template = kube.objects[("Deployment", "gw-proxy")]["spec"]["template"]
        return str(template["metadata"]["annotations"][manifests.ANNOTATION_TOKENIZERS_HASH])

    kube.objects[("ConfigMap", "qwen-tokenizer")] = {
        "metadata": {"resourceVersion": "8"},
        "binaryData": {"tokenizer.json": "e30="},
    }
    status = await _sync(kube)
    assert condition_of(status, "Degraded")["status"] == "False"
    first = tokenizers_hash()
    # A new version of the ConfigMap rolls the pods: a proxy reads its tokenizer once.
    kube.objects[("ConfigMap", "qwen-tokenizer")]["metadata"]["resourceVersion"] = "9"
    await _sync(kube)
    assert tokenizers_hash() != first


def test_secrets_hash_changes_with_any_version() -> None:
    a = manifests.secrets_hash({"llm-keys": "10", "clients": "11"})
    assert a == manifests.secrets_hash({"clients": "11", "llm-keys": "10"})
    assert a != manifests.secrets_hash({"llm-keys": "12", "clients": "11"})


def test_secret_refs_are_stable_and_named() -> None:
    refs = secret_key_refs(sample_spec())
    assert [(r.secret, r.key, r.env) for r in refs] == [
        ("llm-keys", "api-key", "LLMGW_API_KEY_OPENAI"),
        ("llm-keys", "anthropic", "LLMGW_API_KEY_CLAUDE"),
    ]


def test_service_ports_are_named_by_protocol() -> None:
    service = manifests.build_service(META, sample_spec())
    assert [(p["name"], p["port"], p["appProtocol"]) for p in service["spec"]["ports"]] == [
        ("grpc", 50051, "grpc"),
        ("http", 8080, "http"),
        ("metrics", 9090, "http"),
    ]


def test_pdb_only_with_more_than_one_replica() -> None:
    assert manifests.build_pod_disruption_budget(META, sample_spec(proxy={"replicas": 1})) is None
    pdb = manifests.build_pod_disruption_budget(META, sample_spec(proxy={"replicas": 3}))
    assert pdb is not None and pdb["spec"]["maxUnavailable"] == 1


def test_is_subset_compares_quantities_by_value_and_lists_by_length() -> None:
    assert is_subset({"cpu": "0.5", "memory": "1Gi"}, {"cpu": "500m", "memory": "1024Mi", "extra": 1})
    assert not is_subset({"cpu": "1"}, {"cpu": "500m"})
    assert not is_subset([1, 2], [1, 2, 3])
    assert not is_subset({"a": True}, {"a": 1})


def test_up_to_date_sees_removed_fields_through_the_hash() -> None:
    desired = stamped(
        {"kind": "ConfigMap", "metadata": {"name": "x", "labels": {"a": "1"}}, "data": {"k": "v"}}
    )
    assert up_to_date(desired, desired)
    trimmed = stamped({"kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"k": "v"}})
    assert not up_to_date(trimmed, desired)  # live still has label a, the new desired object does not
    drifted = {**desired, "data": {"k": "edited"}}
    assert not up_to_date(desired, drifted)


def test_config_generation_moves_only_when_content_changes() -> None:
    config = manifests.build_proxy_config(sample_spec(), 0, 3)
    text = manifests.render_config(config)
    assert next_config_generation(text, {**config, "generation": 0}, 3) == 3
    changed = manifests.build_proxy_config(sample_spec(), 10, 0)
    assert next_config_generation(text, changed, 3) == 4
    assert next_config_generation(None, changed, 0) == 1


def test_weight_comes_from_the_migration_or_the_fixed_split() -> None:
    assert grpc_weight(sample_spec(grpcWeight=30), {}) == 30
    assert grpc_weight(sample_spec(migration={}), {"migration": {"weight": 25}}) == 25
    assert grpc_weight(sample_spec(migration={}), {}) == 0


def _observation(**kw: Any) -> Observation:
    base: dict[str, Any] = dict(generation=1, replicas=2, grpc_weight=0, config_generation=1, selector="a=b")
    return Observation(**{**base, **kw})


READY_DEPLOYMENT = {
    "metadata": {"generation": 2},
    "status": {"observedGeneration": 2, "updatedReplicas": 2, "readyReplicas": 2},
}


def test_status_pending_then_ready_keeps_transition_times() -> None:
    pending = build_status({}, _observation(), "2026-01-01T00:00:00Z")
    assert pending["phase"] == "Pending"
    assert pending["readyReplicasText"] == "0/2"
    ready = build_status(pending, _observation(deployment=READY_DEPLOYMENT), "2026-01-01T00:01:00Z")
    assert ready["phase"] == "Ready"
    conditions = {c["type"]: c for c in ready["conditions"]}
    assert conditions["Ready"]["lastTransitionTime"] == "2026-01-01T00:01:00Z"
    assert conditions["ConfigValid"]["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    again = build_status(ready, _observation(deployment=READY_DEPLOYMENT), "2026-01-01T00:02:00Z")
    assert again == ready  # nothing changed: nothing to write
    events = condition_events(pending, ready)
    assert events == [("Normal", "ProxiesReady", "Ready=True: 2/2 proxies ready")]


def test_status_degraded_names_the_missing_secret() -> None:
    problem = "Secret 'llm-keys' (API key of provider openai) not found in namespace team-a"
    status = build_status({}, _observation(secret_problems=[problem]), "2026-01-01T00:00:00Z")
    assert status["phase"] == "Degraded"
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["SecretsResolved"]["status"] == "False"
    assert conditions["SecretsResolved"]["message"] == problem
    assert conditions["Degraded"]["reason"] == "SecretsUnresolved"
    reasons = {reason for _, reason, _ in condition_events({}, status)}
    assert {"SecretNotFound", "SecretsUnresolved"} <= reasons


def test_status_degraded_names_the_missing_config_map() -> None:
    problem = "ConfigMap 'qwen-tokenizer' (tokenizer of provider qwen) not found in namespace team-a"
    status = build_status({}, _observation(config_map_problems=[problem]), "2026-01-01T00:00:00Z")
    assert status["phase"] == "Degraded"
    conditions = {c["type"]: c for c in status["conditions"]}
    assert (conditions["Degraded"]["reason"], conditions["Degraded"]["message"]) == (
        "ConfigMapNotFound",
        problem,
    )
    assert (conditions["Ready"]["status"], conditions["Ready"]["reason"]) == ("False", "ConfigMapNotFound")
    assert conditions["SecretsResolved"]["status"] == "True"
    assert ("Warning", "ConfigMapNotFound", f"Degraded=True: {problem}") in condition_events({}, status)


def test_status_keeps_the_migration_state() -> None:
    status = build_status({"migration": {"weight": 25}}, _observation(grpc_weight=25), "t")
    assert status["migration"] == {"weight": 25}  # kept while spec.migration is gone (it may come back)
    state = {"phase": "RolledBack", "weight": 0, "message": "gRPC error rate 0.30 > 0.01: rolled back"}
    rolled_back = build_status({}, _observation(deployment=READY_DEPLOYMENT, migration=state), "t")
    assert rolled_back["phase"] == "RolledBack"
    conditions = {c["type"]: c for c in rolled_back["conditions"]}
    assert (conditions["Degraded"]["status"], conditions["Degraded"]["reason"]) == ("True", "RolledBack")
    assert conditions["Degraded"]["message"] == state["message"]
    assert conditions["Progressing"]["status"] == "False"


def test_settings_from_env() -> None:
    settings = Settings.from_env({"LLMGW_NAMESPACES": "a, b", "LLMGW_RESYNC_SECONDS": "30"})
    assert settings.namespaces == ("a", "b") and not settings.clusterwide
    assert settings.resync_seconds == 30
    with pytest.raises(SettingsError, match="LLMGW_RESYNC_SECONDS: must be positive"):
        Settings.from_env({"LLMGW_RESYNC_SECONDS": "0"})
    with pytest.raises(SettingsError, match="LLMGW_LOG_LEVEL"):
        Settings.from_env({"LLMGW_LOG_LEVEL": "loud"})


def test_crd_file_in_crds_is_the_packaged_one() -> None:
    from pathlib import Path

    from llmgw_operator.spec import crd

    assert yaml.safe_load(Path("crds/llmgateways.llmgateway.io.yaml").read_text()) == crd()


def test_status_reports_objects_the_api_server_refused() -> None:
    refused = 'Internal error occurred: failed to allocate a serviceIP for Service "gw": range is full'
    status = build_status({}, _observation(apply_errors=[f"InternalError: {refused}"]), "t")
    conditions = {c["type"]: c for c in status["conditions"]}
    assert status["phase"] == "Degraded"
    assert conditions["Degraded"]["reason"] == "ApplyFailed"
    assert "range is full" in conditions["Ready"]["message"]


# Specs the CRD now refuses, as they could still be stored (written before the CRD was upgraded): the
# operator renders them, the proxy's own parser refuses them, and the gateway reports ConfigValid=False.
HOSTILE_SPECS = [
    (
        {"X-Team": "a\r\nX-Injected: 1"},
        None,
        "providers[0].headers.X-Team: a header value must not contain CR",
    ),
    ({"X-Team": "a\0b"}, None, "providers[0].headers.X-Team: a header value must not contain CR, LF or NUL"),
    ({"": "x"}, None, "providers[0].headers.: a header name must be an RFC 9110 token"),
    ({"X Team": "x"}, None, "providers[0].headers.X Team: a header name must be an RFC 9110 token"),
    ({"Content-Length": "0"}, None, "providers[0].headers.Content-Length: set by the proxy"),
    ({"Transfer-Encoding": "chunked"}, None, "providers[0].headers.Transfer-Encoding: set by the proxy"),
    ({"Host": "internal"}, None, "providers[0].headers.Host: set by the proxy"),
    ({"Keep-Alive": "1"}, None, "providers[0].headers.Keep-Alive: set by the proxy"),
    (None, "https://u:p@api.openai.com/v1", "providers[0].openai.baseURL: credentials belong in apiKey"),
]


@pytest.mark.parametrize(
    ("headers", "base_url", "message"), HOSTILE_SPECS, ids=[m[:48] for *_, m in HOSTILE_SPECS]
)
def test_a_spec_the_proxy_would_refuse_is_config_valid_false(
    headers: dict[str, str] | None, base_url: str | None, message: str
) -> None:
    spec = sample_spec()
    if headers is not None:
        spec["providers"][0]["headers"] = headers
    if base_url is not None:
        spec["providers"][0]["openai"]["baseURL"] = base_url
    rendered, error = check_spec(spec, 0)
    assert rendered is None
    assert error is not None and message in error, error
    assert "u:p@" not in error
    status = build_status({}, _observation(config_error=error), "2026-01-01T00:00:00Z")
    conditions = {c["type"]: c for c in status["conditions"]}
    assert (conditions["ConfigValid"]["status"], conditions["ConfigValid"]["message"]) == ("False", error)
    assert status["phase"] == "Degraded"


def test_crd_object_names_are_kubernetes_names() -> None:
    """Every Secret or object name the CRD takes has the pattern kube.py checks, and a length of 1-253."""
    found = []

    def walk(schema: Any, path: str) -> None:
        if isinstance(schema, dict):
            if schema.get("pattern") == OBJECT_NAME_PATTERN:
                assert (schema.get("minLength"), schema.get("maxLength")) == (1, 253), path
                found.append(path)
            for key, value in schema.items():
                walk(value, f"{path}.{key}")

    walk(crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"], "spec")
    names = sorted(p.replace(".properties", "").replace(".items", "[]") for p in found)
    assert names == [
        "spec.migration.prometheus.bearerTokenSecretRef.name",
        "spec.providers[].apiKeySecretRef.name",
        "spec.providers[].sglang.tokenizerConfigMap",
        "spec.providers[].trtllm.tokenizerConfigMap",
        "spec.providers[].vllm.tokenizerConfigMap",
        "spec.proxy.clientAuthSecretRef.name",
        "spec.proxy.imagePullSecrets[].name",
        "spec.proxy.priorityClassName",
        "spec.proxy.tlsSecretName",
    ]


HOSTILE_NAMES = ["../../victim/secrets/stolen", "", "?watch=true", "a/b", "x..y", "Upper", "a" * 254, "ok\n"]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
async def test_kube_refuses_a_bad_name_before_any_request(name: str) -> None:
    class NoClient:
        def __getattr__(self, attr: str) -> Any:
            raise AssertionError(f"a request was made: {attr}")

    kube = Kube(NoClient())  # type: ignore[arg-type]
    calls: list[Any] = [
        kube.get("Secret", "team-a", name),
        kube.get("Secret", name, "llm-keys"),
        kube.delete("ConfigMap", "team-a", name),
        kube.patch_status("team-a", name, {}),
        kube.apply(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": "team-a"}}
        ),
        kube.list_pods(name, {"a": "b"}),
    ]
    if name:
        calls.append(kube.list_gateways(name))  # None (not "") means every namespace
    for call in calls:
        with pytest.raises(InvalidName) as info:
            await call
        assert isinstance(info.value, ApiError) and info.value.status.code == 422
        assert "not requested" in str(info.value)
    assert sum(kube.calls.values()) == 0


def test_good_names_pass() -> None:
    for name in ("llm-keys", "a", "openai.credentials", "a-1.b-2", "a" * 253):
        check_name("Secret", "team-a", name)
    assert not is_namespace_name("a" * 64) and is_namespace_name("team-a") and not is_namespace_name("a.b")
    assert is_object_name("a.b")


# --- issue 14: every problem the operator can see is in the gateway's status ----------------------------


def _limits_schema() -> dict[str, Any]:
    proxy = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"][
        "proxy"
    ]
    blocks: dict[str, Any] = proxy["properties"]["limits"]["properties"]
    return blocks


def _limit_parsers() -> dict[str, Any]:
    from llmgw_common import limits

    return {
        "restServer": lambda r: limits.parse_http_server(r, 4 * 1024 * 1024),
        "grpcServer": lambda r: limits.parse_grpc_server(r, 4 * 1024 * 1024),
        "restClient": limits.parse_http_client,
        "grpcClient": limits.parse_grpc_channel,
    }


def _parse_limit(block: str, values: dict[str, Any]) -> None:
    from llmgw_common.reader import Reader

    reader = Reader(values, f"limits.{block}")
    _limit_parsers()[block](reader)
    reader.done()


def test_the_crds_limits_blocks_are_the_proxys_limit_parsers() -> None:
    """spec.proxy.limits has one block per network layer, with exactly the keys the proxy's parser of that
    layer reads, and bounds the parser agrees with: the CRD's minimum and maximum are accepted, one step
    beyond each is refused, and an exclusive minimum of 0 refuses 0. (A key added to a parser and not to
    the CRD fails here, naming it.)"""
    from llmgw_common.reader import Reader

    blocks = _limits_schema()
    assert set(blocks) == set(_limit_parsers())
    for block, schema in blocks.items():
        properties = schema["properties"]
        reader = Reader({}, block)
        _limit_parsers()[block](reader)
        assert reader.used == set(properties), (
            f"limits.{block}: keys the parser reads and the CRD lacks: {sorted(reader.used - set(properties))}; "
            f"keys the CRD has and the parser does not read: {sorted(set(properties) - reader.used)}"
        )
        for key, prop in properties.items():
            where = f"limits.{block}.{key}"
            assert "default" not in prop, f"{where}: no default in the CRD, the proxy's applies"
            assert prop.get("description"), where
            if prop["type"] == "integer":
                low = prop["minimum"]
                _parse_limit(block, {key: low})
                with pytest.raises(proxy_config.ConfigError, match=key):
                    _parse_limit(block, {key: low - 1})
                if "maximum" in prop:
                    _parse_limit(block, {key: prop["maximum"]})
                    with pytest.raises(proxy_config.ConfigError, match=key):
                        _parse_limit(block, {key: prop["maximum"] + 1})
                else:
                    _parse_limit(block, {key: 2**40})
            else:
                assert prop["type"] == "number", where
                assert (prop["minimum"], prop["exclusiveMinimum"]) == (0, True), where
                _parse_limit(block, {key: 0.001})
                _parse_limit(block, {key: 7})  # an integer, as YAML and JSON write a whole number
                with pytest.raises(proxy_config.ConfigError, match=key):
                    _parse_limit(block, {key: 0})


def test_a_spec_with_limits_renders_a_config_the_proxy_accepts() -> None:
    sample = yaml.safe_load(Path("crds/testdata/valid/limits.yaml").read_text())
    spec = with_defaults(sample["spec"])
    config = manifests.build_proxy_config(spec, 0, 1)
    for block, values in sample["spec"]["proxy"]["limits"].items():
        assert config["limits"][block] == values  # copied as they are, next to maxConcurrentRequests
    assert config["limits"]["maxConcurrentRequests"] == 256
    parsed = proxy_config.parse(config).limits
    assert parsed.rest_server.max_head_bytes == 32768
    assert parsed.rest_server.max_body_bytes == spec["proxy"]["maxRequestBytes"]
    assert parsed.grpc_server.stream_window_bytes == 1048576 and parsed.grpc_server.idle_timeout_s == 120.5
    assert parsed.rest_client.max_error_body_bytes == 8192
    assert parsed.grpc_client.http2.max_message_bytes == 33554432 and parsed.grpc_client.keepalive_probes == 4
    # Unset: nothing rendered, the proxy's defaults.
    plain = manifests.build_proxy_config(sample_spec(), 0, 1)["limits"]
    assert set(plain) == {"maxConcurrentRequests", "maxRequestBytes", "requestTimeoutSeconds"}
    assert proxy_config.parse(manifests.build_proxy_config(sample_spec(proxy={"limits": {}}), 0, 1))


def test_crd_says_what_provider_models_does() -> None:
    provider = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"][
        "providers"
    ]["items"]["properties"]
    assert "not rendered into the proxy configuration" in provider["models"]["description"]
    assert "models" not in manifests.build_proxy_config(sample_spec(), 0, 1)["providers"][0]


def _deployment(conditions: list[dict[str, Any]], generation: int = 2, observed: int = 2) -> dict[str, Any]:
    return {
        "metadata": {"name": "gw-proxy", "generation": generation},
        "status": {"observedGeneration": observed, "replicas": 1, "conditions": conditions},
    }


REPLICA_FAILURE = {
    "type": "ReplicaFailure",
    "status": "True",
    "reason": "FailedCreate",
    "message": 'pods "gw-proxy-6f7d9-" is forbidden: exceeded quota: no-pods, requested: pods=1, used: pods=0, '
    "limited: pods=0",
}
DEADLINE_EXCEEDED = {
    "type": "Progressing",
    "status": "False",
    "reason": "ProgressDeadlineExceeded",
    "message": 'ReplicaSet "gw-proxy-6f7d9" has timed out progressing.',
}


@pytest.mark.parametrize(
    ("deployment_condition", "reason", "text"),
    [
        (REPLICA_FAILURE, "ReplicaFailure", "cannot create proxy pods: FailedCreate: pods"),
        (DEADLINE_EXCEEDED, "RolloutStalled", "exceeded its progress deadline (ProgressDeadlineExceeded)"),
    ],
)
def test_a_deployment_that_cannot_bring_up_proxies_is_degraded(
    deployment_condition: dict[str, Any], reason: str, text: str
) -> None:
    pending = build_status({}, _observation(deployment=_deployment([])), "t0")
    assert condition_of(pending, "Degraded")["status"] == "False"
    stuck = build_status(pending, _observation(deployment=_deployment([deployment_condition])), "t1")
    degraded = condition_of(stuck, "Degraded")
    assert (stuck["phase"], degraded["status"], degraded["reason"]) == ("Degraded", "True", reason)
    assert text in degraded["message"] and deployment_condition["message"] in degraded["message"]
    assert condition_of(stuck, "Ready")["reason"] == reason
    assert ("Warning", reason, f"Degraded=True: {degraded['message']}") in condition_events(pending, stuck)
    # A condition from before the latest spec change is old news; a fixed Deployment clears it.
    old = build_status(pending, _observation(deployment=_deployment([deployment_condition], 3, 2)), "t1")
    assert condition_of(old, "Degraded")["status"] == "False"
    fixed = build_status(stuck, _observation(deployment=READY_DEPLOYMENT), "t2")
    assert (fixed["phase"], condition_of(fixed, "Degraded")["status"]) == ("Ready", "False")


def test_a_huge_deployment_message_is_cut() -> None:
    huge = {**REPLICA_FAILURE, "message": "m" * 100_000}
    status = build_status({}, _observation(deployment=_deployment([huge])), "t")
    assert len(condition_of(status, "Degraded")["message"]) < 1200


def test_replicas_zero_is_not_ready_but_scaled_to_zero() -> None:
    zero = {"metadata": {"generation": 1}, "status": {"observedGeneration": 1}}
    status = build_status({}, _observation(replicas=0, deployment=zero), "t")
    ready = condition_of(status, "Ready")
    assert (status["phase"], ready["status"], ready["reason"]) == ("ScaledToZero", "False", "ScaledToZero")
    assert condition_of(status, "Degraded")["status"] == "False"
    assert status["readyReplicasText"] == "0/0"


def condition_of(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == type_)


def test_name_problems_name_the_field() -> None:
    from llmgw_operator.spec import gateway_name_problem, name_problems

    assert (
        name_problems(sample_spec(proxy={"tlsSecretName": "tls", "imagePullSecrets": [{"name": "pull"}]}))
        == []
    )
    spec = sample_spec(
        proxy={
            "clientAuthSecretRef": {"name": "?watch=true"},
            "tlsSecretName": "Upper",
            "imagePullSecrets": [{"name": "ok"}, {"name": "a/b"}],
            "priorityClassName": "x" * 300,
        },
        migration={"prometheus": {"url": "http://p:9090", "bearerTokenSecretRef": {"name": "../t"}}},
    )
    spec["providers"][0]["apiKeySecretRef"]["name"] = "../../victim/secrets/stolen"
    problems = name_problems(spec)
    assert [p.split(":")[0] for p in problems] == [
        "spec.providers[0].apiKeySecretRef.name",
        "spec.proxy.clientAuthSecretRef.name",
        "spec.proxy.tlsSecretName",
        "spec.proxy.imagePullSecrets[1].name",
        "spec.proxy.priorityClassName",
        "spec.migration.prometheus.bearerTokenSecretRef.name",
    ]
    assert all("is not a valid Kubernetes name" in p for p in problems)
    assert "x" * 81 not in " ".join(problems)  # quoted cut
    assert gateway_name_problem("gw") is None and gateway_name_problem("a" * 63) is None
    assert "64 characters" in (gateway_name_problem("a" * 64) or "")
    assert "has a dot" in (gateway_name_problem("a.b") or "")


class FakeKube:
    """The :class:`~llmgw_operator.kube.Kube` calls the reconciler makes, on dicts in memory; names are
    checked as kube.py checks them, and every request is recorded."""

    def __init__(self, gateway: dict[str, Any], objects: dict[tuple[str, str], dict[str, Any]] | None = None):
        self.gateway = gateway
        self.objects = objects or {}
        self.requests: list[tuple[str, str, str]] = []
        self.events: list[tuple[str, str, str]] = []

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        check_name(kind, namespace, name)
        self.requests.append(("get", kind, name))
        if kind == "LLMGateway":
            return self.gateway
        return self.objects.get((kind, name))

    async def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        meta = manifest["metadata"]
        check_name(manifest["kind"], meta["namespace"], meta["name"])
        self.requests.append(("apply", manifest["kind"], meta["name"]))
        self.objects[(manifest["kind"], meta["name"])] = manifest
        return manifest

    async def delete(self, kind: str, namespace: str, name: str) -> None:
        self.requests.append(("delete", kind, name))

    async def list_pods(self, namespace: str, labels: dict[str, Any]) -> list[dict[str, Any]]:
        return []

    async def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.requests.append(("patch_status", "LLMGateway", name))
        self.gateway = {**self.gateway, "status": status}

    async def event(self, gateway: dict[str, Any], type_: str, reason: str, message: str) -> None:
        self.events.append((type_, reason, message))


def _stored(name: str = "gw", spec: dict[str, Any] | None = None, **meta: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "team-a", "uid": "u1", "generation": 1, **meta},
        "spec": spec if spec is not None else sample_spec(),
    }


async def _sync(kube: FakeKube) -> dict[str, Any]:
    from llmgw_operator.reconcile import Reconciler

    reconciler = Reconciler(kube, Settings())  # type: ignore[arg-type]
    try:
        meta = kube.gateway["metadata"]
        status = await reconciler.sync(meta["namespace"], meta["name"])
    finally:
        await reconciler.close()
    assert status is not None
    return status


@pytest.mark.parametrize(
    ("name", "field"),
    [("gw", "spec.providers[0].apiKeySecretRef.name"), ("a" * 64, "metadata.name"), ("a.b", "metadata.name")],
)
async def test_a_stored_bad_name_is_config_valid_false_without_a_request(name: str, field: str) -> None:
    spec = sample_spec()
    if name == "gw":
        spec["providers"][0]["apiKeySecretRef"]["name"] = "../../victim/secrets/stolen"
    kube = FakeKube(_stored(name, spec))
    status = await _sync(kube)
    valid = condition_of(status, "ConfigValid")
    assert (valid["status"], valid["reason"]) == ("False", "InvalidName")
    assert valid["message"].startswith(field)
    assert (condition_of(status, "Degraded")["reason"], status["phase"]) == ("InvalidName", "Degraded")
    # The gateway was read and its status written; nothing else was asked for, nothing created.
    assert {(verb, kind) for verb, kind, _ in kube.requests} == {
        ("get", "LLMGateway"),
        ("patch_status", "LLMGateway"),
    }
    assert ("Warning", "InvalidName") in {(t, r) for t, r, _ in kube.events}
    # Nothing changed: nothing written again, no new event (no retry loop).
    writes, events = len(kube.requests), len(kube.events)
    await _sync(kube)
    assert kube.requests[writes:] == [("get", "LLMGateway", name)] and len(kube.events) == events


async def test_a_name_kube_refuses_mid_pass_is_reported_as_invalid_name() -> None:
    """InvalidName raised by kube.py (a check of its own, before any request) is the gateway's problem: a
    Degraded condition naming it, not an API error retried for ever."""

    class Refusing(FakeKube):
        async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
            if kind == "Secret":
                raise InvalidName(f"Secret name {name!r} is not a valid Kubernetes name: not requested")
            return await super().get(kind, namespace, name)

    kube = Refusing(_stored())
    status = await _sync(kube)
    degraded = condition_of(status, "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "InvalidName")
    assert "not a valid Kubernetes name" in degraded["message"]


async def test_commands_without_a_migration_are_reported_once() -> None:
    secret = {"metadata": {"resourceVersion": "1"}, "data": {"api-key": "eA==", "anthropic": "eA=="}}
    kube = FakeKube(
        _stored(annotations={"llmgateway.io/promote": "now", "llmgateway.io/abort": "z" * 10_000}),
        {("Secret", "llm-keys"): secret},
    )
    status = await _sync(kube)
    ignored = [(t, m) for t, r, m in kube.events if r == "CommandIgnored"]
    assert [t for t, _ in ignored] == ["Warning", "Warning"]
    assert any("llmgateway.io/promote=now ignored: spec.migration is not set" in m for _, m in ignored)
    assert all(len(m) < 600 for _, m in ignored)  # the 10 KB value quoted cut
    assert status["ignoredCommands"]["llmgateway.io/promote"] == "now"
    assert status["ignoredCommands"]["llmgateway.io/abort"].startswith("sha256:")
    # The same values again: no new event, nothing to write.
    count = len(kube.events)
    again = await _sync(kube)
    assert len(kube.events) == count and again == status
    # A new value: one new event.
    kube.gateway["metadata"]["annotations"]["llmgateway.io/promote"] = "again"
    await _sync(kube)
    assert [r for _, r, _ in kube.events[count:]] == ["CommandIgnored"]


def _pod(name: str, waiting: dict[str, str] | None, deleting: bool = False) -> dict[str, Any]:
    state = {"waiting": waiting} if waiting else {"running": {"startedAt": "t"}}
    meta: dict[str, Any] = {"name": name, **({"deletionTimestamp": "t"} if deleting else {})}
    return {"metadata": meta, "status": {"containerStatuses": [{"name": "proxy", "state": state}]}}


PULL_FAILED = {"reason": "ImagePullBackOff", "message": 'Back-off pulling image "llmgw-proxy:nope"'}


def test_proxy_containers_that_cannot_run_are_degraded() -> None:
    from llmgw_operator.status import pods_problem

    assert pods_problem(None) is None and pods_problem([_pod("a", None)]) is None
    assert pods_problem([_pod("a", {"reason": "ContainerCreating"})]) is None  # on its way
    assert pods_problem([_pod("a", PULL_FAILED, deleting=True)]) is None  # going away
    reason, message = pods_problem([_pod("b", PULL_FAILED), _pod("a", PULL_FAILED)]) or ("", "")
    assert reason == "ImagePullFailed"
    assert message == (
        'proxy pod a container proxy cannot run: ImagePullBackOff: Back-off pulling image "llmgw-proxy:nope"'
        " (and 1 more)"
    )
    crash = {"reason": "CrashLoopBackOff", "message": "back-off 5m0s restarting failed container"}
    assert (pods_problem([_pod("a", crash)]) or ("",))[0] == "ProxiesFailing"

    pending = build_status({}, _observation(deployment=_deployment([])), "t0")
    failing = build_status(
        pending, _observation(deployment=_deployment([]), pods=[_pod("a", PULL_FAILED)]), "t1"
    )
    degraded = condition_of(failing, "Degraded")
    assert (failing["phase"], degraded["status"], degraded["reason"]) == (
        "Degraded",
        "True",
        "ImagePullFailed",
    )
    assert ("Warning", "ImagePullFailed", f"Degraded=True: {degraded['message']}") in condition_events(
        pending, failing
    )
    # The Deployment's own conditions come first.
    both = _observation(deployment=_deployment([REPLICA_FAILURE]), pods=[_pod("a", PULL_FAILED)])
    assert condition_of(build_status({}, both, "t"), "Degraded")["reason"] == "ReplicaFailure"
