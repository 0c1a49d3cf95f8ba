"""The configuration loader: defaults, and an error naming the key for every kind of mistake."""

from __future__ import annotations

import pathlib
from typing import Any

import pytest
import yaml

from llmgw_common import config

ROOT = pathlib.Path(__file__).resolve().parent.parent


def base() -> dict[str, Any]:
    return {
        "providers": [
            {"name": "rest", "openai": {"baseURL": "http://127.0.0.1:1/v1"}},
            {"name": "claude", "anthropic": {"baseURL": "http://127.0.0.1:2"}},
            {"name": "g", "llmgateway": {"target": "127.0.0.1:3"}},
        ],
        "routes": [{"model": "m", "rest": "rest", "grpc": "g", "grpcWeight": 25}],
    }


def test_example_config_loads() -> None:
    cfg = config.load(ROOT / "examples" / "proxy" / "local.yaml")
    assert cfg.listen.grpc == "127.0.0.1:50051"
    assert cfg.listen.rest == "127.0.0.1:8080"
    assert cfg.listen.admin == "127.0.0.1:9090"
    route = cfg.route_for("demo-model")
    assert route is not None and route.grpc_weight == 50
    assert route.rest == "openai-fake" and route.grpc == "grpc-fake"
    assert cfg.auth is None
    assert cfg.providers["grpc-fake"].settings.target == "127.0.0.1:18003"


def test_the_engine_example_config_loads() -> None:
    cfg = config.load(ROOT / "examples" / "proxy" / "vllm.yaml")
    engine = cfg.providers["vllm-engine"]
    assert (engine.type, engine.path) == ("vllm", "grpc")
    assert engine.settings.target == "127.0.0.1:18101"
    assert (engine.settings.tool_call_parser, engine.settings.reasoning_parser) == ("hermes", "qwen3")
    assert engine.settings.tokenizer_path is None  # from the engine


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (
            "toolCallParser",
            "pythonic",
            "toolCallParser: must be one of hermes, llama3_json, llama4_json, mistral",
        ),
        ("reasoningParser", "r1", "reasoningParser: must be one of deepseek_r1, qwen3"),
        ("chatTemplate", "  ", "chatTemplate: must not be empty"),
        ("target", "http://x:1", "target"),
        ("loadsIntervalSeconds", -1, "loadsIntervalSeconds: must be >= 0"),
        ("loadsIntervalSeconds", 1, "trtllm.*loadsIntervalSeconds"),  # TensorRT-LLM has no GetLoads
    ],
)
def test_bad_engine_settings_are_refused_naming_the_key(key: str, value: Any, message: str) -> None:
    cfg = base()
    kind = "trtllm" if message.startswith("trtllm") else "vllm"
    cfg["providers"].append({"name": "engine", kind: {"target": "127.0.0.1:4", key: value}})
    with pytest.raises(config.ConfigError, match=message):
        config.parse(cfg)


def test_every_provider_type_has_a_client() -> None:
    from llmgw.providers import CLIENTS
    from llmgw_common.providers import TYPES

    assert set(CLIENTS) == set(TYPES)


def test_the_engine_parsers_are_the_proxys() -> None:
    """The names the configuration accepts are the parsers llmgw.engine has."""
    from llmgw.engine import REASONING_PARSERS, TOOL_PARSERS
    from llmgw_common.providers import engine

    assert set(engine.TOOL_CALL_PARSERS) == set(TOOL_PARSERS)
    assert set(engine.REASONING_PARSERS) == set(REASONING_PARSERS)


def test_defaults() -> None:
    cfg = config.parse(base())
    assert cfg.cache.enabled is False
    assert cfg.limits.max_concurrent_requests == 512
    assert cfg.providers["rest"].retries.max_attempts == 3
    assert cfg.generation == 0


def test_route_precedence_exact_then_longest_pattern() -> None:
    data = base()
    data["routes"] = [
        {"model": "*", "rest": "rest"},
        {"model": "gpt-*", "rest": "rest"},
        {"model": "gpt-4o", "grpc": "g"},
    ]
    cfg = config.parse(data)
    assert cfg.route_for("gpt-4o").model == "gpt-4o"  # type: ignore[union-attr]
    assert cfg.route_for("gpt-3").model == "gpt-*"  # type: ignore[union-attr]
    assert cfg.route_for("other").model == "*"  # type: ignore[union-attr]
    assert cfg.route_for("gpt-4o").grpc_weight == 100  # type: ignore[union-attr]


def _mutate(path: str, value: Any) -> dict[str, Any]:
    data = base()
    target: Any = data
    keys = path.split(".")
    for key in keys[:-1]:
        target = target[int(key)] if key.isdigit() else target.setdefault(key, {})
    last = keys[-1]
    if value is _DELETE:
        del target[int(last) if last.isdigit() else last]
    elif last.isdigit():
        target[int(last)] = value
    else:
        target[last] = value
    return data


_DELETE = object()

BAD = [
    ("routes.0.grpcWeight", 150, "routes[0].grpcWeight: must be an integer from 0 to 100, got 150"),
    ("routes.0.grpcWeight", "50", "routes[0].grpcWeight: must be an integer, got str"),
    ("routes.0.grpcWeight", True, "routes[0].grpcWeight: must be an integer, got a boolean"),
    ("routes.0.grpc", "nope", "routes[0].grpc: no provider named 'nope'"),
    ("routes.0.grpc", "rest", "routes[0].grpc: provider 'rest' has type openai"),
    ("routes.0.rest", "g", "routes[0].rest: provider 'g' has type llmgateway"),
    ("routes.0.model", _DELETE, "routes[0].model: required"),
    ("routes.0.model", "a*b", "routes[0].model: '*' is only allowed at the end"),
    ("routes.0.colour", "red", "routes[0].colour: unknown key"),
    ("providers.0.openai", _DELETE, "providers[0]: set exactly one of openai, anthropic, llmgateway"),
    ("providers.0.cohere", {}, "providers[0].cohere: unknown key"),
    ("providers.0.llmgateway", {"target": "h:1"}, "providers[0]: set exactly one of openai, anthropic"),
    ("providers.0.openai.baseURL", _DELETE, "providers[0].openai.baseURL: required"),
    ("providers.0.openai.baseURL", "127.0.0.1:1", "providers[0].openai.baseURL: must start with http://"),
    (
        "providers.0.openai.baseURL",
        "http://[::1/v1",
        "providers[0].openai.baseURL: not a valid URL (Invalid IPv6 URL)",
    ),
    (
        "providers.0.openai.baseURL",
        "http://h:99999/v1",
        "providers[0].openai.baseURL: not a valid URL (Port out of range",
    ),
    ("providers.0.openai.baseURL", "https:///v1", "providers[0].openai.baseURL: names no host"),
    ("providers.0.openai.target", "h:1", "providers[0].openai.target: unknown key"),
    ("providers.2.llmgateway.target", _DELETE, "providers[2].llmgateway.target: required"),
    ("providers.2.llmgateway.target", "nohost", "providers[2].llmgateway.target: must be HOST:PORT"),
    ("providers.2.llmgateway.baseURL", "http://x", "providers[2].llmgateway.baseURL: unknown key"),
    ("providers.1.anthropic.defaultMaxTokens", 0, "providers[1].anthropic.defaultMaxTokens: must be an"),
    ("providers.1.name", "rest", "providers[1].name: duplicate provider name 'rest'"),
    (
        "providers.0.retries",
        {"maxAttempts": 0},
        "providers[0].retries.maxAttempts: must be an integer from 1",
    ),
    ("providers.0.apiKey", {"env": "A", "file": "/b"}, "providers[0].apiKey: set exactly one of env or file"),
    ("providers.0.headers", {"Authorization": "x"}, "credentials belong in apiKey"),
    # Headers that would break the proxy at start or smuggle a second request upstream.
    (
        "providers.0.headers",
        {"X-Team": "a\r\nX-Injected: 1"},
        "providers[0].headers.X-Team: a header value must",
    ),
    (
        "providers.0.headers",
        {"X-Team": "a\nb"},
        "providers[0].headers.X-Team: a header value must not contain CR",
    ),
    (
        "providers.0.headers",
        {"X-Team": "a\0b"},
        "providers[0].headers.X-Team: a header value must not contain CR",
    ),
    ("providers.0.headers", {"": "x"}, "providers[0].headers.: a header name must be an RFC 9110 token"),
    (
        "providers.0.headers",
        {"X Team": "x"},
        "providers[0].headers.X Team: a header name must be an RFC 9110",
    ),
    (
        "providers.0.headers",
        {"X-Team:": "x"},
        "providers[0].headers.X-Team:: a header name must be an RFC 9110",
    ),
    ("providers.0.headers", {":authority": "x"}, "providers[0].headers.:authority: a header name must be an"),
    *[
        ("providers.0.headers", {name: "x"}, f"providers[0].headers.{name}: set by the proxy")
        for name in (
            "Content-Length",
            "Transfer-Encoding",
            "Host",
            "Connection",
            "Keep-Alive",
            "Proxy-Connection",
            "TE",
            "Trailer",
            "upgrade",
        )
    ],
    (
        "providers.0.headers",
        {"x-api-key": "x"},
        "providers[0].headers.x-api-key: credentials belong in apiKey",
    ),
    (
        "providers.0.openai.baseURL",
        "https://user:pass@api.openai.com/v1",
        "providers[0].openai.baseURL: credentials belong in apiKey (apiKeySecretRef in an LLMGateway)",
    ),
    ("providers.1.anthropic.baseURL", "http://key@h:1", "providers[1].anthropic.baseURL: credentials belong"),
    ("providers.0.openai.tls", True, "providers[0].openai.tls: unknown key"),
    ("listen", {"grpc": "50051"}, "listen.grpc: must be HOST:PORT"),
    ("limits", {"maxConcurrentRequests": -1}, "limits.maxConcurrentRequests: must be an integer from 1"),
    ("cache", {"ttlSeconds": 0}, "cache.ttlSeconds: must be > 0"),
    ("auth", {}, "auth: set apiKeysFile or apiKeysEnv"),
    ("routes", [], "routes: at least one route is required"),
    ("surprise", 1, "surprise: unknown key"),
    (
        "providers.0.vendorExtras",
        "ignore",
        "providers[0].vendorExtras: must be one of passThrough, drop, reject, got 'ignore'",
    ),
]


@pytest.mark.parametrize(("path", "value", "message"), BAD, ids=[b[2][:40] for b in BAD])
def test_invalid_config_names_the_key(path: str, value: Any, message: str) -> None:
    with pytest.raises(config.ConfigError) as info:
        config.parse(_mutate(path, value))
    assert message in str(info.value)


def test_url_credentials_are_not_echoed() -> None:
    with pytest.raises(config.ConfigError) as info:
        config.parse(_mutate("providers.0.openai.baseURL", "https://user:s3cret@api.openai.com/v1"))
    assert "s3cret" not in str(info.value)


def test_ordinary_headers_pass_through() -> None:
    headers = {"OpenAI-Organization": "org-1", "X-Team": "search ranking", "x_trace!": "a\tb"}
    parsed = config.parse(_mutate("providers.0.headers", headers))
    assert dict(parsed.providers["rest"].headers) == headers
    # An '@' in the path or query is not userinfo.
    parsed = config.parse(_mutate("providers.0.openai.baseURL", "https://h.example/v1/@team?u=a@b"))
    assert parsed.providers["rest"].settings.base_url == "https://h.example/v1/@team?u=a@b"


def test_weight_must_match_paths() -> None:
    data = base()
    data["routes"] = [{"model": "m", "rest": "rest", "grpcWeight": 10}]
    with pytest.raises(
        config.ConfigError, match=r"routes\[0\].grpcWeight: must be 0 when the route has no grpc"
    ):
        config.parse(data)


def test_secrets_are_read_and_never_in_errors(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("sk-file-secret\n")
    monkeypatch.setenv("OPENAI_KEY", "sk-env-secret")
    data = base()
    data["providers"][0]["apiKey"] = {"env": "OPENAI_KEY"}
    data["providers"][2]["apiKey"] = {"file": str(key_file)}
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(data))
    cfg = config.load(path)
    assert cfg.provider_keys == {"rest": "sk-env-secret", "g": "sk-file-secret"}
    assert "sk-file-secret" not in repr(cfg) and "sk-env-secret" not in repr(cfg)
    assert str(key_file) in cfg.source_files

    monkeypatch.delenv("OPENAI_KEY")
    with pytest.raises(
        config.ConfigError, match=r"providers\[0\]\.apiKey\.env: environment variable OPENAI_KEY"
    ):
        config.load(path)


def test_client_keys_from_file_and_env(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# team keys\nkey-one\n\nkey-two\n")
    monkeypatch.setenv("MORE_KEYS", "key-three, key-four")
    data = base()
    data["auth"] = {"apiKeysFile": str(keys), "apiKeysEnv": "MORE_KEYS"}
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(data))
    assert config.load(path).client_keys == ("key-one", "key-two", "key-three", "key-four")


def test_not_yaml(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text("routes: [unclosed\n")
    with pytest.raises(config.ConfigError, match="not valid YAML"):
        config.load(path)


def test_listen_host_env_replaces_the_host_and_keeps_the_ports(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = base()
    data["listen"] = {"grpc": "0.0.0.0:50051", "rest": "0.0.0.0:8080", "admin": "[::]:9090"}
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(data))
    monkeypatch.setenv("LLMGW_LISTEN_HOST", "127.0.1.7")
    cfg = config.load(path)
    assert cfg.listen == config.Listen(grpc="127.0.1.7:50051", rest="127.0.1.7:8080", admin="127.0.1.7:9090")
    monkeypatch.setenv("LLMGW_LISTEN_HOST", "::1")
    assert config.load(path).listen.rest == "[::1]:8080"
    monkeypatch.setenv("LLMGW_LISTEN_HOST", " ")
    with pytest.raises(config.ConfigError, match="LLMGW_LISTEN_HOST: must be a host name or IP address"):
        config.load(path)
    monkeypatch.delenv("LLMGW_LISTEN_HOST")
    assert config.load(path).listen.admin == "[::]:9090"
    assert config.parse(data).listen.rest == "0.0.0.0:8080"  # parse alone never reads the environment


def test_layer_limits_default_to_the_proxys_long_standing_values() -> None:
    limits = config.parse(base()).limits
    assert limits.rest_server.max_head_bytes == 16 * 1024 and limits.rest_server.keepalive_timeout_s == 75
    assert limits.rest_server.max_body_bytes == limits.max_request_bytes == 4 * 1024 * 1024
    assert limits.grpc_server.stream_window_bytes == 4 * 1024 * 1024
    assert limits.grpc_server.max_message_bytes == limits.max_request_bytes
    assert limits.rest_client.max_response_bytes == 64 * 1024 * 1024
    assert limits.grpc_client.http2.max_message_bytes == 64 * 1024 * 1024
    assert limits.grpc_client.keepalive_idle_s == 30 and limits.grpc_client.refused_stream_attempts == 5


def test_layer_limits_are_read_from_the_configuration() -> None:
    data = base()
    data["limits"] = {
        "maxRequestBytes": 2048,
        "restServer": {
            "maxHeadBytes": 4096,
            "maxPipelinedRequests": 2,
            "requestReadTimeoutSeconds": 5,
            "keepAliveTimeoutSeconds": 9,
        },
        "grpcServer": {
            "streamWindowBytes": 70_000,
            "connectionWindowBytes": 140_000,
            "maxHeaderBlockBytes": 8192,
        },
        "restClient": {
            "idleTimeoutSeconds": 3,
            "readAheadBytes": 4096,
            "maxResponseBytes": 1 << 20,
            "maxErrorBodyBytes": 2048,
        },
        "grpcClient": {
            "streamWindowBytes": 80_000,
            "maxMessageBytes": 1 << 20,
            "keepAliveIdleSeconds": 7,
            "keepAliveIntervalSeconds": 2,
            "keepAliveProbes": 5,
            "unackedDataTimeoutSeconds": 11,
            "refusedStreamAttempts": 2,
        },
    }
    limits = config.parse(data).limits
    assert (limits.rest_server.max_head_bytes, limits.rest_server.max_pipelined_requests) == (4096, 2)
    assert (limits.rest_server.request_timeout_s, limits.rest_server.keepalive_timeout_s) == (5, 9)
    assert limits.rest_server.max_body_bytes == 2048 and limits.grpc_server.max_message_bytes == 2048
    assert limits.grpc_server.stream_window_bytes == 70_000
    assert limits.grpc_server.connection_window_bytes == 140_000
    assert limits.grpc_server.max_header_block_bytes == 8192
    assert limits.rest_client.idle_timeout_s == 3 and limits.rest_client.read_ahead_bytes == 4096
    assert (
        limits.rest_client.max_response_bytes == 1 << 20 and limits.rest_client.max_error_body_bytes == 2048
    )
    client = limits.grpc_client
    assert client.http2.stream_window_bytes == 80_000 and client.http2.max_message_bytes == 1 << 20
    assert client.http2.connection_window_bytes == 16 * 1024 * 1024  # the default, kept
    assert (client.keepalive_idle_s, client.keepalive_interval_s, client.keepalive_probes) == (7, 2, 5)
    assert client.unacked_data_timeout_s == 11 and client.refused_stream_attempts == 2


@pytest.mark.parametrize(
    ("section", "value", "message"),
    [
        ("restServer", {"colour": 1}, "limits.restServer.colour: unknown key"),
        ("grpcServer", {"streamWindowBytes": 100}, "limits.grpcServer.streamWindowBytes: must be an integer"),
        (
            "grpcClient",
            {"streamWindowBytes": 2**31},
            "limits.grpcClient.streamWindowBytes: must be an integer",
        ),
        ("restClient", {"idleTimeoutSeconds": 0}, "limits.restClient.idleTimeoutSeconds: must be > 0"),
    ],
)
def test_bad_layer_limits_name_the_key(section: str, value: Any, message: str) -> None:
    data = base()
    data["limits"] = {section: value}
    with pytest.raises(config.ConfigError) as info:
        config.parse(data)
    assert message in str(info.value)
