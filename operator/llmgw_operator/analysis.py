"""Where the migration's numbers come from: the proxies' metrics over a window, behind one interface.

A migration step is judged on what the gRPC path did over the last *window* (the step's ``interval``): how
many requests went that way, how many of them failed on the server side, and the p99 latency of both paths
(and the p99 time to first token of gRPC streams). Every proxy exports the counters and histograms this
needs on its admin port (``/metrics``, see :mod:`llmgw.metrics`); a window is the *increase* of those
cumulative series between its start and its end, summed over the gateway's proxies.

:class:`MetricsSource` is the interface the migration uses. Two implementations:

:class:`PrometheusSource`
    Asks a Prometheus that scrapes the proxies (``/api/v1/query``), so a window is there as soon as it
    is asked for, survives operator restarts and includes proxies that have since gone away. PromQL, with
    ``SEL`` the selector of the gateway's proxies (and of its split routes, see below), ``W`` the window::

        sum(increase(llmgw_upstream_requests_total{path="grpc", SEL}[W]))
        sum(increase(llmgw_upstream_requests_total{path="grpc", code=~"5..|401|403|408", SEL}[W]))
        histogram_quantile(0.99, sum by (le) (rate(gen_ai_server_request_duration_seconds_bucket{path="grpc", SEL}[W])))
        histogram_quantile(0.99, sum by (le) (rate(gen_ai_server_request_duration_seconds_bucket{path="rest", SEL}[W])))
        histogram_quantile(0.99, sum by (le) (rate(gen_ai_server_time_to_first_token_seconds_bucket{path="grpc", SEL}[W])))
        count(up{SEL})    # no series at all: Prometheus does not scrape these proxies -> MetricsUnavailable

    All queries of one measurement are evaluated at the same instant. ``increase`` extrapolates to the
    window's edges, so counts are approximate (high by up to two scrape intervals' share of the window) and
    are rounded; ratios such as the error rate are hardly affected, as all series of one proxy are scraped
    together. Prometheus (before its created-timestamp support) cannot count what a series held when it
    was first scraped, so the proxy creates the success and usual error ``code`` series of every path at 0
    when it loads a configuration (``llmgw.metrics.PRECREATED_CODES``); only the first errors with a rarer
    code (501, 529, ...) are lost. Checked against Prometheus 2.42.

:class:`ScrapeSource`
    No Prometheus: reads every ready proxy's ``/metrics`` itself and keeps its readings in memory, per
    ``key`` (one per gateway). A counter says how much happened since the proxy started, not in the last
    five minutes, so a window needs an earlier reading to subtract: the *baseline*. The first call for a
    key only takes that baseline and returns None (inconclusive), as does a call that finds no reading
    between 0.9 and 2 windows old (the migration paused, say): a window is never stretched over much more
    than it was asked for. Of the fitting readings, the oldest one at most 1.05 windows old is used (so a
    window starts at its start, or just after it), else the newest. :meth:`ScrapeSource.proxies` adds a
    reading too (under ``targets.key``), so a migration that reads the proxies every tick has one from the
    moment the weight went live; readings are thinned to at most 64 per window and kept for two windows.
    Counter resets are handled like Prometheus does, per proxy: when any of a proxy's counters went down
    (a restarted proxy) all its current values count as the increase; a proxy not seen in the baseline (a
    new pod) counts from zero, a series not seen in it (a code first answered) too. What a proxy that has
    gone since the baseline served is lost. The p99 comes from the subtracted histogram buckets, summed
    over proxies, with :func:`quantile_from_buckets`: the same interpolation as PromQL's
    ``histogram_quantile``, so both sources agree.

Both read the live state (:meth:`MetricsSource.proxies`: the gRPC weight and config generation each ready
proxy exports) from the proxies directly: it is a fact of now, which Prometheus would only know one scrape
interval later, and the ready pods' addresses say exactly which proxies must have it. The operator therefore
needs to reach the pods' admin port (``metrics``) in either mode. A proxy that cannot be read is left out of
the answer (and logged), so the migration sees fewer reports than ready proxies and waits. The weight a
proxy reports is that of the split routes (they all carry the gateway's one weight).

Server-side errors (:data:`ERROR_CODES`): ``code`` 5xx (including the proxy's own 502/503/504 for
unreachable providers and timeouts), 408 (the provider timed out) and 401/403 (the provider refused the
gateway's own credentials: nothing the client did). Not counted: 400/404/413/422 (the request), 429 (the
provider's rate limit: retried and fallen back from, a capacity signal rather than a broken path) and 499
(the client went away).

Routes: only routes with both paths say anything about the split. :class:`Targets` carries their model
patterns (:func:`split_routes` takes them from the spec); when it carries None, all routes are summed by
path, which is right as long as the gateway has no one-path routes (a gRPC-only route would count as gRPC
traffic).

Labels the Prometheus queries expect on the proxies' series (names are :class:`PrometheusSource`
parameters): ``namespace`` (the pod's namespace) and ``llmgateway_io_gateway`` (the pod label
``llmgateway.io/gateway``, which the operator sets to the gateway's name); ``pod`` is useful to people and
not needed here. A prometheus-operator ``PodMonitor`` adds ``namespace`` and ``pod`` itself and, with
``podTargetLabels: [llmgateway.io/gateway]`` and ``podMetricsEndpoints: [{port: metrics}]``, the gateway
label. A plain Kubernetes pod scrape (the proxy pods carry ``prometheus.io/scrape``, ``prometheus.io/port``
and ``prometheus.io/path`` annotations) needs these relabelings::

    - source_labels: [__meta_kubernetes_namespace]
      target_label: namespace
    - source_labels: [__meta_kubernetes_pod_name]
      target_label: pod
    - source_labels: [__meta_kubernetes_pod_label_llmgateway_io_gateway]
      target_label: llmgateway_io_gateway

Each proxy must be scraped by one job only: two jobs scraping the same pods double every count.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, Self

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from yarl import URL

from .migration import Measurements, Proxies

log = logging.getLogger(__name__)


ERROR_CODES = "5..|401|403|408"
"""The ``code`` label values of server-side errors, as a (fully anchored) PromQL / RE2 regular expression."""

_ERROR_CODES_RE = re.compile(ERROR_CODES)

REQUESTS = "llmgw_upstream_requests_total"
DURATION_BUCKETS = "gen_ai_server_request_duration_seconds_bucket"
TTFT_BUCKETS = "gen_ai_server_time_to_first_token_seconds_bucket"
WEIGHT = "llmgw_route_grpc_weight"
GENERATION = "llmgw_config_generation"
_WINDOW_SERIES = frozenset({REQUESTS, DURATION_BUCKETS, TTFT_BUCKETS})

# ScrapeSource: a window's base reading is between _MIN_COVER and _MAX_COVER windows old, preferably at most
# _NEAR windows (a slightly short window rather than one reaching back before its start). A reading is kept
# when at least 1/_READINGS_PER_WINDOW window after the one before the last kept one (so at most twice that
# many per window), for _MAX_COVER windows; the window is the last one asked for, or _DEFAULT_WINDOW (the
# CRD's default interval) before any.
_MIN_COVER = 0.9
_NEAR = 1.05
_MAX_COVER = 2.0
_READINGS_PER_WINDOW = 32
_DEFAULT_WINDOW = 300.0


class MetricsUnavailable(Exception):
    """The metrics could not be read; the message says from where and why (never a credential)."""


@dataclass(frozen=True)
class Targets:
    """Which proxies to read: the gateway's identity and its ready proxy pods' admin endpoints.

    ``endpoints`` are ``HOST:PORT`` of the ready pods' admin ports (pod IP and the ``metrics`` port).
    ``routes`` are the model patterns of the routes that have both paths; None sums all routes by path.
    """

    namespace: str
    name: str
    endpoints: tuple[str, ...]
    routes: tuple[str, ...] | None = None

    @property
    def key(self) -> tuple[str, str]:
        """``(namespace, name)``: the ``key`` to measure this gateway with (see :class:`ScrapeSource`)."""
        return (self.namespace, self.name)


def split_routes(spec: Mapping[str, Any]) -> tuple[str, ...]:
    """The model patterns of the spec's routes that have both a REST and a gRPC provider."""
    return tuple(r["model"] for r in spec.get("routes", []) if r.get("rest") and r.get("grpc"))


class MetricsSource(Protocol):
    async def proxies(self, targets: Targets) -> Proxies:
        """The live gRPC weight and config generation of each ready proxy that could be read (in
        ``targets.endpoints`` order); ``ready`` is the number of endpoints. Never raises for a proxy that
        cannot be read: it is missing from the tuples (and logged)."""
        ...

    async def measure(self, key: Hashable, targets: Targets, window_seconds: float) -> Measurements | None:
        """The gRPC path's requests and server-side errors and both paths' p99s over the last
        ``window_seconds``; None when that cannot be known yet (inconclusive). ``key`` names the gateway's
        series of measurements (ScrapeSource keeps its readings under it): pass ``targets.key``.
        Raises MetricsUnavailable when the metrics cannot be read."""
        ...


# ------------------------------------------------------------------------------------------- pure parts


def is_server_error(code: str) -> bool:
    """Whether an ``llmgw_upstream_requests_total`` ``code`` counts as a server-side error."""
    return _ERROR_CODES_RE.fullmatch(code) is not None


def counter_increase(previous: float | None, current: float) -> float:
    """One counter's increase between two readings, as Prometheus sees it: a decrease is a reset, after
    which the whole current value is new; a counter without an earlier reading counts from zero."""
    if previous is None or current < previous:
        return current
    return current - previous


def quantile_from_buckets(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """The ``q``-quantile of a histogram given as ``(upper bound, cumulative count)`` buckets, as PromQL's
    ``histogram_quantile`` computes it; None where PromQL gives NaN.

    Buckets are sorted, equal bounds merged and the counts made monotonic. The answer interpolates
    linearly inside the bucket the rank falls in, with the lowest bucket starting at 0 (or being returned
    as is when its bound is not positive). A rank in the ``+Inf`` bucket gives the highest finite bound.
    None: no ``+Inf`` bucket, fewer than two buckets, no observations, or NaN q; q < 0 gives -inf and
    q > 1 gives +inf.
    """
    if math.isnan(q):
        return None
    if q < 0:
        return -math.inf
    if q > 1:
        return math.inf
    merged: dict[float, float] = {}
    for bound, count in buckets:
        merged[bound] = merged.get(bound, 0.0) + count
    ordered = sorted(merged.items())
    if not ordered or ordered[-1][0] != math.inf or len(ordered) < 2:
        return None
    monotonic: list[tuple[float, float]] = []
    highest = -math.inf
    for bound, count in ordered:
        highest = max(highest, count)
        monotonic.append((bound, highest))
    observations = monotonic[-1][1]
    if observations <= 0:
        return None
    rank = q * observations
    index = next((i for i, (_, count) in enumerate(monotonic[:-1]) if count >= rank), len(monotonic) - 1)
    if index == len(monotonic) - 1:
        return monotonic[-2][0]
    bound, count = monotonic[index]
    if index == 0 and bound <= 0:
        return bound
    start = 0.0
    if index > 0:
        start, below = monotonic[index - 1]
        count -= below
        rank -= below
    if count <= 0:
        return None  # PromQL: 0/0 is NaN (q = 0 and an empty lowest bucket)
    return start + (bound - start) * (rank / count)


Series = tuple[str, tuple[tuple[str, str], ...]]  # (sample name, sorted labels)


def window_increase(
    previous: Mapping[Series, float] | None, current: Mapping[Series, float]
) -> dict[Series, float]:
    """The increase of one proxy's counters between two readings.

    A proxy restart resets all its counters together, so when any counter went down (or vanished) every
    current value counts whole; that also catches a counter that has grown back past its old value. With
    no earlier reading (a new proxy) everything counts whole as well, and a new series counts from zero.
    """
    if previous is None or any(current.get(series, -1.0) < value for series, value in previous.items()):
        return dict(current)
    return {series: counter_increase(previous.get(series), value) for series, value in current.items()}


def _parse(text: str) -> tuple[dict[Series, float], dict[Series, float]]:
    """A proxy's exposition: (the window's counters and buckets, the live gauges)."""
    counters: dict[Series, float] = {}
    gauges: dict[Series, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in _WINDOW_SERIES:
                counters[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
            elif sample.name in (WEIGHT, GENERATION):
                gauges[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return counters, gauges


def _measurements(
    increases: Iterable[Mapping[Series, float]], routes: tuple[str, ...] | None, window_seconds: float
) -> Measurements:
    """Sum the proxies' increases by path (over ``routes``) into the migration's numbers."""
    selected = None if routes is None else frozenset(routes)
    requests = errors = 0.0
    buckets: dict[tuple[str, str], dict[float, float]] = {}
    for increase in increases:
        for (name, label_items), value in increase.items():
            labels = dict(label_items)
            if selected is not None and labels.get("route") not in selected:
                continue
            path = labels.get("path", "")
            if name == REQUESTS:
                if path == "grpc":
                    requests += value
                    if is_server_error(labels.get("code", "")):
                        errors += value
            else:
                by_bound = buckets.setdefault((name, path), {})
                bound = float(labels["le"])
                by_bound[bound] = by_bound.get(bound, 0.0) + value

    def p99(name: str, path: str) -> float | None:
        return quantile_from_buckets(0.99, sorted(buckets.get((name, path), {}).items()))

    return Measurements(
        window_seconds=window_seconds,
        grpc_requests=round(requests),
        grpc_errors=round(errors),
        grpc_p99_seconds=p99(DURATION_BUCKETS, "grpc"),
        rest_p99_seconds=p99(DURATION_BUCKETS, "rest"),
        grpc_ttft_p99_seconds=p99(TTFT_BUCKETS, "grpc"),
    )


def _live(endpoint: str, gauges: Mapping[Series, float], routes: tuple[str, ...] | None) -> tuple[int, int]:
    """(gRPC weight, config generation) of one proxy. The weight is that of the selected routes (all the
    gateway's split routes carry its one weight); the lowest if they differ, 0 if the proxy has none."""
    generation = gauges.get((GENERATION, ()))
    if generation is None:
        raise MetricsUnavailable(
            f"proxy {endpoint} exports no {GENERATION}: is an llmgw proxy listening on that admin port?"
        )
    weights = [
        value
        for (name, labels), value in gauges.items()
        if name == WEIGHT and (routes is None or dict(labels).get("route") in routes)
    ]
    return (int(min(weights)) if weights else 0), int(generation)


def _check_window(window_seconds: float) -> None:
    if not window_seconds > 0 or math.isinf(window_seconds):
        raise ValueError(f"window_seconds must be a positive number of seconds, got {window_seconds!r}")


# ------------------------------------------------------------------------------------ reading proxies


class _Closing:
    """``async with source:`` closes its HTTP sessions on the way out."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        raise NotImplementedError


MAX_ANSWER_BYTES = 8 * 1024 * 1024  # a Prometheus query answer or a proxy's /metrics; larger is refused


async def _bounded_text(response: aiohttp.ClientResponse, where: str) -> str:
    """The answer's text, read up to :data:`MAX_ANSWER_BYTES` (a hostile URL cannot fill the operator)."""
    body = bytearray()
    async for chunk in response.content.iter_any():
        body += chunk
        if len(body) > MAX_ANSWER_BYTES:
            raise MetricsUnavailable(f"{where} answered more than {MAX_ANSWER_BYTES} bytes")
    return body.decode("utf-8", errors="replace")


class _Proxies:
    """Reads proxies' ``/metrics``; both sources use it for the live state."""

    def __init__(self, timeout_seconds: float) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _read(self, endpoint: str) -> tuple[dict[Series, float], dict[Series, float]]:
        url = f"http://{endpoint}/metrics"
        try:
            async with self.session().get(url, allow_redirects=False) as response:
                text = await _bounded_text(response, url)
                if response.status != 200:
                    raise MetricsUnavailable(f"GET {url} answered HTTP {response.status}: {text[:200]!r}")
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:  # ValueError: undecodable text
            raise MetricsUnavailable(f"cannot read {url}: {exc or type(exc).__name__}") from exc
        try:
            return _parse(text)
        except ValueError as exc:
            raise MetricsUnavailable(f"{url} is not in the Prometheus text format: {exc}") from exc

    async def read_all(
        self, endpoints: Sequence[str]
    ) -> list[tuple[dict[Series, float], dict[Series, float]] | MetricsUnavailable]:
        """Every endpoint's reading, or the MetricsUnavailable saying why there is none."""
        results = await asyncio.gather(*(self._read(e) for e in endpoints), return_exceptions=True)
        out: list[tuple[dict[Series, float], dict[Series, float]] | MetricsUnavailable] = []
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, MetricsUnavailable):
                raise result  # a bug, or cancellation
            out.append(result)
        return out

    async def read_every(
        self, endpoints: Sequence[str]
    ) -> list[tuple[dict[Series, float], dict[Series, float]]]:
        """Every endpoint's reading, or MetricsUnavailable naming each one that failed."""
        results = await self.read_all(endpoints)
        failures = [str(r) for r in results if isinstance(r, MetricsUnavailable)]
        if failures:
            raise MetricsUnavailable(
                f"{len(failures)} of {len(endpoints)} proxies unreadable: " + "; ".join(failures)
            )
        return [r for r in results if not isinstance(r, MetricsUnavailable)]

    async def live(self, targets: Targets) -> tuple[Proxies, dict[str, dict[Series, float]] | None]:
        """The live state (a proxy that cannot be read is left out, and logged), and every proxy's window
        counters when all could be read."""
        results = await self.read_all(targets.endpoints)
        weights: list[int] = []
        generations: list[int] = []
        counters: dict[str, dict[Series, float]] | None = {}
        for endpoint, result in zip(targets.endpoints, results, strict=True):
            try:
                if isinstance(result, MetricsUnavailable):
                    raise result
                weight, generation = _live(endpoint, result[1], targets.routes)
            except MetricsUnavailable as exc:
                log.warning("gateway %s/%s: %s", targets.namespace, targets.name, exc)
                counters = None
                continue
            weights.append(weight)
            generations.append(generation)
            if counters is not None:
                counters[endpoint] = result[0]
        return Proxies(len(targets.endpoints), tuple(weights), tuple(generations)), counters


@dataclass(frozen=True)
class _Reading:
    at: float  # ScrapeSource's clock
    counters: dict[str, dict[Series, float]]  # by endpoint


@dataclass
class _History:
    readings: list[_Reading]
    window: float  # the last window asked for


def _base(readings: Sequence[_Reading], now: float, window: float) -> _Reading | None:
    """The reading a window of ``window`` seconds ending ``now`` starts from, if any (see the constants)."""
    fitting = [r for r in readings if _MIN_COVER * window <= now - r.at <= _MAX_COVER * window]
    near = [r for r in fitting if now - r.at <= _NEAR * window]
    if near:
        return min(near, key=lambda r: r.at)
    return max(fitting, key=lambda r: r.at) if fitting else None


class ScrapeSource(_Closing):
    """A :class:`MetricsSource` without Prometheus: reads the proxies' ``/metrics`` and keeps, per ``key``,
    the readings a window needs (see the module docstring). ``timeout_seconds`` bounds each read; ``clock``
    (monotonic seconds) times the readings.

    :meth:`measure` keeps its readings under its ``key``; :meth:`proxies` keeps its own, when it could read
    every proxy, under ``targets.key``. Measure with ``key=targets.key`` and call :meth:`proxies` regularly
    (as the migration does every tick) so that a window starts at the reading that found its weight live,
    rather than at the previous :meth:`measure`."""

    def __init__(self, timeout_seconds: float = 2.0, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._proxies = _Proxies(timeout_seconds)
        self._clock = clock
        self._histories: dict[Hashable, _History] = {}

    async def close(self) -> None:
        await self._proxies.close()

    def forget(self, key: Hashable) -> None:
        """Drop the readings of ``key`` (its gateway is gone, or its next window must start afresh)."""
        self._histories.pop(key, None)

    def _remember(self, key: Hashable, reading: _Reading) -> _History:
        history = self._histories.setdefault(key, _History([], _DEFAULT_WINDOW))
        readings = history.readings
        # The newest replaces its predecessor while they are closer than the spacing: bounded memory at
        # any calling rate, and the latest reading is always there.
        if len(readings) >= 2 and reading.at - readings[-2].at < history.window / _READINGS_PER_WINDOW:
            readings[-1] = reading
        else:
            readings.append(reading)
        horizon = reading.at - _MAX_COVER * history.window
        while readings and readings[0].at < horizon:
            readings.pop(0)
        return history

    async def proxies(self, targets: Targets) -> Proxies:
        live, counters = await self._proxies.live(targets)
        if counters is not None:
            self._remember(targets.key, _Reading(self._clock(), counters))
        return live

    async def measure(self, key: Hashable, targets: Targets, window_seconds: float) -> Measurements | None:
        _check_window(window_seconds)
        readings = await self._proxies.read_every(targets.endpoints)
        now = _Reading(
            self._clock(),
            {e: counters for e, (counters, _) in zip(targets.endpoints, readings, strict=True)},
        )
        history = self._histories.get(key)
        base = _base(history.readings, now.at, window_seconds) if history is not None else None
        self._histories.setdefault(key, _History([], window_seconds)).window = window_seconds
        self._remember(key, now)
        if base is None:
            return None
        increases = (window_increase(base.counters.get(e), counters) for e, counters in now.counters.items())
        return _measurements(increases, targets.routes, now.at - base.at)


# ------------------------------------------------------------------------------------------ Prometheus


def _quote(value: str) -> str:
    """A PromQL string literal (Go escaping, which JSON's is a subset of)."""
    return json.dumps(value)


def _regex_quote(value: str) -> str:
    """``value`` as a literal inside an RE2 regular expression (Go's regexp.QuoteMeta)."""
    return re.sub(r"([\\.+*?()|\[\]{}^$])", r"\\\1", value)


def promql_duration(seconds: float) -> str:
    """A PromQL range duration: whole seconds as ``30s``, anything else in milliseconds."""
    millis = max(1, round(seconds * 1000))
    return f"{millis // 1000}s" if millis % 1000 == 0 else f"{millis}ms"


class PrometheusSource(_Closing):
    """A :class:`MetricsSource` that asks Prometheus's HTTP API at ``url`` (e.g.
    ``http://prometheus.monitoring:9090``) for windows; the live state comes from the proxies directly.

    ``bearer_token`` is sent as ``Authorization: Bearer``; ``user:password@`` in the URL as basic auth.
    ``namespace_label`` and ``gateway_label`` are the names of the labels Prometheus puts on the proxies'
    series (see the module docstring). ``timeout_seconds`` bounds each query, ``scrape_timeout_seconds``
    each read of a proxy. ``clock`` (Unix seconds) gives the instant a measurement's window ends at."""

    def __init__(
        self,
        url: str,
        bearer_token: str | None = None,
        *,
        namespace_label: str = "namespace",
        gateway_label: str = "llmgateway_io_gateway",
        timeout_seconds: float = 10.0,
        scrape_timeout_seconds: float = 2.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = url.rstrip("/")
        self._clock = clock
        parsed = URL(self.url)
        if parsed.user is not None and bearer_token:
            raise ValueError(
                "Prometheus URL: give credentials in the URL (basic auth) or a bearer token, not both"
            )
        # For messages: not the user:password the URL may carry (aiohttp sends them as basic auth).
        self.display_url = str(parsed.with_user(None)) if parsed.user is not None else self.url
        self._token = bearer_token
        self.namespace_label = namespace_label
        self.gateway_label = gateway_label
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._session: aiohttp.ClientSession | None = None
        self._proxies = _Proxies(scrape_timeout_seconds)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        await self._proxies.close()

    def selector(self, targets: Targets, *, routes: bool = True) -> str:
        """The label matchers of the gateway's proxies' series (and of its split routes)."""
        matchers = [
            f"{self.namespace_label}={_quote(targets.namespace)}",
            f"{self.gateway_label}={_quote(targets.name)}",
        ]
        if routes and targets.routes is not None:
            if targets.routes:
                matchers.append(f"route=~{_quote('|'.join(_regex_quote(r) for r in targets.routes))}")
            else:
                matchers.append('route=""')  # no split route: nothing (every proxy series has a route)
        return ", ".join(matchers)

    def queries(self, targets: Targets, window_seconds: float) -> dict[str, str]:
        """The PromQL of one measurement, by what it measures."""
        sel = self.selector(targets)
        w = promql_duration(window_seconds)

        def p99(metric: str, path: str) -> str:
            return f'histogram_quantile(0.99, sum by (le) (rate({metric}{{path="{path}", {sel}}}[{w}])))'

        return {
            "targets": f"count(up{{{self.selector(targets, routes=False)}}})",
            "grpc_requests": f'sum(increase({REQUESTS}{{path="grpc", {sel}}}[{w}]))',
            "grpc_errors": f'sum(increase({REQUESTS}{{path="grpc", code=~"{ERROR_CODES}", {sel}}}[{w}]))',
            "grpc_p99_seconds": p99(DURATION_BUCKETS, "grpc"),
            "rest_p99_seconds": p99(DURATION_BUCKETS, "rest"),
            "grpc_ttft_p99_seconds": p99(TTFT_BUCKETS, "grpc"),
        }

    async def proxies(self, targets: Targets) -> Proxies:
        live, _ = await self._proxies.live(targets)
        return live

    async def measure(self, key: Hashable, targets: Targets, window_seconds: float) -> Measurements | None:
        _check_window(window_seconds)
        queries = self.queries(targets, window_seconds)
        at = self._clock()
        values = await asyncio.gather(*(self.query(q, at) for q in queries.values()))
        result = dict(zip(queries, values, strict=True))
        if result["targets"] is None:
            raise MetricsUnavailable(
                f"Prometheus at {self.display_url} has no scrape target labelled "
                f"{self.selector(targets, routes=False)}: check that it scrapes the proxy pods of gateway "
                f"{targets.namespace}/{targets.name} and puts those labels on their series "
                "(see llmgw_operator.analysis)"
            )

        def count(name: str) -> int:
            value = result[name]
            return round(value) if value is not None else 0

        return Measurements(
            window_seconds=window_seconds,
            grpc_requests=count("grpc_requests"),
            grpc_errors=count("grpc_errors"),
            grpc_p99_seconds=result["grpc_p99_seconds"],
            rest_p99_seconds=result["rest_p99_seconds"],
            grpc_ttft_p99_seconds=result["grpc_ttft_p99_seconds"],
        )

    async def query(self, promql: str, at: float | None = None) -> float | None:
        """The value of an instant query that gives at most one sample; None for no sample or NaN."""
        data = await self._api(
            "query", {"query": promql, **({"time": f"{at:.3f}"} if at is not None else {})}
        )
        samples: list[Any]
        if data.get("resultType") == "scalar":
            samples = [{"value": data.get("result")}]
        elif data.get("resultType") == "vector":
            samples = data.get("result") or []
        else:
            raise MetricsUnavailable(
                f"Prometheus at {self.display_url}: query {promql!r} gave a {data.get('resultType')}, "
                "not a vector"
            )
        if not samples:
            return None
        if len(samples) > 1:
            raise MetricsUnavailable(
                f"Prometheus at {self.display_url}: query {promql!r} gave {len(samples)} series, not one"
            )
        try:
            value = float(samples[0]["value"][1])
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise MetricsUnavailable(
                f"Prometheus at {self.display_url}: query {promql!r} gave an unreadable sample {samples[0]!r}"
            ) from exc
        return None if math.isnan(value) else value

    async def _api(self, endpoint: str, params: Mapping[str, str]) -> dict[str, Any]:
        """``GET /api/v1/<endpoint>``'s ``data``, or MetricsUnavailable with what went wrong."""
        url = f"{self.url}/api/v1/{endpoint}"
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        try:
            # No redirect: the token would follow it, and the URL is the only address the owner chose.
            async with self._session.get(
                url, params=params, headers=headers, allow_redirects=False
            ) as response:
                status = response.status
                content_type = response.content_type if "Content-Type" in response.headers else ""
                text = await _bounded_text(response, self.display_url)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise MetricsUnavailable(
                self._scrub(f"cannot reach Prometheus at {self.display_url}: {exc or type(exc).__name__}")
            ) from None
        try:
            body = json.loads(text)
        except ValueError:
            body = None
        if not isinstance(body, dict) or "status" not in body:
            hint = " (check the bearer token)" if status in (401, 403) else ""
            # Not the answer's body: the operator fetches this URL from its own network position, and a
            # gateway pointing it at another service (cloud metadata, an internal API) must not read that
            # service's answer back through its status.
            raise MetricsUnavailable(
                f"Prometheus at {self.display_url} answered HTTP {status}{hint}, not with the Prometheus "
                f"API's JSON ({len(text)} characters, content type {content_type or 'none'!r})"
            )
        if body["status"] != "success":
            raise MetricsUnavailable(
                self._scrub(
                    f"Prometheus at {self.display_url} refused query {params.get('query')!r} "
                    f"(HTTP {status}): {str(body.get('errorType', 'error'))[:64]}: "
                    f"{str(body.get('error', 'no message'))[:256]}"
                )
            )
        data = body.get("data")
        if not isinstance(data, dict):
            raise MetricsUnavailable(f"Prometheus at {self.display_url} answered its API's JSON without data")
        return data

    def _scrub(self, message: str) -> str:
        """Whatever an error echoes, the token stays out of messages."""
        return message.replace(self._token, "<bearer token>") if self._token else message


if TYPE_CHECKING:  # both implement the interface: mypy checks it here
    _SOURCES: tuple[type[MetricsSource], ...] = (ScrapeSource, PrometheusSource)
