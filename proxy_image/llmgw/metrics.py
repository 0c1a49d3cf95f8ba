"""The proxy's Prometheus metrics: what a person or a controller reads to judge the REST/gRPC split.

Names follow the OpenTelemetry GenAI semantic conventions where one fits (``gen_ai_server_request_duration``,
``gen_ai_server_time_to_first_token``, ``gen_ai_client_token_usage``), with ``llmgw_`` for the rest.
Labels: ``route`` (the route's model pattern), ``path`` (``rest`` or ``grpc``: which side of the split
served the attempt), ``provider`` (the provider's name) and ``code`` (an HTTP-style status of the outcome:
200, 429, 499 for a client cancel, 503 ...). Each metric is documented in README.md.

Each proxy owns its own registry, so that several proxies can live in one process (tests, benchmarks).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144)
_PATH = ("route", "path", "provider")

# ``code`` series of ``llmgw_upstream_requests_total`` created at 0 for every configured path: Prometheus
# cannot count what a series held when it was first scraped, so the first errors on a path that had never
# failed would be invisible to ``increase()`` (and to the operator's migration analysis). These are success
# and the server-side errors the gateway itself reports (the analysis counts 5xx, 401, 403 and 408); rarer
# codes still appear on first use.
PRECREATED_CODES = ("200", "401", "403", "408", "500", "502", "503", "504")


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "llmgw_requests",
            "Client requests answered, by front, route and outcome.",
            ("front", "route", "code"),
            registry=r,
        )
        self.upstream_requests = Counter(
            "llmgw_upstream_requests",
            "Requests sent on a path of the split (after that path's retries).",
            (*_PATH, "code"),
            registry=r,
        )
        self.duration = Histogram(
            "gen_ai_server_request_duration_seconds",
            "Duration of a request on one path, from sending it upstream to its last byte.",
            _PATH,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "gen_ai_server_time_to_first_token_seconds",
            "Streaming requests: time from sending upstream to the first content token.",
            _PATH,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Histogram(
            "gen_ai_client_token_usage",
            "Tokens per request as reported by the provider.",
            (*_PATH, "token_type"),
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.payload_bytes = Counter(
            "llmgw_upstream_payload_bytes",
            "Bytes of request/response payloads exchanged with providers.",
            (*_PATH, "direction"),
            registry=r,
        )
        self.retries = Counter(
            "llmgw_upstream_retries",
            "Retries of an upstream call after a retryable failure.",
            (*_PATH, "reason"),
            registry=r,
        )
        self.fallbacks = Counter(
            "llmgw_fallbacks",
            "Requests moved to the other path after the chosen one failed.",
            ("route", "from_path", "to_path", "reason"),
            registry=r,
        )
        self.inflight = Gauge("llmgw_inflight_requests", "Requests being served now.", ("front",), registry=r)
        self.rejected = Counter(
            "llmgw_rejected_requests",
            "Requests refused before routing (auth, limits, validation).",
            ("front", "reason"),
            registry=r,
        )
        self.cache = Counter("llmgw_cache_lookups", "Response cache lookups.", ("result",), registry=r)
        self.grpc_weight = Gauge(
            "llmgw_route_grpc_weight",
            "Percent of a route's requests sent to the gRPC path (live config).",
            ("route",),
            registry=r,
        )
        self.generation = Gauge(
            "llmgw_config_generation", "The generation field of the configuration now in effect.", registry=r
        )
        self.reloads = Counter(
            "llmgw_config_reloads", "Configuration reload attempts, by result.", ("result",), registry=r
        )
        self.last_reload = Gauge(
            "llmgw_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful configuration load.",
            registry=r,
        )
        self.draining = Gauge("llmgw_draining", "1 while the proxy drains before exiting.", registry=r)
        self.limit_hits = Counter(
            "llmgw_limit_hits",
            "Times a client or a provider ran into a bound, by its configuration key: limits.grpcServer's"
            " keys, restServer.<key> for limits.restServer's, restClient.<key> and grpcClient.<key> for"
            " what providers sent (limits.restClient, limits.grpcClient).",
            ("limit",),
            registry=r,
        )
        self.dropped_fields = Counter(
            "llmgw_dropped_fields",
            "Request fields outside the OpenAI API that a provider set to vendorExtras: drop did not receive.",
            ("provider",),
            registry=r,
        )
        self._children: dict[tuple[Any, ...], Any] = {}
        self._paths: dict[tuple[str, str, str], PathMetrics] = {}

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, looked up once: the request path calls this for every request."""
        key = (id(metric), *labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def path(self, route: str, path: str, provider: str) -> PathMetrics:
        """The metrics of one side of one route's split, bound to their labels once."""
        key = (route, path, provider)
        found = self._paths.get(key)
        if found is None:
            found = self._paths[key] = PathMetrics(self, key)
        return found


class PathMetrics:
    """The per-attempt metrics of one (route, path, provider), with their label children pre-bound."""

    def __init__(self, metrics: Metrics, labels: tuple[str, str, str]) -> None:
        self.metrics = metrics
        self.labels = labels
        self.duration = metrics.duration.labels(*labels)
        self.ttft = metrics.ttft.labels(*labels)
        self.sent = metrics.payload_bytes.labels(*labels, "sent")
        self.received = metrics.payload_bytes.labels(*labels, "received")
        self.input_tokens = metrics.tokens.labels(*labels, "input")
        self.output_tokens = metrics.tokens.labels(*labels, "output")

    def outcome(self, code: str) -> Any:
        return self.metrics.child(self.metrics.upstream_requests, *self.labels, code)

    def retry(self, reason: str) -> Any:
        return self.metrics.child(self.metrics.retries, *self.labels, reason)
