"""The proxy's configuration file: its shape, its defaults, and the checks that name the bad key.

The operator renders an ``LLMGateway`` spec into this YAML (camelCase keys, like the CRD) and mounts it
into the proxy pods as a ConfigMap; people running the proxy by hand write it themselves
(``examples/proxy/local.yaml``). :func:`load` either returns a fully checked :class:`ProxyConfig` or raises
:class:`ConfigError` whose message starts with the dotted path of the offending key, for example
``routes[0].grpcWeight: must be an integer from 0 to 100, got 150``.

Secrets are never part of this file: provider API keys and client API keys are named here (an environment
variable or a file path) and read when the configuration is loaded.

``LLMGW_LISTEN_HOST``, when set in the proxy's environment, replaces the host part of all three ``listen``
addresses at load time (and at every reload), keeping their ports: ``0.0.0.0:8080`` becomes
``10.1.2.3:8080``. In Kubernetes it binds the pod IP (``valueFrom.fieldRef: status.podIP``) instead of
every interface; the local kubelet (:mod:`llmgw_dev.local_kubelet`) uses it to give each proxy process
its own loopback address.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import os
import pathlib
from typing import Any

import yaml

from llmgw_common import limits as layer_limits
from llmgw_common.limits import GrpcChannelLimits, HTTP2Limits, HTTPClientLimits, HTTPServerLimits
from llmgw_common.providers import TYPES
from llmgw_common.reader import ConfigError, Reader, check_listen_address

LISTEN_HOST_ENV = "LLMGW_LISTEN_HOST"

__all__ = [
    "ConfigError",
    "ProxyConfig",
    "check_listen_address",
    "fingerprint",
    "is_loopback",
    "load",
    "parse",
]


@dataclasses.dataclass(frozen=True)
class SecretRef:
    """Where a secret value comes from: an environment variable or a file (for example a Secret volume)."""

    env: str | None = None
    file: str | None = None

    def read(self, where: str) -> str:
        if self.env is not None:
            value = os.environ.get(self.env)
            if not value:
                raise ConfigError(f"{where}.env: environment variable {self.env} is not set or empty")
            return value.strip()
        assert self.file is not None
        try:
            value = pathlib.Path(self.file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"{where}.file: cannot read {self.file}: {exc.strerror}") from None
        if not value:
            raise ConfigError(f"{where}.file: {self.file} is empty")
        return value


@dataclasses.dataclass(frozen=True)
class Retries:
    max_attempts: int = 3
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 5.0


@dataclasses.dataclass(frozen=True)
class Provider:
    """One provider: its type's settings (see :mod:`llmgw_common.providers`) and what every type shares."""

    name: str
    type: str  # the member set in the entry: a key of llmgw_common.providers.TYPES
    settings: Any  # that type's settings dataclass
    api_key: SecretRef | None = None
    timeout_s: float = (
        120.0  # the wait for the answer's first byte (REST headers, a gRPC stream's first message)
    )
    connect_timeout_s: float = 5.0
    retries: Retries = Retries()
    headers: tuple[tuple[str, str], ...] = ()
    stream_idle_timeout_s: float | None = None  # the longest gap within an answer; None: timeout_s
    vendor_extras: str = "passThrough"  # what becomes of request fields outside the API: one of VENDOR_EXTRAS

    @property
    def idle_timeout_s(self) -> float:
        """The longest wait for the next bytes of an answer once it began (``streamIdleTimeoutSeconds``,
        else ``timeoutSeconds``)."""
        return self.timeout_s if self.stream_idle_timeout_s is None else self.stream_idle_timeout_s

    @property
    def path(self) -> str:
        """Which side of the REST/gRPC split this provider serves."""
        return TYPES[self.type].path


@dataclasses.dataclass(frozen=True)
class Route:
    model: str  # exact name, a prefix pattern ending in "*", or "*" for every model
    rest: str | None
    grpc: str | None
    grpc_weight: int
    upstream_model: str | None = None

    def matches(self, model: str) -> bool:
        if self.model.endswith("*"):
            return model.startswith(self.model[:-1])
        return model == self.model


@dataclasses.dataclass(frozen=True)
class Listen:
    grpc: str = "0.0.0.0:50051"
    rest: str = "0.0.0.0:8080"
    admin: str = "0.0.0.0:9090"


@dataclasses.dataclass(frozen=True)
class TLS:
    cert_file: str
    key_file: str


@dataclasses.dataclass(frozen=True)
class Auth:
    api_keys_file: str | None = None
    api_keys_env: str | None = None


@dataclasses.dataclass(frozen=True)
class Limits:
    """The gateway's own bounds, and each network layer's (:mod:`llmgw_common.limits`)."""

    max_concurrent_requests: int = 512
    max_request_bytes: int = 4 * 1024 * 1024
    request_timeout_s: float = 300.0
    rest_server: HTTPServerLimits = dataclasses.field(default_factory=HTTPServerLimits)
    grpc_server: HTTP2Limits = dataclasses.field(default_factory=HTTP2Limits)
    rest_client: HTTPClientLimits = dataclasses.field(default_factory=HTTPClientLimits)
    grpc_client: GrpcChannelLimits = dataclasses.field(default_factory=GrpcChannelLimits)


@dataclasses.dataclass(frozen=True)
class Cache:
    enabled: bool = False
    max_entries: int = 1024
    ttl_s: float = 300.0


@dataclasses.dataclass(frozen=True)
class ProxyConfig:
    generation: int
    listen: Listen
    tls: TLS | None
    auth: Auth | None
    limits: Limits
    cache: Cache
    drain_s: float
    reload_interval_s: float
    providers: dict[str, Provider]
    routes: tuple[Route, ...]
    # Loaded secrets and the fingerprint of every file the config depends on; not part of the YAML.
    provider_keys: dict[str, str] = dataclasses.field(repr=False, compare=False, default_factory=dict)
    client_keys: tuple[str, ...] = dataclasses.field(repr=False, compare=False, default=())
    source_files: tuple[str, ...] = dataclasses.field(compare=False, default=())

    def route_for(self, model: str) -> Route | None:
        """The first route matching ``model``: exact names win over patterns, longer patterns first."""
        for route in self.routes:
            if route.matches(model):
                return route
        return None

    @property
    def models(self) -> list[str]:
        return sorted(r.model for r in self.routes if not r.model.endswith("*"))


def _secret_ref(r: Reader) -> SecretRef:
    env = r.get("env", str)
    file = r.get("file", str)
    if (env is None) == (file is None):
        raise ConfigError(f"{r.where}: set exactly one of env or file")
    return SecretRef(env=env, file=file)


def _retries(r: Reader) -> Retries:
    return Retries(
        max_attempts=r.integer("maxAttempts", 3, minimum=1, maximum=10),
        initial_backoff_s=r.number("initialBackoffSeconds", 0.1),
        max_backoff_s=r.number("maxBackoffSeconds", 5.0),
    )


# RFC 9110 section 5.6.2: a field name is a token.
_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
# The proxy's own: message framing, the upstream's Host, and hop-by-hop headers (RFC 9110 section 7.6.1),
# which a proxy must not forward and which would desynchronise the connection or smuggle a request.
_RESERVED_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
    }
)


def _check_header(where: str, name: str, value: str) -> None:
    """Refuse a provider header that would break the upstream request or the proxy's start."""
    if not name or not _TOKEN_CHARS.issuperset(name):
        raise ConfigError(
            f"{where}: a header name must be an RFC 9110 token (letters, digits and !#$%&'*+-.^_`|~; "
            f"no space or colon), got {name!r}"
        )
    if name.lower() in ("authorization", "x-api-key"):
        raise ConfigError(f"{where}: credentials belong in apiKey, not in headers")
    if name.lower() in _RESERVED_HEADERS:
        raise ConfigError(f"{where}: set by the proxy (framing, Host or a hop-by-hop header), not in headers")
    if any(c in value for c in "\r\n\0"):
        raise ConfigError(f"{where}: a header value must not contain CR, LF or NUL")


# What a provider does with the fields of a chat request that are not part of the OpenAI API (vLLM's top_k,
# min_p, chat_template_kwargs, ...): pass them on as they are, drop them (logged once, counted), or refuse
# the request with a 400 naming the field. Fields the provider's own API has (Anthropic's top_k, thinking)
# are never vendor extras to it.
VENDOR_EXTRAS = ("passThrough", "drop", "reject")


def _provider(r: Reader) -> Provider:
    name = r.get("name", str, required=True)
    members = [key for key in TYPES if key in r.data]
    if len(members) != 1:
        got = f"got {', '.join(members)}" if members else "got none"
        raise ConfigError(f"{r.where}: set exactly one of {', '.join(TYPES)} (the provider's type), {got}")
    r.used.update(TYPES)  # named in the unknown-key message as allowed
    ptype = TYPES[members[0]]
    settings = r.section(ptype.name, ptype.parse, None)
    headers = r.get("headers", dict, {})
    for key, value in headers.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ConfigError(f"{r.path('headers')}: must map strings to strings")
        _check_header(f"{r.path('headers')}.{key}", key, value)
    return Provider(
        name=name,
        type=ptype.name,
        settings=settings,
        api_key=r.section("apiKey", _secret_ref, None),
        timeout_s=r.number("timeoutSeconds", 120.0),
        connect_timeout_s=r.number("connectTimeoutSeconds", 5.0),
        retries=r.section("retries", _retries, Retries()),
        headers=tuple(sorted(headers.items())),
        stream_idle_timeout_s=(
            r.number("streamIdleTimeoutSeconds", 0.0) if "streamIdleTimeoutSeconds" in r.data else None
        ),
        vendor_extras=_vendor_extras(r),
    )


def _vendor_extras(r: Reader) -> str:
    value: str = r.get("vendorExtras", str, "passThrough")
    if value not in VENDOR_EXTRAS:
        raise ConfigError(
            f"{r.path('vendorExtras')}: must be one of {', '.join(VENDOR_EXTRAS)}, got {value!r}"
        )
    return value


def _route(r: Reader, providers: dict[str, Provider]) -> Route:
    model = r.get("model", str, required=True)
    if "*" in model[:-1]:
        raise ConfigError(f"{r.path('model')}: '*' is only allowed at the end, got {model!r}")
    rest = r.get("rest", str)
    grpc_name = r.get("grpc", str)
    if rest is None and grpc_name is None:
        raise ConfigError(f"{r.where}: set rest, grpc or both (provider names)")
    for path, name in (("rest", rest), ("grpc", grpc_name)):
        if name is None:
            continue
        if name not in providers:
            raise ConfigError(f"{r.path(path)}: no provider named {name!r} (have: {', '.join(providers)})")
        if providers[name].path != path:
            allowed = [t.name for t in TYPES.values() if t.path == path]
            raise ConfigError(
                f"{r.path(path)}: provider {name!r} has type {providers[name].type}; "
                f"the {path} path needs type {' or '.join(allowed)}"
            )
    default_weight = 100 if rest is None else 0
    weight = r.integer("grpcWeight", default_weight, minimum=0, maximum=100)
    if rest is None and weight != 100:
        raise ConfigError(f"{r.path('grpcWeight')}: must be 100 when the route has no rest provider")
    if grpc_name is None and weight != 0:
        raise ConfigError(f"{r.path('grpcWeight')}: must be 0 when the route has no grpc provider")
    return Route(
        model=model, rest=rest, grpc=grpc_name, grpc_weight=weight, upstream_model=r.get("upstreamModel", str)
    )


def _limits(r: Reader) -> Limits:
    max_request_bytes = r.integer("maxRequestBytes", Limits.max_request_bytes, minimum=1024)
    return Limits(
        max_concurrent_requests=r.integer("maxConcurrentRequests", Limits.max_concurrent_requests),
        max_request_bytes=max_request_bytes,
        request_timeout_s=r.number("requestTimeoutSeconds", Limits.request_timeout_s),
        rest_server=r.section(
            "restServer",
            lambda s: layer_limits.parse_http_server(s, max_request_bytes),
            layer_limits.parse_http_server(Reader({}, ""), max_request_bytes),
        ),
        grpc_server=r.section(
            "grpcServer",
            lambda s: layer_limits.parse_grpc_server(s, max_request_bytes),
            layer_limits.parse_grpc_server(Reader({}, ""), max_request_bytes),
        ),
        rest_client=r.section("restClient", layer_limits.parse_http_client, HTTPClientLimits()),
        grpc_client=r.section("grpcClient", layer_limits.parse_grpc_channel, GrpcChannelLimits()),
    )


def parse(data: Any) -> ProxyConfig:
    """Check a parsed YAML document and build the configuration (secrets are not read here)."""
    r = Reader(data, "")
    listen = r.section(
        "listen",
        lambda s: Listen(
            grpc=s.get("grpc", str, Listen.grpc),
            rest=s.get("rest", str, Listen.rest),
            admin=s.get("admin", str, Listen.admin),
        ),
        Listen(),
    )
    for key in ("grpc", "rest", "admin"):
        check_listen_address(getattr(listen, key), f"listen.{key}")
    tls = r.section(
        "tls",
        lambda s: TLS(
            cert_file=s.get("certFile", str, required=True), key_file=s.get("keyFile", str, required=True)
        ),
        None,
    )

    def _auth(s: Reader) -> Auth:
        auth = Auth(api_keys_file=s.get("apiKeysFile", str), api_keys_env=s.get("apiKeysEnv", str))
        if auth.api_keys_file is None and auth.api_keys_env is None:
            raise ConfigError("auth: set apiKeysFile or apiKeysEnv (or remove auth to disable client auth)")
        return auth

    auth = r.section("auth", _auth, None)
    limits = r.section("limits", _limits, _limits(Reader({}, "limits")))
    cache = r.section(
        "cache",
        lambda s: Cache(
            enabled=s.get("enabled", bool, False),
            max_entries=s.integer("maxEntries", Cache.max_entries),
            ttl_s=s.number("ttlSeconds", Cache.ttl_s),
        ),
        Cache(),
    )
    drain_s = r.section("shutdown", lambda s: s.number("drainSeconds", 25.0, exclusive=False), 25.0)
    reload_interval_s = r.number("reloadIntervalSeconds", 1.0)
    generation = r.integer("generation", 0, minimum=0)

    raw_providers = r.get("providers", list, required=True)
    providers: dict[str, Provider] = {}
    for i, raw in enumerate(raw_providers):
        pr = Reader(raw, f"providers[{i}]")
        provider = _provider(pr)
        pr.done()
        if provider.name in providers:
            raise ConfigError(f"providers[{i}].name: duplicate provider name {provider.name!r}")
        providers[provider.name] = provider
    raw_routes = r.get("routes", list, required=True)
    if not raw_routes:
        raise ConfigError("routes: at least one route is required")
    routes: list[Route] = []
    for i, raw in enumerate(raw_routes):
        rr = Reader(raw, f"routes[{i}]")
        route = _route(rr, providers)
        rr.done()
        if any(existing.model == route.model for existing in routes):
            raise ConfigError(f"routes[{i}].model: duplicate route for model {route.model!r}")
        routes.append(route)
    r.done()
    # Exact names first, then patterns from the most specific (longest) to "*".
    routes.sort(key=lambda rt: (rt.model.endswith("*"), -len(rt.model)))
    return ProxyConfig(
        generation=generation,
        listen=listen,
        tls=tls,
        auth=auth,
        limits=limits,
        cache=cache,
        drain_s=drain_s,
        reload_interval_s=reload_interval_s,
        providers=providers,
        routes=tuple(routes),
    )


def _read_client_keys(auth: Auth) -> tuple[str, ...]:
    keys: list[str] = []
    if auth.api_keys_file is not None:
        try:
            text = pathlib.Path(auth.api_keys_file).read_text()
        except OSError as exc:
            raise ConfigError(f"auth.apiKeysFile: cannot read {auth.api_keys_file}: {exc.strerror}") from None
        keys += [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if auth.api_keys_env is not None:
        # Commas or newlines: a Secret key injected as env usually holds one key per line.
        keys += [
            k.strip()
            for k in os.environ.get(auth.api_keys_env, "").replace("\n", ",").split(",")
            if k.strip()
        ]
    if not keys:
        raise ConfigError("auth: no client API keys found (every request would be refused)")
    return tuple(keys)


def _override_listen_host(listen: Listen, host: str) -> Listen:
    """``listen`` with every address's host replaced by ``host`` (from ``LLMGW_LISTEN_HOST``), ports kept."""
    host = host.strip().strip("[]")
    if not host:
        raise ConfigError(
            f"{LISTEN_HOST_ENV}: must be a host name or IP address when set, got an empty value"
        )
    bracketed = f"[{host}]" if ":" in host else host
    addresses = {}
    for key in ("grpc", "rest", "admin"):
        _, port = check_listen_address(getattr(listen, key), f"listen.{key}")
        addresses[key] = f"{bracketed}:{port}"
        check_listen_address(addresses[key], LISTEN_HOST_ENV)
    return Listen(**addresses)


def load(path: str | os.PathLike[str]) -> ProxyConfig:
    """Read, check and resolve the configuration file at ``path`` (including the secrets it names)."""
    try:
        text = pathlib.Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    config = parse(data)
    listen_host = os.environ.get(LISTEN_HOST_ENV)
    if listen_host is not None:
        config = dataclasses.replace(config, listen=_override_listen_host(config.listen, listen_host))
    provider_keys = {
        name: p.api_key.read(f"providers[{i}].apiKey")
        for i, (name, p) in enumerate(config.providers.items())
        if p.api_key is not None
    }
    client_keys = _read_client_keys(config.auth) if config.auth else ()
    for i, p in enumerate(config.providers.values()):
        # Checked here, not at the first request: a reload that names a directory this container lacks (a
        # tokenizer ConfigMap the running pods did not mount yet) is refused and the running config kept.
        tokenizer_path = getattr(p.settings, "tokenizer_path", None)
        if tokenizer_path is not None and not os.path.isfile(os.path.join(tokenizer_path, "tokenizer.json")):
            raise ConfigError(
                f"providers[{i}].{p.type}.tokenizerPath: {tokenizer_path!r} holds no tokenizer.json "
                "(the directory is missing, or is not the tokenizer's)"
            )
    sources = [str(path)]
    sources += [p.api_key.file for p in config.providers.values() if p.api_key and p.api_key.file]
    if config.auth and config.auth.api_keys_file:
        sources.append(config.auth.api_keys_file)
    return dataclasses.replace(
        config, provider_keys=provider_keys, client_keys=client_keys, source_files=tuple(sources)
    )


def fingerprint(paths: tuple[str, ...]) -> str:
    """A digest of the files' contents; a change means the configuration must be reloaded."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.encode())
        try:
            digest.update(pathlib.Path(path).read_bytes())
        except OSError:
            digest.update(b"\0missing")
    return digest.hexdigest()


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name, an address, or a bracketed IPv6 address) is this machine's loopback."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
